"""The fusion layer: a per-event FTRL-Proximal logistic model over the ids and every term's input.

Why it exists: the deep sparse model learns in micro-batches and reaches serving once per
snapshot, so within a user's session (ML-100K: half of a user's consecutive events share a
timestamp, 84 % are under 60 s apart) it has not seen the session yet. A per-event learner has,
and a per-event FTRL over one-hot ids is as strong as Vowpal Wabbit on this data
(``research/fast_path_dev.md``). It is also where the served score's weights are learned: its
real-valued inputs are the DSL logit and the other terms at unit weight, so each term's weight is
learned per event from what was served (``models/served.py`` has the rule and why).

Form (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013, algorithm 1)::

    logit = logit(base) + w_m·logit(base) + w_e·e + w_s·s + w_t·t + Σ_f w_f    (one-hot f, value 1)
    w     = 0                                                   if |z| ≤ L1
          = −(z − sign(z)·L1) / ((β + √n)/α + L2)                 otherwise, per feature

with ``base`` the DSL probability that was served (its logit is the offset, so with no data the
layer serves the DSL as it is), ``e`` and ``s`` the memories' corrections and ``t`` the TPP log
ratio (``models/served.py``). The one-hot ids are the *wide* term; ``wide.enabled`` off leaves
them out and the layer learns the term weights alone.

One-hot features: ``b`` (bias), ``u:<user>``, ``i:<item>``, ``c:<category>``, ``uc:<user>|<category>``.
State is ``(z, n)`` per feature; an update adds ``(Δz, Δn)``, so redelivered or concurrent
updates compose as sums (``storage/wide.py`` applies each event's deltas once).

Defaults (``alpha`` 0.5 = VW's default rate, ``beta`` 1, ``L1`` 0, ``L2`` 1) were chosen on
ML-100K events 25,000-50,000 only (``research/fast_path_dev.md`` lists every setting tried).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from driftrec.models.served import MODEL_FEATURE, REAL_FEATURES, logit

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
    """The DSL logit the layer adds to (``base`` kept in ``[eps, 1 − eps]``, as serving does)."""
    return logit(base, eps)


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
    # the rate of the real-valued term weights (m, e, s, t; None: alpha): each is one weight
    # shared by every event, where the ids are many weights each seen by few
    term_alpha: float | None = None

    def for_feature(self, feature: str) -> FTRLParams:
        """The parameters that ``feature``'s weight is learned with (called per feature and event:
        built once)."""
        if self.term_alpha is None or self.term_alpha == self.alpha or feature not in REAL_FEATURES:
            return self
        return self._term_params

    @cached_property
    def _term_params(self) -> FTRLParams:
        return replace(self, alpha=self.term_alpha or self.alpha, term_alpha=None)

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

    def __init__(
        self,
        params: FTRLParams | None = None,
        state: Mapping[str, tuple[float, float]] | None = None,
        ids: bool = True,
    ):
        self.params = params or FTRLParams()
        self.state: dict[str, tuple[float, float]] = dict(state or {})
        self.ids = ids  # the one-hot ids (the wide term); off: the term weights alone

    def weight(self, feature: str) -> float:
        z, n = self.state.get(feature, (0.0, 0.0))
        return self.params.for_feature(feature).weight(z, n)

    def _inputs(
        self, user_id: str, item_id: str, category: str | None, offset: float, terms: Mapping[str, float] | None
    ) -> list[tuple[str, float]]:
        ids = features(user_id, item_id, category) if self.ids else []
        out = [(f, 1.0) for f in ids] + [(MODEL_FEATURE, offset)]
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
        prediction: float | None = None,
    ) -> WideStep:
        """One FTRL step on the log-loss of ``label``; returns what to add to the stored state.
        ``prediction``: the model's own prediction for these inputs where the caller already has
        it (ingest's served score), so it is not summed again."""
        p = self.predict_one(user_id, item_id, category, dsl_logit, terms, offset) if prediction is None else prediction
        g = p - float(label)
        deltas: dict[str, tuple[float, float]] = {}
        for f, v in self._inputs(user_id, item_id, category, dsl_logit, terms):
            gi = g * v
            if gi == 0.0:
                continue
            z, n = self.state.get(f, (0.0, 0.0))
            fp = self.params.for_feature(f)
            w = fp.weight(z, n)
            sigma = (math.sqrt(n + gi * gi) - math.sqrt(n)) / fp.alpha
            dz, dn = gi - sigma * w, gi * gi
            self.state[f] = (z + dz, n + dn)
            deltas[f] = (dz, dn)
        return WideStep(p, deltas)


def layer_weights(params: FTRLParams, values: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Feature → weight from the stored ``(z, n)`` of the features read (Redis is input too: a
    value that is not finite reads as 0, so a crafted key cannot make every score NaN)."""
    out: dict[str, float] = {}
    for real in (True, False):
        names = [f for f in values if (f in REAL_FEATURES) == real]
        if names:
            p = params.for_feature(names[0])
            zn = np.array([values[f] for f in names], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                w = p.weights(zn[:, 0], zn[:, 1])
            # a stored state no step could have made (non-finite, negative n) weighs nothing
            out.update(zip(names, np.where(np.isfinite(w), w, 0.0).tolist()))
    return out


def id_logits(
    weight: Mapping[str, float], user_id: str, items: Sequence[str], categories: Sequence[str | None]
) -> np.ndarray:
    """The one-hot ids' summed weight per candidate (the wide term beyond ``w_m·logit(base)``).

    Summed by kind rather than per feature string: a candidate's item weight is one dict lookup,
    and the category and user × category weights are taken once per distinct category (building
    ``features(...)`` per candidate was the scorer's largest cost at 1,000 candidates)."""
    by_category = {
        c: weight.get(category_feature(c), 0.0) + weight.get(user_category_feature(user_id, c), 0.0) if c else 0.0
        for c in dict.fromkeys(categories)
    }
    constant = weight.get(BIAS_FEATURE, 0.0) + weight.get(user_feature(user_id), 0.0)
    n = len(items)
    out: np.ndarray = np.fromiter((weight.get(item_feature(x), 0.0) for x in items), dtype=np.float64, count=n)
    out += np.fromiter(map(by_category.__getitem__, categories), dtype=np.float64, count=n)
    return out + constant


def features_of_request(
    user_id: str, items: Iterable[str], categories: Iterable[str | None], ids: bool = True
) -> list[str]:
    """Every feature a request's candidates need, each once (the real-valued ones first; the
    one-hot ids only where ``ids``)."""
    seen: dict[str, None] = dict.fromkeys(REAL_FEATURES)
    if not ids:
        return list(seen)
    items, categories = list(items), list(categories)
    seen.setdefault(BIAS_FEATURE, None)
    seen.update(dict.fromkeys(map(item_feature, items)))
    for cat in dict.fromkeys(categories):
        if cat:
            seen.update(dict.fromkeys((category_feature(cat), user_category_feature(user_id, cat))))
    seen.setdefault(user_feature(user_id), None)
    return list(seen)
