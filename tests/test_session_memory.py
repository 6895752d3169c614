"""The session error memory (``models/error_memory.py``): hand-worked estimate, Redis parity,
redelivery, capacity, and its term in the served score (real Redis, DB 4, uuid prefix)."""

from __future__ import annotations

from typing import cast

import numpy as np
from redis.asyncio import Redis
from redis.crc import key_slot

from driftrec.contract.interaction import Interaction
from driftrec.models.error_memory import ServedSample, SessionMemory, session_code
from driftrec.models.served import correction_input
from driftrec.serving.scorer import Scorer
from driftrec.storage.error_memory import (
    MemoryKeys,
    delete_memory,
    estimates_from_values,
    plan_session_buckets,
    write_session_errors,
)
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from tests.test_serving import TS, catalog, make_settings, prefix, redis, set_weights, snapshot_parts  # noqa: F401


def test_hand_worked_estimate_capacity_and_redelivery() -> None:
    mem = SessionMemory(capacity=3, gamma=0.0, prior=1.0)
    for k, (y, p) in enumerate([(1, 0.2), (0, 0.4), (1, 0.5), (1, 0.9)]):
        mem.learn_one(ServedSample(np.zeros(0), p, y, 100.0 + k, f"e{k}", "u", "c0"))
    mem.learn_one(ServedSample(np.zeros(0), 0.99, 0, 103.0, "e3", "u", "c0"))  # a redelivered event changes nothing
    # the 3 newest errors: -0.4, 0.5, 0.1 -> sum 0.2, shrunk by prior 1: 0.2 / (3 + 1)
    got = mem.estimate_many("u", ["c0", "c1"], np.array([0.3, 0.3]))
    np.testing.assert_allclose(got, [0.05, 0.0], atol=1e-12)
    assert mem.estimate_many("someone else", ["c0"], np.array([0.3]))[0] == 0.0
    # γ = 1: the neighbours' labels (2 of 3 positive) against the query's current prediction
    g1 = SessionMemory(capacity=3, gamma=1.0, prior=1.0)
    for k, (y, p) in enumerate([(1, 0.2), (0, 0.4), (1, 0.5), (1, 0.9)]):
        g1.learn_one(ServedSample(np.zeros(0), p, y, 100.0 + k, f"e{k}", "u", "c0"))
    np.testing.assert_allclose(g1.estimate_many("u", ["c0"], np.array([0.3])), [(2 - 3 * 0.3) / 4], atol=1e-12)


def _stream(rng: np.random.Generator, n: int) -> tuple[list[Interaction], np.ndarray]:
    users, cats = ["a", "b", "c"], ["c0", "c1", None]
    xs = [
        Interaction(
            str(rng.choice(users)),
            f"i{k}",
            1000.0 + k // 2,
            label=int(rng.integers(2)),
            category=cats[int(rng.integers(3))],
            event_id=f"ev{k}",
        )
        for k in range(n)
    ]
    return xs, rng.uniform(0.05, 0.95, n)


async def test_redis_buckets_answer_like_the_reference(redis: Redis, prefix: str) -> None:  # noqa: F811
    keys = MemoryKeys(prefix, version=1, n_shards=4)
    ref = SessionMemory(capacity=5, gamma=0.0)
    xs, probs = _stream(np.random.default_rng(0), 120)
    for start in range(0, 120, 40):
        batch, p = xs[start : start + 40], probs[start : start + 40]
        await write_session_errors(redis, keys, batch, p, capacity=5)
        for x, q in zip(batch, p):
            ref.learn_one(ServedSample(np.zeros(0), float(q), x.label, x.ts, x.event_id, x.user_id, x.category))
    # a redelivered batch adds nothing
    assert await write_session_errors(redis, keys, xs[:40], probs[:40], capacity=5) == 0
    query = np.array([0.3, 0.6, 0.5, 0.1])
    cats = ["c0", "c1", None, "never"]
    for user in ("a", "b", "c", "nobody"):
        plan = plan_session_buckets(keys, [(user, c) for c in cats])
        values = cast(list[bytes | None], await redis.mget(plan.names))
        got, _ = estimates_from_values(values, plan, query, gamma=0.0, prior=1.0)
        np.testing.assert_allclose(got, ref.estimate_many(user, cats, query), atol=1e-12)
    # every bucket is FIFO-bounded, both keys of a bucket share a slot, and cleanup finds them
    z, s = keys.session_bucket(session_code("a", "c0"))
    assert await redis.zcard(z) == 5 and key_slot(z.encode()) == key_slot(s.encode())
    assert await delete_memory(redis, keys) > 0
    assert not [k async for k in redis.scan_iter(match=f"{prefix}:*")]


async def test_scorer_adds_the_session_term(redis: Redis, prefix: str) -> None:  # noqa: F811
    s = make_settings(prefix)
    await set_weights(redis, s, memory=0.0, session=0.4, tpp=0.0)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    cat = catalog()
    keys = MemoryKeys.from_settings(prefix, s.dsl.generation, s.memory.n_shards)
    # user u3 was served 0.2 on four c0 items and liked them all: the c0 candidates go up, others not
    seen = [Interaction("u3", f"i{j}", TS - 5, label=1, category="c0", event_id=f"s{j}") for j in (0, 4, 8, 12)]
    await write_session_errors(redis, keys, seen, np.full(4, 0.2), capacity=s.memory.session_capacity)
    scorer = Scorer(s, redis)
    assert await scorer.refresh()
    items = [f"i{j}" for j in range(8)]
    res = await scorer.score("u3", items, TS)
    order = [res.item_ids.index(i) for i in items]
    c_hat = np.array([4 * 0.8 / 5 if cat[i] == "c0" else 0.0 for i in items])
    np.testing.assert_allclose(
        res.compensation[order], 0.4 * correction_input(res.base[order], c_hat, s.serving.eps), atol=1e-12
    )
    assert (res.compensation[order][c_hat > 0] > 0).all() and (res.compensation[order][c_hat == 0] == 0).all()
    other = await scorer.score("u4", items, TS)
    assert (other.compensation == 0).all()  # another user's session says nothing about u4
    await scorer.close()
