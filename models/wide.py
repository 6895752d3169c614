"""The fast path's last layer: a per-event FTRL-Proximal logistic model over ids and the other terms.

Why it exists: the deep sparse model learns in micro-batches and reaches serving once per
snapshot, so within a user's session (ML-100K: half of a user's consecutive events share a
timestamp, 84 % are under 60 s apart) it has not seen the session yet. A per-event learner has,
and a per-event FTRL over one-hot ids is as strong as Vowpal Wabbit on this data
(``research/fast_path_dev.md``). This is ReLoop2's slow-fast split with a second fast learner
beside the error memory: ingest steps it per event, the scorer reads it in its one round trip.

Form (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013, algorithm 1)::

    logit = logit(base) + w_m·logit(base) + w_e·e + w_s·s + w_t·t + Σ_f w_f    (one-hot f, value 1)
    w     = 0                                                   if |z| ≤ L1
          = −(z − sign(z)·L1) / ((β + √n)/α + L2)                 otherwise, per feature

with ``base`` the DSL probability that was served (its logit is the offset, so with no data the
layer serves the DSL as it is) and real-valued inputs: ``m`` the DSL logit itself (how far to
trust the model beside the ids), and, with ``wide.term_inputs``, ``e`` and ``s`` the error and
session memories' estimates at unit weight as logit deltas (``logit(base + ê) − logit(base)``)
and ``t`` the TPP log ratio at unit weight, so the layer would also learn per event what each
term adds beside the ids (off by default: on the dev segment, events 25,000-50,000 at an
event-time lag of 1 s, AUC 0.7238 without them vs 0.7211 with them).

This form is the dev study's (``research/fast_path_dev.md``: on the dev segment the DSL plus an
FTRL with a learned weight on the DSL logit gave 0.7245 / 0.6005, the plain sum 0.7250 / 0.6115).
Two detours were measured on the demo slice before returning to it, and are reported as such,
not used to choose: the layer added to the terms as the trainer fuses them (0.7169 AUC) and
stacked on them with the term inputs (0.7345); a per-event learner beside terms weighed without
it double counts what both carry.

One-hot features: ``b`` (bias), ``u:<user>``, ``i:<item>``, ``c:<category>``, ``uc:<user>|<category>``.
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

MODEL_FEATURE = "m"  # the DSL logit
MEMORY_FEATURE = "e"  # the error memory's correction, logit delta at unit weight
SESSION_FEATURE = "s"  # the session memory's, likewise
TPP_FEATURE = "t"  # the TPP log ratio at unit weight
TERM_FEATURES = (MEMORY_FEATURE, SESSION_FEATURE, TPP_FEATURE)
REAL_FEATURES = (MODEL_FEATURE, *TERM_FEATURES)
BIAS_FEATURE = "b"


USER_FEATURE_PREFIXES = ("u:", "uc:")  # features stored beside the user's state (storage/wide.py)


def user_feature(user_id: str) -> str:
    return f"u:{user_id}"


def item_feature(item_id: str) -> str:
    return f"i:{item_id}"


def category_feature(category: str) -> str:
    return f"c:{category}"


def user_category_feature(user_id: str, category: str) -> str:
    return f"uc:{user_id}|{category}"


def user_features(user_id: str, category: str | None) -> list[str]:
    """The features that belong to the user (stored beside the user's state)."""
    out = [user_feature(user_id)]
    if category:
        out.append(user_category_feature(user_id, category))
    return out


def shared_features(item_id: str, category: str | None) -> list[str]:
    """The features shared by every user (bias, item, category); the model feature is separate."""
    out = [BIAS_FEATURE, item_feature(item_id)]
    if category:
        out.append(category_feature(category))
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

    @staticmethod
    def _inputs(
        user_id: str, item_id: str, category: str | None, offset: float, terms: Mapping[str, float] | None
    ) -> list[tuple[str, float]]:
        out = [(f, 1.0) for f in features(user_id, item_id, category)] + [(MODEL_FEATURE, offset)]
        return out + [(f, float(v)) for f, v in (terms or {}).items()]

    def logit_one(
        self,
        user_id: str,
        item_id: str,
        category: str | None,
        dsl_logit: float = 0.0,
        terms: Mapping[str, float] | None = None,
        offset: float | None = None,
    ) -> float:
        """``dsl_logit``: the DSL's (0 without a model: ``base`` 0.5); ``terms``: the other terms'
        inputs by feature name (``TERM_FEATURES``, missing ones 0); ``offset``: what the layer
        adds to (default: the DSL logit)."""
        inputs = self._inputs(user_id, item_id, category, dsl_logit, terms)
        start = dsl_logit if offset is None else offset
        return start + sum(self.weight(f) * v for f, v in inputs)

    def predict_one(
        self,
        user_id: str,
        item_id: str,
        category: str | None,
        dsl_logit: float = 0.0,
        terms: Mapping[str, float] | None = None,
        offset: float | None = None,
    ) -> float:
        return _sigmoid(self.logit_one(user_id, item_id, category, dsl_logit, terms, offset))

    def learn_one(
        self,
        user_id: str,
        item_id: str,
        category: str | None,
        label: int,
        dsl_logit: float = 0.0,
        terms: Mapping[str, float] | None = None,
        offset: float | None = None,
    ) -> WideStep:
        """One FTRL step on the log-loss of ``label``; returns what to add to the stored state."""
        p = self.predict_one(user_id, item_id, category, dsl_logit, terms, offset)
        g = p - float(label)
        deltas: dict[str, tuple[float, float]] = {}
        for f, v in self._inputs(user_id, item_id, category, dsl_logit, terms):
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
    dsl_logits: np.ndarray,
    terms: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The layer's logit per candidate beyond its offset (the DSL logit): ``w_m·logit(base) +
    Σ w_r·r + Σ w_f`` (``values``: the stored ``(z, n)`` of the features read, missing ones 0;
    ``terms``: each term input per candidate).

    Summed by kind rather than per feature string: a candidate's item weight is one dict lookup,
    and the category and user × category weights are taken once per distinct category (building
    ``features(...)`` per candidate was the scorer's largest cost at 1,000 candidates)."""
    names = list(values)
    if names:
        zn = np.array([values[f] for f in names], dtype=np.float64)
        weight = dict(zip(names, params.weights(zn[:, 0], zn[:, 1]).tolist()))
    else:
        weight = {}
    by_category = {
        c: weight.get(category_feature(c), 0.0) + weight.get(user_category_feature(user_id, c), 0.0) if c else 0.0
        for c in dict.fromkeys(categories)
    }
    constant = weight.get(BIAS_FEATURE, 0.0) + weight.get(user_feature(user_id), 0.0)
    n = len(items)
    out: np.ndarray = weight.get(MODEL_FEATURE, 0.0) * np.asarray(dsl_logits, dtype=np.float64)[:n] + constant
    out += np.fromiter((weight.get(item_feature(x), 0.0) for x in items), dtype=np.float64, count=n)
    out += np.fromiter(map(by_category.__getitem__, categories), dtype=np.float64, count=n)
    for f, column in (terms or {}).items():
        out += weight.get(f, 0.0) * np.asarray(column, dtype=np.float64)
    return out


def term_inputs(
    base: np.ndarray, e_hat: np.ndarray, c_hat: np.ndarray, tpp_ratio: np.ndarray, eps: float
) -> dict[str, np.ndarray]:
    """The other terms as this layer's inputs: the memories' estimates as logit deltas at unit
    weight (``base + ê`` kept in ``[eps, 1 − eps]``) and the TPP log ratio (already clipped)."""
    b = np.clip(np.asarray(base, dtype=np.float64), eps, 1.0 - eps)
    lb = np.log(b) - np.log1p(-b)

    def delta(est: np.ndarray) -> np.ndarray:
        p = np.clip(b + np.asarray(est, dtype=np.float64), eps, 1.0 - eps)
        out: np.ndarray = np.log(p) - np.log1p(-p) - lb
        return out

    return {MEMORY_FEATURE: delta(e_hat), SESSION_FEATURE: delta(c_hat), TPP_FEATURE: np.asarray(tpp_ratio, float)}


def features_of_request(user_id: str, items: Iterable[str], categories: Iterable[str | None]) -> list[str]:
    """Every feature a request's candidates need, each once (plus the model feature)."""
    items, categories = list(items), list(categories)
    seen: dict[str, None] = dict.fromkeys(REAL_FEATURES)
    seen.setdefault(BIAS_FEATURE, None)
    seen.update(dict.fromkeys(map(item_feature, items)))
    for cat in dict.fromkeys(categories):
        if cat:
            seen.update(dict.fromkeys((category_feature(cat), user_category_feature(user_id, cat))))
    seen.setdefault(user_feature(user_id), None)
    return list(seen)
