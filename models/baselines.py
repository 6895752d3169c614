"""External online peers for the prequential evaluation, learned test-then-train in-process.

Each peer sees the same stream and the same candidates as the served model and follows the
learner contract (``models.base.OnlineLearner`` over ``Interaction``): ``predict_many(xs)``
returns probabilities, ``learn_one(x)`` learns a labelled interaction. Features are one-hot ``user``, ``item`` and
``category`` (the event's category; candidates use the category last seen for that item), the
information the DSL model gets too.

* ``river-lr``: ``river.linear_model.LogisticRegression`` (SGD, lr 0.05, L2 0): a per-user /
  per-item / per-category bias model, the classic strong baseline for MovieLens-style CTR.
* ``river-fm``: ``river.facto.FMClassifier`` (8 factors): adds pairwise user×item×category
  interactions through factorised weights.
* ``vw``: Vowpal Wabbit, logistic loss, ``-q ui`` user×item interactions, 20-bit hash.
* ``ftrl``: driftrec's own wide layer alone (``models/wide.py``: FTRL-Proximal over bias, user,
  item, category and user×category) without the DSL logit or the other terms; it shows what the
  per-event part contributes by itself.

Hyper-parameters are the libraries' usual defaults, fixed before looking at any evaluation
stream (no tuning on what is reported). Each dependency is an optional extra
(``pip install driftrec[baselines]``); a missing one raises :class:`MissingExtra` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from driftrec.contract.interaction import Interaction

PEERS = ("river-lr", "river-fm", "vw", "ftrl")


class MissingExtra(ImportError):
    """A baseline's library is not installed."""


def _require(module: str, package: str) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtra(
            f"baseline needs {package!r}: pip install 'driftrec[baselines]' (or pip install {package})"
        ) from exc


def _features(user: str, item: str, category: str | None) -> dict[str, float]:
    x = {f"u={user}": 1.0, f"i={item}": 1.0}
    if category:
        x[f"c={category}"] = 1.0
    return x


class Peer:
    """A per-event online learner of the same contract as driftrec's own (``models.base``)."""

    name = "peer"

    def predict_one(self, x: Interaction) -> float:
        return float(self.predict_many([x])[0])

    def predict_many(self, xs: Sequence[Interaction]) -> np.ndarray:
        raise NotImplementedError

    def learn_one(self, x: Interaction) -> None:
        raise NotImplementedError

    def learn_many(self, xs: Sequence[Interaction]) -> None:
        for x in xs:
            self.learn_one(x)


class RiverPeer(Peer):
    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name

    def predict_many(self, xs: Sequence[Interaction]) -> np.ndarray:
        predict = self.model.predict_proba_one
        return np.fromiter(
            (predict(_features(x.user_id, x.item_id, x.category)).get(True, 0.5) for x in xs),
            dtype=np.float64,
            count=len(xs),
        )

    def learn_one(self, x: Interaction) -> None:
        if x.label is not None:
            self.model.learn_one(_features(x.user_id, x.item_id, x.category), bool(x.label))


def river_lr(lr: float = 0.05) -> RiverPeer:
    linear_model = _require("river.linear_model", "river")
    optim = _require("river.optim", "river")
    return RiverPeer(linear_model.LogisticRegression(optimizer=optim.SGD(lr), l2=0.0), "river-lr")


def river_fm(n_factors: int = 8, seed: int = 0) -> RiverPeer:
    facto = _require("river.facto", "river")
    optim = _require("river.optim", "river")
    model = facto.FMClassifier(
        n_factors=n_factors,
        weight_optimizer=optim.SGD(0.05),
        latent_optimizer=optim.SGD(0.05),
        l2_weight=0.0,
        l2_latent=0.0,
        seed=seed,
    )
    return RiverPeer(model, "river-fm")


def _vw_token(s: str) -> str:
    # VW feature names may not contain spaces, '|' or ':'
    return s.replace(" ", "_").replace("|", "_").replace(":", "_")


class VWPeer(Peer):
    name = "vw"

    def __init__(self, bits: int = 20, lr: float = 0.5) -> None:
        pyvw = _require("vowpalwabbit", "vowpalwabbit")
        self.vw = pyvw.Workspace(
            f"--loss_function logistic --link logistic -q ui -b {bits} --learning_rate {lr} --quiet"
        )

    @staticmethod
    def _line(user: str, item: str, category: str | None, label: int | None = None) -> str:
        head = "" if label is None else ("1 " if label else "-1 ")
        cat = f" |c {_vw_token(category)}" if category else ""
        return f"{head}|u {_vw_token(user)} |i {_vw_token(item)}{cat}"

    def predict_many(self, xs: Sequence[Interaction]) -> np.ndarray:
        out = np.empty(len(xs), dtype=np.float64)
        for j, x in enumerate(xs):
            p = self.vw.predict(self._line(x.user_id, x.item_id, x.category))
            out[j] = p if math.isfinite(p) else 0.5
        return out

    def learn_one(self, x: Interaction) -> None:
        if x.label is not None:
            self.vw.learn(self._line(x.user_id, x.item_id, x.category, int(x.label)))

    def close(self) -> None:
        self.vw.finish()


class FTRLPeer(Peer):
    """The served wide layer's model without its inputs from the other terms (offset 0)."""

    name = "ftrl"

    def __init__(self) -> None:
        from driftrec.models.wide import WideFTRL

        self.model = WideFTRL()

    def predict_many(self, xs: Sequence[Interaction]) -> np.ndarray:
        return np.fromiter(
            (self.model.predict_one(x.user_id, x.item_id, x.category) for x in xs), dtype=np.float64, count=len(xs)
        )

    def learn_one(self, x: Interaction) -> None:
        if x.label is not None:
            self.model.learn_one(x.user_id, x.item_id, x.category, int(x.label))


def make_peer(name: str) -> Peer:
    if name == "river-lr":
        return river_lr()
    if name == "river-fm":
        return river_fm()
    if name == "vw":
        return VWPeer()
    if name == "ftrl":
        return FTRLPeer()
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(PEERS)}")
