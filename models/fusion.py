"""How the TPP's category propensity enters the score, and its weight learned from the stream.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

TINY_P = 1e-12  # a zero propensity counts as this, so ln(K·p) stays finite (and is then clipped)


def tpp_log_ratios(payload: bytes | None, categories: Sequence[str | None], now: float, *,
                   tau_s: float) -> np.ndarray:
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
    lut = {cat: decay * math.log(float(k) * max(float(p), TINY_P)) for cat, p in probs.items()
           if isinstance(p, (int, float)) and math.isfinite(p) and p >= 0}
    if not lut:
        return np.zeros(n)
    return np.fromiter((lut.get(c, 0.0) if c is not None else 0.0 for c in categories), dtype=np.float64, count=n)


def tpp_terms(payload: bytes | None, categories: Sequence[str | None], now: float, *, weight: float,
              tau_s: float, clip: float) -> np.ndarray:
    """The logit-space TPP term per candidate: ``clip(weight · f, −clip, clip)``."""
    if payload is None or weight == 0.0:
        return np.zeros(len(categories))
    return np.clip(weight * tpp_log_ratios(payload, categories, now, tau_s=tau_s), -clip, clip)


@dataclass
class TPPWeight:
    """Online logistic regression of the TPP term's weight, the served base logit as offset.

    ``learn_many`` takes events scored *before* they were learned (test-then-train); events
    whose feature is 0 (no propensity, unknown category) carry no gradient.
    """

    w: float = 0.5
    lr: float = 0.05
    clip: float = 2.0  # the term's bound, as in serving
    max_abs_w: float = 2.0
    _g2: float = 1e-8
    n_seen: int = 0

    def term(self, feature: np.ndarray) -> np.ndarray:
        return np.clip(self.w * np.asarray(feature, dtype=np.float64), -self.clip, self.clip)

    def predict_many(self, base_logit: np.ndarray, feature: np.ndarray) -> np.ndarray:
        z = np.asarray(base_logit, dtype=np.float64) + self.term(feature)
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def learn_many(self, base_logit: np.ndarray, feature: np.ndarray, labels: np.ndarray) -> None:
        f = np.asarray(feature, dtype=np.float64)
        active = (f != 0.0) & (np.abs(self.w * f) < self.clip)  # the clip passes no gradient
        if not active.any():
            return
        p = self.predict_many(base_logit, f)
        grad = float(np.mean((p - np.asarray(labels, dtype=np.float64))[active] * f[active]))
        self._g2 += grad * grad
        self.w = float(np.clip(self.w - self.lr * grad / math.sqrt(self._g2), -self.max_abs_w, self.max_abs_w))
        self.n_seen += int(active.sum())

    def to_bytes(self) -> bytes:
        return orjson.dumps({"tpp_weight": self.w, "g2": self._g2, "n_seen": self.n_seen})

    @classmethod
    def from_bytes(cls, data: bytes, **kwargs: float) -> TPPWeight:
        doc = orjson.loads(data)
        return cls(w=float(doc["tpp_weight"]), _g2=float(doc.get("g2", 1e-8)), n_seen=int(doc.get("n_seen", 0)),
                   **kwargs)
