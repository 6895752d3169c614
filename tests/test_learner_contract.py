"""One check suite for every online learner (``models.base.OnlineLearner``), River's
``check_estimator`` in spirit: the same verbs, return values and guarantees everywhere."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.standin_ctr import StandinCTR
from driftrec.contract.interaction import Interaction
from driftrec.models.base import OnlineLearner, Snapshottable
from driftrec.models.baselines import make_peer
from driftrec.models.dsl import DSLRecommender
from driftrec.models.error_memory import ErrorMemory, RandomProjectionLSH, ServedSample, SessionMemory
from driftrec.models.prompt_tpp import PromptTPP
from driftrec.models.tpp import HomogeneousPoisson, NeuralTPP

torch.set_num_threads(1)


@dataclass
class Case:
    """A learner factory and a stream of samples it can learn (the first half) and be asked about."""

    make: Callable[[], Any]
    samples: Callable[[int], Sequence[Any]]


def _interactions(seed: int) -> list[Interaction]:
    rng = np.random.default_rng(seed)
    users, items, cats = [f"u{i}" for i in range(6)], [f"i{i}" for i in range(10)], ["c0", "c1", None]
    return [
        Interaction(
            str(rng.choice(users)),
            str(rng.choice(items)),
            1000.0 + k,
            label=int(rng.integers(2)),
            category=cats[int(rng.integers(3))],
            event_id=f"e{seed}-{k}",
        )
        for k in range(60)
    ]


def _served(seed: int) -> list[ServedSample]:
    rng = np.random.default_rng(seed)
    return [
        ServedSample(
            hidden=rng.standard_normal(8).astype(np.float32),
            served=float(rng.uniform(0.05, 0.95)),
            label=int(rng.integers(2)),
            ts=1000.0 + k,
            event_id=f"s{seed}-{k}",
            user_id=f"u{k % 3}",
            category=("c0", "c1")[k % 2],
        )
        for k in range(60)
    ]


def _sequences(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(np.cumsum(rng.exponential(1.0, 10)), rng.integers(0, 4, 10)) for _ in range(12)]


def _seeded(cls: Callable[..., Any], **kwargs: Any) -> Any:
    torch.manual_seed(0)  # the stand-in draws its initial weights from torch's global generator
    return cls(**kwargs)


CASES: dict[str, Case] = {
    "dsl": Case(lambda: DSLRecommender(n_rows=256, dim=8, hidden=8, seed=0), _interactions),
    "error-memory": Case(lambda: ErrorMemory(RandomProjectionLSH(8, 4, 4, seed=0), capacity=8), _served),
    "session-memory": Case(lambda: SessionMemory(capacity=4), _served),
    "neural-tpp": Case(lambda: NeuralTPP(4, hidden=8, seed=0), _sequences),
    "prompt-tpp": Case(lambda: PromptTPP(4, hidden=8, pool_size=4, top_n=2, prompt_len=2, seed=0), _sequences),
    "poisson": Case(lambda: HomogeneousPoisson(4), _sequences),
    "standin-ctr": Case(lambda: _seeded(StandinCTR, n_rows=256, dim=8, hidden=8), _interactions),
    "river-lr": Case(lambda: make_peer("river-lr"), _interactions),
    "vw": Case(lambda: make_peer("vw"), _interactions),
}


def _predict(learner: Any, samples: Sequence[Any]) -> np.ndarray:
    return np.asarray(learner.predict_many(samples), dtype=np.float64)


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def test_follows_the_protocol_and_learning_returns_nothing(case: Case) -> None:
    learner = case.make()
    assert isinstance(learner, OnlineLearner)
    train = case.samples(0)
    assert learner.learn_many(train[: len(train) // 2]) is None
    assert learner.learn_one(train[len(train) // 2]) is None


def test_predict_many_stacks_predict_one_and_changes_nothing(case: Case) -> None:
    learner = case.make()
    train, query = case.samples(0), case.samples(1)[:8]
    learner.learn_many(train)
    many = _predict(learner, query)
    assert many.shape[0] == len(query) and np.isfinite(many).all()
    one = np.stack([np.asarray(learner.predict_one(x), dtype=np.float64) for x in query])
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_predict(learner, query), many, rtol=0, atol=0)  # predicting is pure
    assert _predict(learner, []).shape[0] == 0


def test_learning_nothing_is_a_no_op_and_learning_something_moves_predictions(case: Case) -> None:
    learner = case.make()
    query = case.samples(1)[:8]
    before = _predict(learner, query)
    learner.learn_many([])
    np.testing.assert_allclose(_predict(learner, query), before, rtol=0, atol=0)
    learner.learn_many(case.samples(0))
    assert not np.allclose(_predict(learner, query), before, rtol=0, atol=1e-9)


def test_same_seed_same_stream_same_predictions(case: Case) -> None:
    a, b = case.make(), case.make()
    for learner in (a, b):
        learner.learn_many(case.samples(0))
    query = case.samples(1)[:8]
    np.testing.assert_allclose(_predict(a, query), _predict(b, query), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dsl", "neural-tpp", "prompt-tpp"])
def test_snapshots_predict_like_the_learner(name: str) -> None:
    case = CASES[name]
    learner = case.make()
    assert isinstance(learner, Snapshottable) and isinstance(learner, OnlineLearner)
    learner.learn_many(case.samples(0))
    clone = type(learner).from_bytes(learner.to_bytes())  # type: ignore[attr-defined]  # each class's own constructor
    query = case.samples(1)[:8]
    np.testing.assert_allclose(_predict(clone, query), _predict(learner, query), rtol=1e-6, atol=1e-7)
