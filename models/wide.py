"""The wide part of the fast path: a per-event FTRL-Proximal logistic model on top of the DSL logit.

Why it exists: the deep sparse model learns in micro-batches and reaches serving once per
snapshot, so within a user's session (ML-100K: half of a user's consecutive events share a
timestamp, 84 % are under 60 s apart) it has not seen the session yet. A per-event learner has,
and a per-event FTRL over one-hot ids is as strong as Vowpal Wabbit on this data
(``research/fast_path_dev.md``). This is ReLoop2's slow-fast split with a second fast learner
beside the error memory: ingest steps it per event, the scorer reads it in its one round trip.

Form (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013, algorithm 1)::

    logit = logit(base) + w_m · logit(base) + Σ_f w_f          (features f: one-hot, value 1)
    w_f   = 0                                                   if |z_f| ≤ L1
          = −(z_f − sign(z_f)·L1) / ((β + √n_f)/α + L2)          otherwise

with ``base`` the DSL probability that was served (its logit is the offset, so with no data the
wide part leaves the model as it is) and ``m`` a real-valued feature, the DSL logit itself: its
weight learns how far to trust the model beside the ids, which a plain sum cannot (the dev study:
a plain sum is over-confident, log-loss 0.6115 vs 0.6005 with the learned weight).

Features: ``b`` (bias), ``u:<user>``, ``i:<item>``, ``c:<category>``, ``uc:<user>|<category>``.
State is ``(z, n)`` per feature; an update adds ``(Δz, Δn)``, so redelivered or concurrent
updates compose as sums (``storage/wide.py`` applies each event's deltas once).

Defaults (``alpha`` 0.5 = VW's default rate, ``beta`` 1, ``L1`` 0, ``L2`` 1) were chosen on
ML-100K events 25,000-50,000 only (``research/fast_path_dev.md`` lists every setting tried).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MODEL_FEATURE = "m"
BIAS_FEATURE = "b"


def user_features(user_id: str, category: str | None) -> list[str]:
    """The features that belong to the user (stored beside the user's state)."""
    out = [f"u:{user_id}"]
    if category:
        out.append(f"uc:{user_id}|{category}")
    return out


def shared_features(item_id: str, category: str | None) -> list[str]:
    """The features shared by every user (bias, item, category); the model feature is separate."""
    out = [BIAS_FEATURE, f"i:{item_id}"]
    if category:
        out.append(f"c:{category}")
    return out


def features(user_id: str, item_id: str, category: str | None) -> list[str]:
    """Every one-hot feature of ``(user, item, category)``."""
    return shared_features(item_id, category) + user_features(user_id, category)


def offset_logit(base: np.ndarray, eps: float) -> np.ndarray:
    """The DSL logit the wide part adds to (``base`` kept in ``[eps, 1 − eps]``, as serving does)."""
    p = np.clip(np.asarray(base, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _sigmoid(t: float) -> float:
    t = max(min(t, 35.0), -35.0)
    return 1.0 / (1.0 + math.exp(-t))


@dataclass(frozen=True)
class FTRLParams:
    """FTRL-Proximal's four hyper-parameters (see the module doc)."""

    alpha: float = 0.5
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 1.0

    def weight(self, z: float, n: float) -> float:
        if abs(z) <= self.l1:
            return 0.0
        return -(z - math.copysign(self.l1, z)) / ((self.beta + math.sqrt(n)) / self.alpha + self.l2)

    def weights(self, z: np.ndarray, n: np.ndarray) -> np.ndarray:
        """:meth:`weight` over arrays (the scorer's path)."""
        shrunk = np.sign(z) * np.maximum(np.abs(z) - self.l1, 0.0)
        out: np.ndarray = -shrunk / ((self.beta + np.sqrt(n)) / self.alpha + self.l2)
        return out


@dataclass
class WideStep:
    """One event's update: the prediction it was learned from and the deltas per feature."""

    prediction: float
    deltas: dict[str, tuple[float, float]]  # feature -> (Δz, Δn)


class WideFTRL:
    """The wide model over a local view of ``(z, n)``: ``predict_one`` / ``learn_one`` in River's
    style. The view is what ``storage/wide.py`` read for a batch; ``learn_one`` updates it in place
    (so later events of the batch see earlier ones) and returns the deltas to write back.
    """

    def __init__(self, params: FTRLParams | None = None, state: Mapping[str, tuple[float, float]] | None = None):
        self.params = params or FTRLParams()
        self.state: dict[str, tuple[float, float]] = dict(state or {})

    def weight(self, feature: str) -> float:
        z, n = self.state.get(feature, (0.0, 0.0))
        return self.params.weight(z, n)

    def _inputs(self, user_id: str, item_id: str, category: str | None, offset: float) -> list[tuple[str, float]]:
        return [(f, 1.0) for f in features(user_id, item_id, category)] + [(MODEL_FEATURE, offset)]

    def logit_one(self, user_id: str, item_id: str, category: str | None, offset: float = 0.0) -> float:
        """``offset`` is the DSL logit (0 without a model: ``base`` 0.5)."""
        return offset + sum(self.weight(f) * v for f, v in self._inputs(user_id, item_id, category, offset))

    def predict_one(self, user_id: str, item_id: str, category: str | None, offset: float = 0.0) -> float:
        return _sigmoid(self.logit_one(user_id, item_id, category, offset))

    def learn_one(self, user_id: str, item_id: str, category: str | None, label: int, offset: float = 0.0) -> WideStep:
        """One FTRL step on the log-loss of ``label``; returns what to add to the stored state."""
        p = self.predict_one(user_id, item_id, category, offset)
        g = p - float(label)
        deltas: dict[str, tuple[float, float]] = {}
        for f, v in self._inputs(user_id, item_id, category, offset):
            gi = g * v
            if gi == 0.0:
                continue
            z, n = self.state.get(f, (0.0, 0.0))
            w = self.params.weight(z, n)
            sigma = (math.sqrt(n + gi * gi) - math.sqrt(n)) / self.params.alpha
            dz, dn = gi - sigma * w, gi * gi
            self.state[f] = (z + dz, n + dn)
            deltas[f] = (dz, dn)
        return WideStep(p, deltas)


def wide_terms(
    params: FTRLParams,
    values: Mapping[str, tuple[float, float]],
    user_id: str,
    items: Sequence[str],
    categories: Sequence[str | None],
    offsets: np.ndarray,
) -> np.ndarray:
    """The wide part's logit term per candidate, *beyond* the offset: ``w_m·offset + Σ w_f``
    (``values``: the stored ``(z, n)`` of the features read; missing ones are 0)."""
    names = sorted(values)
    idx = {f: j for j, f in enumerate(names)}
    if names:
        zn = np.array([values[f] for f in names], dtype=np.float64)
        w = params.weights(zn[:, 0], zn[:, 1])
    else:
        w = np.zeros(0)

    def get(f: str) -> float:
        j = idx.get(f)
        return 0.0 if j is None else float(w[j])

    out = np.empty(len(items), dtype=np.float64)
    w_m = get(MODEL_FEATURE)
    for k, (item, cat) in enumerate(zip(items, categories)):
        out[k] = w_m * float(offsets[k]) + sum(get(f) for f in features(user_id, item, cat))
    return out


def features_of_request(user_id: str, items: Iterable[str], categories: Iterable[str | None]) -> list[str]:
    """Every feature a request's candidates need, each once (plus the model feature)."""
    seen: dict[str, None] = {MODEL_FEATURE: None}
    for item, cat in zip(items, categories):
        for f in features(user_id, item, cat):
            seen.setdefault(f, None)
    return list(seen)
