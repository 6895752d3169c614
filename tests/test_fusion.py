"""The served score (``models/served.py``): the rule by hand, the ablations, the fusion learning
each term's weight, and -- against real Redis -- every term moving the score at a non-zero weight
and going unread at a zero one."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, cast

import numpy as np
import pytest
from redis.asyncio import Redis

from driftrec.models.served import (
    ABLATIONS,
    MEMORY_FEATURE,
    SESSION_FEATURE,
    TPP_FEATURE,
    TermWeights,
    assemble,
    correction_input,
    logit,
    sigmoid,
)
from driftrec.models.wide import WideFTRL
from driftrec.serving.scorer import Scorer
from driftrec.storage.event_state import StateKeys
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from driftrec.storage.wide import WideKeys, pack
from tests.test_serving import (  # noqa: F401
    REDIS_URL,
    TS,
    catalog,
    make_settings,
    prefix,
    redis,
    set_weights,
    snapshot_parts,
    tpp_payload,
    write_memory,
)

EPS = 1e-4


# ---- the rule, in process ---------------------------------------------------------------------
def test_parts_add_up_and_the_memory_corrects_what_was_served() -> None:
    base = np.array([0.2, 0.5, 0.9])
    ids = np.array([0.3, -0.1, 0.0])
    ratio = np.array([0.5, 0.0, -1.0])
    w = TermWeights(model=0.1, memory=1.0, session=0.5, tpp=0.4)
    seen: list[np.ndarray] = []

    def memory(pre: np.ndarray) -> np.ndarray:
        seen.append(pre)
        return 0.8 - pre  # every neighbour was a positive: ê = y − pre

    t = assemble(base, ids, w, EPS, tpp_ratio=ratio, memory=memory, session=lambda pre: np.full(3, -0.05))
    lb = logit(base, EPS)
    np.testing.assert_allclose(t.wide, 0.1 * lb + ids)
    np.testing.assert_allclose(t.tpp, 0.4 * ratio)
    np.testing.assert_allclose(t.pre, sigmoid(lb + t.wide + t.tpp))
    np.testing.assert_allclose(seen[0], t.pre)  # the memory is asked about the score served before it
    # at weight 1 the LSH memory's correction is the paper's clip(ŷ + ê) on that score
    e = logit(t.pre + (0.8 - t.pre), EPS) - logit(t.pre, EPS)
    np.testing.assert_allclose(t.inputs[MEMORY_FEATURE], e)
    np.testing.assert_allclose(t.compensation, e + 0.5 * correction_input(t.pre, np.full(3, -0.05), EPS))
    np.testing.assert_allclose(t.score, sigmoid(lb + t.wide + t.tpp + t.compensation))
    ab = t.ablations()
    assert tuple(ab) == ABLATIONS
    np.testing.assert_allclose(ab["full"], t.score)
    np.testing.assert_allclose(ab["full-no-memory"], t.pre)
    np.testing.assert_allclose(ab["full-no-tpp"], sigmoid(lb + t.wide + t.compensation))
    np.testing.assert_allclose(ab["full-no-wide"], sigmoid(lb + t.tpp + t.compensation))
    np.testing.assert_allclose(ab["base"], base)


def test_a_term_at_weight_zero_changes_nothing_and_the_score_is_the_dsl() -> None:
    base = np.array([0.3, 0.7])
    t = assemble(base, np.zeros(2), TermWeights(), EPS, tpp_ratio=np.array([2.0, -2.0]), memory=lambda p: 1 - p)
    np.testing.assert_allclose(t.score, base)
    assert (t.inputs[TPP_FEATURE] != 0).all() and (t.inputs[MEMORY_FEATURE] != 0).all()  # still learnable


def _told(told: int, pre: np.ndarray) -> np.ndarray:
    return 0.4 * (told - pre)


def test_the_fusion_learns_a_memory_that_knows_and_ignores_one_that_does_not() -> None:
    """The served weights are learned per event from what was served: a memory whose estimate
    carries the label gets weight, a TPP ratio that is noise keeps ~0."""
    rng = np.random.default_rng(0)
    ftrl = WideFTRL(ids=False)
    for _ in range(4000):
        base = float(rng.uniform(0.2, 0.8))
        y = int(rng.random() < 0.5)
        told = y if rng.random() < 0.75 else 1 - y  # the neighbours agree with the label 3 times in 4
        pre = np.array([base])
        t = assemble(
            pre,
            np.zeros(1),
            TermWeights.of({f: ftrl.weight(f) for f in (MEMORY_FEATURE, SESSION_FEATURE, TPP_FEATURE)}),
            EPS,
            tpp_ratio=np.array([rng.normal()]),
            memory=partial(_told, told),
        )
        row = {f: float(t.inputs[f][0]) for f in (MEMORY_FEATURE, SESSION_FEATURE, TPP_FEATURE)}
        ftrl.learn_one("u", "i", None, y, float(logit(pre, EPS)[0]), row)
    # FTRL's per-coordinate rate leaves a noise feature wandering by ~0.2 at this length
    assert ftrl.weight(MEMORY_FEATURE) > 0.5 > 2 * abs(ftrl.weight(TPP_FEATURE)), (
        ftrl.weight(MEMORY_FEATURE),
        ftrl.weight(TPP_FEATURE),
    )


# ---- against Redis: every term moves the score; a zero weight is not read --------------------
class RecordingRedis(Redis):
    """A real client that remembers every key its pipelines read (to see what was not read)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[bytes] = []

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def recorded(raise_on_error: bool = True) -> Any:
            for args, _ in pipe.command_stack:
                self.read.extend(a if isinstance(a, bytes) else str(a).encode() for a in args[1:])
            return await execute(raise_on_error)

        pipe.execute = recorded  # type: ignore[method-assign]
        return pipe


ITEMS = [f"i{j}" for j in range(12)]


async def _setup(client: Redis, prefix: str, **weights: float) -> Any:  # noqa: F811
    s = make_settings(prefix)
    await set_weights(client, s, **weights)
    await publish_snapshot(client, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    await write_memory(client, s, "u3", ITEMS, [1, 0] * 6)
    await client.set(StateKeys(prefix).user_tpp("u3"), tpp_payload({"c0": 0.7, "c1": 0.1, "c2": 0.1, "c3": 0.1}))
    return s


async def _scores(s: Any, client: Redis) -> Any:
    scorer = Scorer(s, client)
    await scorer.refresh()
    res = await scorer.score("u3", ITEMS, TS)
    at = {i: k for k, i in enumerate(res.item_ids)}
    return res, res.score[[at[i] for i in ITEMS]]


async def _change(term: str, client: Redis, s: Any) -> None:
    """Change the stored state of one term only."""
    if term in ("memory", "session"):  # newer events of the same user, the opposite labels
        await write_memory(client, s, "u3", ITEMS * 3, [0, 1] * 18, ids="flip")
    elif term == "tpp":
        await client.set(StateKeys(s.key_prefix).user_tpp("u3"), tpp_payload({"c0": 0.01, "c1": 0.9, "c2": 0.05}))
    elif term == "wide":
        await client.set(WideKeys(s.key_prefix).feature("u3", "u:u3"), pack(-6.0, 0.0))
        await client.set(WideKeys(s.key_prefix).feature("u3", "i:i2"), pack(9.0, 0.0))


@pytest.mark.parametrize("term", ["memory", "session", "tpp", "wide"])
async def test_each_terms_state_moves_the_served_score(redis: Redis, prefix: str, term: str) -> None:  # noqa: F811
    s = await _setup(redis, prefix, memory=0.8, session=0.8, tpp=0.8, model=0.1)
    if term == "memory":
        s.memory = s.memory.model_copy(update={"session_capacity": 0})  # the LSH memory alone
    before_res, before = await _scores(s, redis)
    await _change(term, redis, s)
    after_res, after = await _scores(s, redis)
    assert np.abs(after - before).max() > 1e-3, term
    part = {"memory": "compensation", "session": "compensation", "tpp": "tpp", "wide": "wide"}[term]
    assert not np.allclose(getattr(after_res, part), getattr(before_res, part)), term


async def test_the_dsl_snapshot_moves_the_served_score(redis: Redis, prefix: str) -> None:  # noqa: F811
    s = await _setup(redis, prefix)
    _, before = await _scores(s, redis)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts(6))
    _, after = await _scores(s, redis)
    assert np.abs(after - before).max() > 1e-4


@pytest.mark.parametrize("term", ["memory", "session", "tpp"])
async def test_a_term_whose_weight_is_zero_is_not_read(prefix: str, term: str) -> None:  # noqa: F811
    weights = {"memory": 0.5, "session": 0.5, "tpp": 0.5, term: 0.0}
    client = cast(RecordingRedis, RecordingRedis.from_url(REDIS_URL))
    try:
        s = await _setup(client, prefix, **weights)
        scorer = Scorer(s, client)
        await scorer.refresh()
        await scorer.score("u3", ITEMS, TS)  # the first answer reads every term and learns the weights
        client.read.clear()
        res = await scorer.score("u3", ITEMS, TS)
        marks = {"memory": b":t0:", "session": b":u:s", "tpp": StateKeys(prefix).user_tpp("u3").encode()}
        assert not any(marks[term] in k for k in client.read), term
        for other in {"memory", "session", "tpp"} - {term}:
            assert any(marks[other] in k for k in client.read), other
        assert np.isfinite(res.score).all()
        # the weight moves (ingest learned it): the next answer but one reads the term again
        await set_weights(client, s, **{**weights, term: 0.3})
        await scorer.score("u3", ITEMS, TS)
        client.read.clear()
        await scorer.score("u3", ITEMS, TS)
        assert any(marks[term] in k for k in client.read), term
        await scorer.close()
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


def test_decayed_ratio_at_unit_weight() -> None:
    from driftrec.models.fusion import tpp_log_ratios

    f = tpp_log_ratios(tpp_payload({"c1": 0.5, "c2": 0.0}, ts=TS - 3600), ["c1", "c2", "zz", None], TS, tau_s=3600)
    np.testing.assert_allclose(f, [math.exp(-1) * math.log(2.0), math.exp(-1) * math.log(4 * 1e-12), 0.0, 0.0])
