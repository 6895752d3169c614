"""How the TPP's category propensity enters the score, and the fusion weights learned from the stream.

The TPP term is ``tpp = clip(w · f, −c, c)`` in logit space, with the *log-ratio feature*
``f = decay · ln(K · p_u(category))``: 0 when the TPP's guess is uniform (``K·p = 1``), positive
for categories the user is likely to engage with next, ``decay = exp(−age/τ)`` fading a stale
propensity. The score is ``sigmoid(logit(base + compensation) + tpp)``.

Why learn ``w``: whether "likely to engage with this category next" means "likely to click /
rate it highly" depends on the stream. On ML-100K, where every event is a rating and the label
is ``rating ≥ 4``, a fixed ``w = 0.5`` cost AUC in every prequential run (the propensity predicts
*which* genre a user rates next, not whether the rating is high). So the trainer fits ``w`` by
online logistic regression (Adagrad) on labelled events, with the served base logit as an
offset, test-then-train, and publishes it with each snapshot; the configured weight is only the
starting point. ``|w|`` is bounded so the term stays bounded whatever was learned.

The error memory's ``λ`` is learned the same way (:class:`MemoryLambda`), in the paper's own
probability space: ``q = clip(base + λ·ê)``. ReLoop2 picks λ per dataset by grid search (0.9 on
AmazonElectronics, 0.4 on MicroVideo); a live stream has no validation set, and the right λ moves
with it: on stationary ML-100K, where the online base model already learns each user's leniency
window by window, any fixed λ > 0 cost AUC (events 25,000-50,000: 0.713 -> 0.700 at λ = 0.5),
while after an injected label flip the memory is what reacts. So λ follows the log-loss of
``q`` on served predictions, test-then-train, with an RMSprop step (a running, not cumulative,
gradient scale) so that it can rise again when a shift makes the memory worth trusting; it stays
in [0, 1], the paper's range. Offline replica of the pipeline (``models/dsl.py`` settings): on
events 25,000-50,000 AUC 0.7141 (base) / 0.7003 (λ = 0.5) / 0.7137 (learned); on the flipped
genre after a flip (``driftrec/shift.py``) log-loss 0.786 / 0.736 / 0.754 -- learned λ gives up
part of the fixed λ's gain under shift to stop its loss on a stationary stream.

Starting values. Every learned weight (``w``, ``λ``, ``μ``) starts at 0 by default: a fresh
system has no evidence that a term helps, so it contributes nothing until the stream says so.
Chosen on a *cold start* of the validation segment (ML-100K events 25,000-50,000 replayed into an
empty system with synchronous windows; ``full − base`` AUC within each run, because the base
alone moves by ±0.003 between runs): all weights starting at 0.5 gave −0.0038 (the TPP term cost
0.0044 before its weight was learned down), only ``w`` starting at 0 gave −0.0042, all starting
at 0 gave +0.0006 (log-loss −0.0002).

The session memory's weight ``μ`` (``models/error_memory.py``) is a second ``MemoryLambda``
(``key="session"``), fitted the same way on its own estimate ĉ: ``q = clip(base + μ·ĉ)``. The
two weights are fitted separately, each against the base alone; on ML-100K λ settles near 0 and
μ near 0.2, so the interaction they ignore is small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from driftrec.models.error_memory import compensate

TINY_P = 1e-12  # a zero propensity counts as this, so ln(K·p) stays finite (and is then clipped)


def tpp_log_ratios(payload: bytes | None, categories: Sequence[str | None], now: float, *, tau_s: float) -> np.ndarray:
    """``f`` per candidate from a user's stored propensity (the TPP agent's JSON); 0 where unknown.

    Raises ``ValueError`` on a payload that is not the TPP agent's format; callers treat that as
    "no propensity".
    """
    n = len(categories)
    if payload is None:
        return np.zeros(n)
    doc = orjson.loads(payload)
    if not isinstance(doc, dict) or not isinstance(doc.get("probs"), dict):
        raise ValueError("tpp payload must be an object with a 'probs' object")
    probs: dict[str, Any] = doc["probs"]
    k = doc.get("n_types") or len(probs)
    last_ts = doc.get("ts")
    if not isinstance(k, (int, float)) or k <= 0:
        raise ValueError(f"tpp n_types must be a positive number, got {k!r}")
    decay = 1.0
    if isinstance(last_ts, (int, float)) and math.isfinite(last_ts) and tau_s > 0:
        decay = math.exp(-max(now - float(last_ts), 0.0) / tau_s)
    # a probability above 1 is malformed; capping it keeps k·p finite (k·p overflowed to inf, and
    # inf times a decay that underflowed to 0 is NaN)
    lut = {
        cat: decay * math.log(float(k) * min(max(float(p), TINY_P), 1.0))
        for cat, p in probs.items()
        if isinstance(p, (int, float)) and math.isfinite(p) and p >= 0
    }
    if not lut:
        return np.zeros(n)
    return np.fromiter((lut.get(c, 0.0) if c is not None else 0.0 for c in categories), dtype=np.float64, count=n)


def tpp_terms(
    payload: bytes | None, categories: Sequence[str | None], now: float, *, weight: float, tau_s: float, clip: float
) -> np.ndarray:
    """The logit-space TPP term per candidate: ``clip(weight · f, −clip, clip)``."""
    if payload is None or weight == 0.0:
        return np.zeros(len(categories))
    return np.clip(weight * tpp_log_ratios(payload, categories, now, tau_s=tau_s), -clip, clip)


def rms_step(grad: float, v: float, t: int, rho: float) -> tuple[float, int, float]:
    """One RMSprop step direction with Adam's bias correction: ``(v', t', grad / sqrt(v̂))``.

    Why not Adagrad (as for the TPP weight) for the memory's λ: Adagrad's step shrinks as
    ``1/sqrt(steps)`` forever, so a λ learned on a long stationary stretch could no longer rise
    when a shift makes the memory worth trusting -- the one moment it exists for. A running scale
    keeps the step ~``lr`` per update; the correction keeps the first steps from being
    ``1/sqrt(1 − rho)`` times too large.
    """
    t += 1
    v = rho * v + (1.0 - rho) * grad * grad
    v_hat = v / (1.0 - rho**t)
    return v, t, grad / (math.sqrt(v_hat) + 1e-12)


@dataclass
class TPPWeight:
    """Online logistic regression of the TPP term's weight, the served base logit as offset.

    ``update`` takes events scored *before* they were learned (test-then-train); events whose
    feature is 0 (no propensity, unknown category) carry no gradient. A part of
    :class:`FusionWeights`, which is the learner the stream drives.
    """

    w: float = 0.0  # no evidence yet that the term helps (settings.serving.tpp_weight)
    lr: float = 0.05
    clip: float = 2.0  # the term's bound, as in serving
    max_abs_w: float = 2.0
    _g2: float = 1e-8
    n_seen: int = 0

    def term(self, feature: np.ndarray) -> np.ndarray:
        return np.clip(self.w * np.asarray(feature, dtype=np.float64), -self.clip, self.clip)

    def predict_many(self, base_logit: np.ndarray, feature: np.ndarray) -> np.ndarray:
        z = np.asarray(base_logit, dtype=np.float64) + self.term(feature)
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)

    def update(self, base_logit: np.ndarray, feature: np.ndarray, labels: np.ndarray) -> None:
        f = np.asarray(feature, dtype=np.float64)
        active = (f != 0.0) & (np.abs(self.w * f) < self.clip)  # the clip passes no gradient
        if not active.any():
            return
        p = self.predict_many(base_logit, f)
        grad = float(np.mean((p - np.asarray(labels, dtype=np.float64))[active] * f[active]))
        self._g2 += grad * grad
        self.w = float(np.clip(self.w - self.lr * grad / math.sqrt(self._g2), -self.max_abs_w, self.max_abs_w))
        self.n_seen += int(active.sum())

    def to_dict(self) -> dict[str, float | int]:
        return {"tpp_weight": self.w, "g2": self._g2, "n_seen": self.n_seen}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: dict[str, Any], **kwargs: float) -> TPPWeight | None:
        """The learned weight in a snapshot's ``fusion`` part, or None where none was learned."""
        if "tpp_weight" not in doc:
            return None
        return cls(
            w=float(doc["tpp_weight"]), _g2=float(doc.get("g2", 1e-8)), n_seen=int(doc.get("n_seen", 0)), **kwargs
        )

    @classmethod
    def from_bytes(cls, data: bytes, **kwargs: float) -> TPPWeight:
        got = cls.from_dict(orjson.loads(data), **kwargs)
        if got is None:
            raise ValueError("no tpp_weight in this fusion part")
        return got


def read_fusion(part: bytes | None) -> dict[str, Any]:
    """A snapshot's ``fusion`` part (one JSON object holding every learned fusion weight)."""
    if not part:
        return {}
    doc = orjson.loads(part)
    if not isinstance(doc, dict):
        raise ValueError("the fusion part must be a JSON object")
    return doc


@dataclass
class MemoryLambda:
    """Online estimate of the error memory's ``λ`` from served predictions (see the module doc).

    ``update(base, e_hat, labels)`` takes the served base probabilities and the memory's
    estimates *before* the events were written (test-then-train); events where the memory knew
    nothing (``ê = 0``) or the compensated probability sits at the clip carry no gradient.
    """

    lam: float = 0.0  # likewise (settings.memory.lambda / session_lambda)
    lr: float = 0.05
    rho: float = 0.99  # decay of the running squared gradient (RMSprop)
    eps: float = 1e-4  # the serving clip of base + λ·ê
    _v: float = 0.0
    _t: int = 0
    n_seen: int = 0
    key: str = "memory"  # the fusion part's key prefix: "memory" (LSH memory) or "session"

    def gradient(self, base: np.ndarray, e_hat: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """d(mean log-loss of q)/dλ over the events that carry a gradient, and their count."""
        e = np.asarray(e_hat, dtype=np.float64)
        q = compensate(base, e, self.lam, self.eps)  # the served base + memory, as serving computes it
        active = (e != 0.0) & (q > self.eps) & (q < 1.0 - self.eps)
        if not active.any():
            return 0.0, 0
        y = np.asarray(labels, dtype=np.float64)
        # d logloss / d λ = (q − y) / (q (1 − q)) · ê   (log-loss of q, chain rule through q = base + λ·ê)
        return float(np.mean(((q - y) * e / (q * (1.0 - q)))[active])), int(active.sum())

    def update(self, base: np.ndarray, e_hat: np.ndarray, labels: np.ndarray) -> None:
        grad, n = self.gradient(base, e_hat, labels)
        if n == 0:
            return
        self._v, self._t, step = rms_step(grad, self._v, self._t, self.rho)
        self.lam = float(np.clip(self.lam - self.lr * step, 0.0, 1.0))
        self.n_seen += n

    def to_dict(self) -> dict[str, float | int]:
        k = self.key
        return {f"{k}_lambda": self.lam, f"{k}_v": self._v, f"{k}_t": self._t, f"{k}_n_seen": self.n_seen}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], key: str = "memory", **kwargs: float) -> MemoryLambda | None:
        """The learned λ in a snapshot's ``fusion`` part, or None where none was learned."""
        if f"{key}_lambda" not in doc:
            return None
        return cls(
            lam=float(doc[f"{key}_lambda"]),
            _v=float(doc.get(f"{key}_v", 0.0)),
            _t=int(doc.get(f"{key}_t", 0)),
            n_seen=int(doc.get(f"{key}_n_seen", 0)),
            key=key,
            **kwargs,
        )


@dataclass(frozen=True, slots=True)
class FusionSample:
    """One labelled event as it was served: what the fusion weights learn from (test-then-train).

    ``memory`` / ``session`` are the two memories' estimates read *before* the event was written,
    ``tpp`` the log-ratio feature ``f`` of the user's propensity computed before the event (0: none).
    """

    base: float
    label: int | None
    memory: float = 0.0
    session: float = 0.0
    tpp: float = 0.0


class FusionWeights:
    """The fusion's learned weights, one learner: the memory's λ, the session memory's μ and the
    TPP term's ``w``; ``predict_*`` is the scoring service's fusion rule with them.

    A part set to ``None`` is not learned (its setting is switched off) and contributes nothing.
    Each part is fitted on its own term against the base alone (see the module docstring).
    """

    def __init__(
        self,
        tpp: TPPWeight | None = None,
        memory: MemoryLambda | None = None,
        session: MemoryLambda | None = None,
        eps: float = 1e-4,
    ) -> None:
        self.tpp, self.memory, self.session, self.eps = tpp, memory, session, eps

    @property
    def enabled(self) -> bool:
        return any(part is not None for part in (self.tpp, self.memory, self.session))

    def _arrays(self, samples: Sequence[FusionSample]) -> tuple[np.ndarray, ...]:
        cols = np.array([(x.base, x.memory, x.session, x.tpp) for x in samples], dtype=np.float64).reshape(-1, 4)
        return cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3]

    def learn_one(self, sample: FusionSample) -> None:
        self.learn_many([sample])

    def learn_many(self, samples: Sequence[FusionSample]) -> None:
        labelled = [x for x in samples if x.label is not None]
        if not labelled:
            return
        base, e_hat, c_hat, feature = self._arrays(labelled)
        y = np.array([x.label for x in labelled], dtype=np.float64)
        if self.memory is not None:
            self.memory.update(base, e_hat, y)
        if self.session is not None:
            self.session.update(base, c_hat, y)
        if self.tpp is not None and feature.any():
            p = np.clip(base, self.eps, 1 - self.eps)
            self.tpp.update(np.log(p) - np.log1p(-p), feature, y)

    def predict_one(self, sample: FusionSample) -> float:
        return float(self.predict_many([sample])[0])

    def predict_many(self, samples: Sequence[FusionSample]) -> np.ndarray:
        """``sigmoid(logit(clip(base + λ·ê + μ·ĉ)) + clip(w·f))``, as ``serving.scorer`` fuses."""
        base, e_hat, c_hat, feature = self._arrays(samples)
        lam = self.memory.lam if self.memory is not None else 0.0
        mu = self.session.lam if self.session is not None else 0.0
        p = compensate(base, lam * e_hat + mu * c_hat, 1.0, self.eps)
        z = np.log(p) - np.log1p(-p) + (self.tpp.term(feature) if self.tpp is not None else 0.0)
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)

    def to_dict(self) -> dict[str, float | int]:
        """The snapshot's ``fusion`` part (each learned part under its own keys)."""
        out: dict[str, float | int] = {}
        for part in (self.tpp, self.memory, self.session):
            if part is not None:
                out.update(part.to_dict())
        return out

    def resume(self, doc: dict[str, Any]) -> None:
        """Continue from a snapshot's ``fusion`` part: every enabled part that was learned there."""
        if self.tpp is not None:
            self.tpp = TPPWeight.from_dict(doc, clip=self.tpp.clip) or self.tpp
        if self.memory is not None:
            self.memory = MemoryLambda.from_dict(doc, eps=self.memory.eps) or self.memory
        if self.session is not None:
            self.session = MemoryLambda.from_dict(doc, key="session", eps=self.session.eps) or self.session

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, eps: float = 1e-4) -> FusionWeights:
        """Every part found in ``data`` (a part absent there stays off)."""
        doc = read_fusion(data)
        return cls(
            tpp=TPPWeight.from_dict(doc),
            memory=MemoryLambda.from_dict(doc, eps=eps),
            session=MemoryLambda.from_dict(doc, key="session", eps=eps),
            eps=eps,
        )
