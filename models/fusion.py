"""How the TPP's category propensity becomes the served score's input ``t``.

``t = decay · ln(K · p_u(category))``: 0 when the TPP's guess is uniform (``K·p = 1``), positive
for categories the user is likely to engage with next, ``decay = exp(−age/τ)`` fading a stale
propensity; serving clips it to ``±serving.tpp_clip``. It is a likelihood ratio, so it composes
additively with a logit. Its weight is learned with the other terms' by the fusion layer
(``models/served.py``): whether "likely to engage with this category next" means "likely to click
/ rate it highly" depends on the stream (on ML-100K, where every event is a rating and the label
is ``rating ≥ 4``, a fixed weight of 0.5 cost AUC in every prequential run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

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
