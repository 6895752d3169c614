"""What is served: the one fusion rule. The scorer, ingest's fusion writer and the evaluation's
ablations all call it, so what a learner sees as "served" is what the user got.

The rule (per candidate; every part is a logit, so the parts add up to the score)::

    base         = DSL probability (``serving.cold_start_base`` with no snapshot or the DSL off)
    wide         = w_m·logit(base) + Σ_f w_f                       (the one-hot ids, ``models/wide.py``)
    tpp          = w_t·t,   t = clip(decay · ln(K·p_u(category)))  (``models/fusion.tpp_log_ratios``)
    pre          = sigmoid(logit(base) + wide + tpp)               what the memories correct
    e            = logit(clip(pre + ê(pre))) − logit(pre)          ê: the LSH memory's estimate
    s            = logit(clip(pre + ĉ(pre))) − logit(pre)          ĉ: the session memory's
    compensation = w_e·e + w_s·s
    score        = sigmoid(logit(base) + wide + tpp + compensation)

Every ``w`` is a weight of one per-event logistic model (FTRL-Proximal, ``models/wide.py``) that
ingest steps on each labelled event with exactly these inputs, as they were when the event was
served: the fusion *learns* how much each term is worth, and none is computed to be subtracted
again. All weights start at 0 (no evidence yet that a term helps), so a fresh system serves the
DSL as it is and each term earns its share from the stream.

ReLoop2 as the paper has it: the error memories hold ``y − pre`` -- the error of the score that
was served before the memory's own correction (the DSL, the ids and the TPP, fast path included)
-- and their correction applies to that same ``pre``. With ``w_e = 1`` the correction is exactly
the paper's ``clip(ŷ + ê)`` in probability space; the learned ``w_e`` plays the role of the
paper's λ, which the paper grid-searches per dataset and a live stream must learn. Storing the
error of the *final* score instead would make the memory estimate its own residual, a fixed point
that depends on its weight.

A term switched off by the settings contributes an input of 0 (its weight then never moves), and
a term whose learned weight is exactly 0 changes nothing, so the scorer need not read its state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

MODEL_FEATURE = "m"  # the DSL logit
MEMORY_FEATURE = "e"  # the LSH memory's correction of pre, logit delta at unit weight
SESSION_FEATURE = "s"  # the session memory's, likewise
TPP_FEATURE = "t"  # the TPP log ratio at unit weight
TERM_FEATURES = (MEMORY_FEATURE, SESSION_FEATURE, TPP_FEATURE)
REAL_FEATURES = (MODEL_FEATURE, *TERM_FEATURES)

# the ablations reported by the evaluation, in this order (DESIGN.md, "Evaluation protocol")
ABLATIONS = ("base", "full-no-memory", "full-no-tpp", "full-no-wide", "full")

Estimate = Callable[[np.ndarray], np.ndarray]  # ê as a function of the query's served pre score


def logit(p: np.ndarray | float, eps: float) -> np.ndarray:
    """``logit(clip(p, eps, 1 − eps))``: finite for any probability."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    out: np.ndarray = np.log(q) - np.log1p(-q)
    return out


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # overflow-free
    return out


def correction_input(pre: np.ndarray, estimate: np.ndarray, eps: float) -> np.ndarray:
    """A memory's estimate ``ê`` (probability units) as a logit delta on ``pre`` at unit weight."""
    out: np.ndarray = logit(np.asarray(pre) + np.asarray(estimate), eps) - logit(pre, eps)
    return out


@dataclass(frozen=True)
class TermWeights:
    """The fusion's learned weights on the real-valued inputs (the FTRL's ``m``, ``e``, ``s``, ``t``)."""

    model: float = 0.0
    memory: float = 0.0
    session: float = 0.0
    tpp: float = 0.0

    @classmethod
    def of(cls, weight: Mapping[str, float]) -> TermWeights:
        """From a feature → weight mapping (missing features weigh 0)."""
        return cls(
            model=weight.get(MODEL_FEATURE, 0.0),
            memory=weight.get(MEMORY_FEATURE, 0.0),
            session=weight.get(SESSION_FEATURE, 0.0),
            tpp=weight.get(TPP_FEATURE, 0.0),
        )


@dataclass(frozen=True)
class ServedTerms:
    """Every term of a list of candidates as served; ``score`` is their sum through a sigmoid.

    ``inputs`` are the real-valued inputs at unit weight, as the fusion learns them
    (``REAL_FEATURES`` → one value per candidate); ``pre`` is what the memories correct.
    """

    base: np.ndarray
    wide: np.ndarray
    tpp: np.ndarray
    compensation: np.ndarray
    pre: np.ndarray
    inputs: dict[str, np.ndarray]
    eps: float

    @property
    def score(self) -> np.ndarray:
        return sigmoid(logit(self.base, self.eps) + self.wide + self.tpp + self.compensation)

    def ablations(self) -> dict[str, np.ndarray]:
        return ablations(self.base, self.wide, self.tpp, self.compensation, self.eps)


def ablations(
    base: np.ndarray, wide: np.ndarray, tpp: np.ndarray, compensation: np.ndarray, eps: float
) -> dict[str, np.ndarray]:
    """Leave-one-out scores from one served answer: each term dropped from the fused logit.

    The weights of the other terms stay as learned with every term present, so a drop shows what
    the term adds to *this* score, not what a system trained without it would serve."""
    b = np.asarray(base, dtype=np.float64)
    parts = {"wide": np.asarray(wide, float), "tpp": np.asarray(tpp, float), "memory": np.asarray(compensation, float)}
    total = logit(b, eps) + sum(parts.values())
    out = {"base": b}
    for name in ("memory", "tpp", "wide"):
        out[f"full-no-{name}"] = sigmoid(total - parts[name])
    out["full"] = sigmoid(total)
    return out


def assemble(
    base: np.ndarray,
    ids: np.ndarray,
    weights: TermWeights,
    eps: float,
    *,
    tpp_ratio: np.ndarray | None = None,
    memory: Estimate | None = None,
    session: Estimate | None = None,
) -> ServedTerms:
    """The served terms of candidates from each term's state (see the module doc).

    ``ids``: the one-hot ids' summed weights per candidate (0: the wide term is off);
    ``tpp_ratio``: ``t`` per candidate, already clipped (None: no propensity, or the TPP is off);
    ``memory`` / ``session``: ê as a function of ``pre`` (None: that memory is off or unread)."""
    b = np.asarray(base, dtype=np.float64)
    n = b.shape[0]
    zeros = np.zeros(n)
    lb = logit(b, eps)
    t = zeros if tpp_ratio is None else np.asarray(tpp_ratio, dtype=np.float64)
    wide = weights.model * lb + np.asarray(ids, dtype=np.float64)
    tpp = weights.tpp * t
    pre = sigmoid(lb + wide + tpp)
    e = zeros if memory is None else correction_input(pre, memory(pre), eps)
    s = zeros if session is None else correction_input(pre, session(pre), eps)
    compensation = weights.memory * e + weights.session * s
    inputs = {MODEL_FEATURE: lb, MEMORY_FEATURE: e, SESSION_FEATURE: s, TPP_FEATURE: t}
    return ServedTerms(base=b, wide=wide, tpp=tpp, compensation=compensation, pre=pre, inputs=inputs, eps=eps)
