"""The ReLoop2 error memory in real Redis (DB 3, a uuid prefix per test, keys deleted after)."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from redis.asyncio import Redis
from redis.crc import key_slot

from benchmarks.standin_ctr import StandinCTR
from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.error_memory import ErrorMemory, RandomProjectionLSH, ServedSample, compensate
from driftrec.models.wide import WideFTRL
from driftrec.shift import inject_genre_flip, pick_genre_flip, prequential_with_memory, segment_metrics, shifted_mask
from driftrec.storage.error_memory import (
    ENTRY_BYTES,
    BucketNames,
    MemoryKeys,
    delete_memory,
    learn_and_write,
    read_compensation,
    read_estimates,
    write_errors,
)
from driftrec.storage.served_memory import KeyView, ServedErrorMemories

REDIS_URL = "redis://127.0.0.1:6379/3"
DIM = 8


def _served(xs: list[Interaction], probs: np.ndarray, hidden: np.ndarray) -> list[ServedSample]:
    return [
        ServedSample(hidden=h, served=float(p), label=x.label, ts=x.ts, event_id=x.event_id)
        for x, p, h in zip(xs, probs, hidden)
    ]


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment without Redis
        pytest.fail(f"no Redis at {REDIS_URL} (these tests need a real one): {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    name = f"drtest-em-{uuid.uuid4().hex}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await redis.unlink(*keys)


def _batch(
    rng: np.random.Generator, start: int, n: int, n_clusters: int = 6
) -> tuple[list[Interaction], np.ndarray, np.ndarray]:
    """Clustered hidden vectors (so buckets fill up and evict) with cluster-dependent errors."""
    centres = np.random.default_rng(99).standard_normal((n_clusters, DIM))
    cl = rng.integers(0, n_clusters, n)
    hidden = (centres[cl] + 0.05 * rng.standard_normal((n, DIM))).astype(np.float32)
    probs = rng.uniform(0.05, 0.95, n)
    labels = (rng.uniform(size=n) < (cl % 2) * 0.8 + 0.1).astype(int)
    xs = [
        Interaction(
            user_id=f"u{i}",
            item_id=f"i{i}",
            ts=1_000.0 + (start + i) // 3,
            label=int(labels[i]),
            event_id=f"ev{start + i}",
        )
        for i in range(n)
    ]
    return xs, probs, hidden


async def _all_keys(redis: Redis, prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]


async def test_redis_store_answers_like_the_in_process_reference(redis: Redis, prefix: str) -> None:
    rng = np.random.default_rng(0)
    lsh = RandomProjectionLSH(DIM, 4, 6, seed=3, version=1)
    keys = MemoryKeys(prefix, version=1, n_shards=4)
    ref = ErrorMemory(lsh, capacity=5, lam=0.5, prior=1.0)
    for b in range(4):
        xs, probs, hidden = _batch(rng, b * 60, 60)
        added = await write_errors(redis, keys, lsh, xs, probs, hidden, capacity=5)
        ref.learn_many(_served(xs, probs, hidden))
        assert added == ref.last_added
    _, q_probs, q_hidden = _batch(rng, 10_000, 40)
    q_hidden = np.vstack([q_hidden, rng.standard_normal((5, DIM)).astype(np.float32)])  # some empty buckets
    q_probs = np.concatenate([q_probs, np.full(5, 0.5)])
    e_redis, w_redis = await read_estimates(redis, keys, lsh, q_hidden, q_probs, prior=1.0)
    e_ref, w_ref = ref.estimate_many(q_hidden, q_probs)
    np.testing.assert_allclose(e_redis, e_ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(w_redis, w_ref)
    assert (w_ref > 0).sum() >= 40
    delta = await read_compensation(redis, keys, lsh, q_hidden, q_probs, lam=0.5, prior=1.0)
    np.testing.assert_allclose(q_probs + delta, ref.compensate_many(q_hidden, q_probs), rtol=0, atol=1e-12)
    assert ((q_probs + delta > 0) & (q_probs + delta < 1)).all()
    # the recency-weighted estimate agrees too, and so does every gamma
    e_r, _ = await read_estimates(redis, keys, lsh, q_hidden, q_probs, prior=1.0, half_life_s=20.0, now=1_100.0)
    ref.half_life_s = 20.0
    np.testing.assert_allclose(e_r, ref.estimate_many(q_hidden, q_probs, now=1_100.0)[0], rtol=0, atol=1e-12)
    for gamma in (0.0, 0.3):
        e_g, _ = await read_estimates(redis, keys, lsh, q_hidden, q_probs, gamma=gamma, prior=1.0)
        ref.gamma, ref.half_life_s = gamma, 0.0
        np.testing.assert_allclose(e_g, ref.estimate_many(q_hidden, q_probs)[0], rtol=0, atol=1e-12)


async def test_rewriting_a_batch_changes_nothing(redis: Redis, prefix: str) -> None:
    rng = np.random.default_rng(1)
    lsh = RandomProjectionLSH(DIM, 3, 5, seed=0)
    keys = MemoryKeys(prefix, version=0)
    xs, probs, hidden = _batch(rng, 0, 80)
    first = await write_errors(redis, keys, lsh, xs, probs, hidden, capacity=8)
    assert first > 0
    snapshot = {k: await redis.dump(k) for k in await _all_keys(redis, prefix)}
    e_before, _ = await read_estimates(redis, keys, lsh, hidden, probs)
    # redelivery, even with a different prediction (the model moved on), is a no-op
    assert await write_errors(redis, keys, lsh, xs, np.clip(probs + 0.3, 0, 1), hidden, capacity=8) == 0
    assert {k: await redis.dump(k) for k in await _all_keys(redis, prefix)} == snapshot
    np.testing.assert_array_equal((await read_estimates(redis, keys, lsh, hidden, probs))[0], e_before)


async def test_capacity_bounds_every_bucket(redis: Redis, prefix: str) -> None:
    rng = np.random.default_rng(2)
    lsh = RandomProjectionLSH(DIM, 2, 3, seed=0)
    keys = MemoryKeys(prefix, version=0, n_shards=2)
    for b in range(5):
        xs, probs, hidden = _batch(rng, b * 100, 100, n_clusters=3)
        await write_errors(redis, keys, lsh, xs, probs, hidden, capacity=7)
    zsets = [k for k in await _all_keys(redis, prefix) if k.endswith(b":z")]
    assert zsets
    for z in zsets:
        card = await redis.zcard(z)
        assert 1 <= card <= 7
        snap = await redis.get(z[:-2] + b":s")
        assert snap is not None and len(snap) == ENTRY_BYTES * card  # packed (ts, y, ŷ) float64 triples
        # the kept entries are the newest event times of the bucket
        newest = await redis.zrange(z, -1, -1, withscores=True)
        assert float(newest[0][1]) >= 1_000.0
    assert sum([await redis.zcard(z) for z in zsets]) <= 7 * len(zsets)
    assert any([await redis.zcard(z) == 7 for z in zsets])


async def test_ttl_is_set_on_every_key(redis: Redis, prefix: str) -> None:
    rng = np.random.default_rng(3)
    lsh = RandomProjectionLSH(DIM, 2, 4, seed=0)
    keys = MemoryKeys(prefix, version=0)
    xs, probs, hidden = _batch(rng, 0, 30)
    await write_errors(redis, keys, lsh, xs, probs, hidden, capacity=8, ttl_s=120)
    all_keys = await _all_keys(redis, prefix)
    assert all_keys
    for k in all_keys:
        assert 0 < await redis.ttl(k) <= 120
    await write_errors(redis, keys, lsh, xs, probs, hidden, capacity=8, ttl_s=0)
    assert all([0 < await redis.ttl(k) <= 120 for k in all_keys])  # ttl_s=0 leaves expiry alone


async def test_keys_carry_hash_tags_and_versions_are_isolated(redis: Redis, prefix: str) -> None:
    rng = np.random.default_rng(4)
    lsh1 = RandomProjectionLSH(DIM, 3, 5, seed=0, version=1)
    lsh2 = RandomProjectionLSH(DIM, 3, 5, seed=0, version=2)
    k1, k2 = MemoryKeys(prefix, 1), MemoryKeys(prefix, 2)
    xs, probs, hidden = _batch(rng, 0, 50)
    await write_errors(redis, k1, lsh1, xs, probs, hidden, capacity=8)
    keys = await _all_keys(redis, prefix)
    for k in keys:
        text = k.decode()
        assert text.count("{") == 1 and text.index("{") < text.index("}")
        assert text[text.index("{") + 1 : text.index("}")].startswith("v1:")
    for z in [k for k in keys if k.endswith(b":z")]:
        assert key_slot(z) == key_slot(z[:-2] + b":s")
    e2, w2 = await read_estimates(redis, k2, lsh2, hidden, probs)
    assert (e2 == 0).all() and (w2 == 0).all()
    assert (await read_estimates(redis, k1, lsh1, hidden, probs))[1].min() > 0
    with pytest.raises(ValueError):
        await write_errors(redis, k2, lsh1, xs, probs, hidden, capacity=8)
    with pytest.raises(ValueError):
        MemoryKeys("bad{prefix", 1)
    assert await delete_memory(redis, k1) == len(keys)


async def test_learn_and_write_with_the_standin_model(redis: Redis, prefix: str) -> None:
    torch.manual_seed(0)
    model = StandinCTR(n_rows=1 << 10, dim=8, hidden=DIM)
    lsh = RandomProjectionLSH(DIM, 4, 6, seed=0)
    keys = MemoryKeys(prefix, 0)
    xs = [Interaction(f"u{i % 7}", f"i{i % 11}", 1_000.0 + i, label=i % 2, event_id=f"e{i}") for i in range(40)]
    xs.append(Interaction("u0", "i0", 2_000.0))  # unlabelled impression: served, not stored
    written, probs, hidden = await learn_and_write(redis, keys, lsh, model, xs, capacity=16)
    assert probs.shape == (41,) and hidden.shape == (41, DIM) and hidden.dtype == np.float32
    ref = ErrorMemory(lsh, capacity=16)
    ref.learn_many(_served(xs[:40], probs[:40], hidden[:40]))
    assert written == ref.last_added > 0
    delta = await read_compensation(redis, keys, lsh, hidden, probs)
    np.testing.assert_allclose(probs + delta, compensate(probs, ref.estimate_many(hidden, probs)[0]), atol=1e-12)


@pytest.mark.parametrize(
    ("learned", "key_every"),
    [(False, 0), (True, 0), (True, 8)],
    ids=["fixed-lambda", "learned-weight", "learned-weight-key-snapshot"],
)
async def test_compensation_cuts_logloss_after_an_injected_genre_flip(
    redis: Redis, prefix: str, learned: bool, key_every: int
) -> None:
    """ML-100K, labels of the most frequent genre flip at 60 % of the stream: within the first
    2,000 events after the flip, the memory-compensated predictions must have lower log-loss on
    the flipped genre than the same model uncompensated (same run, same served base model) --
    at a fixed λ, and at the weight the product's fusion learns per event from what was served,
    with the memory hashed by the live model or, as the product keys it, by a frozen copy
    renewed every ``key_every`` batches."""
    from driftrec.streams.datasets import load_ml100k_interactions

    torch.manual_seed(0)
    torch.set_num_threads(1)
    stream = load_ml100k_interactions(limit=16_000)
    flip = pick_genre_flip(stream, at_fraction=0.6)
    shifted = inject_genre_flip(stream, flip)
    model = StandinCTR()
    lsh = RandomProjectionLSH(model.hidden_dim, 8, 10, seed=0)
    keys = MemoryKeys(prefix, 0)
    trace = await prequential_with_memory(
        redis,
        keys,
        lsh,
        model,
        shifted,
        batch_size=256,
        capacity=32,
        write_from=int(0.4 * len(shifted)),
        fusion=WideFTRL(ids=False) if learned else None,
        key_every=key_every,
    )
    if key_every:  # one frozen copy per key_every batches, each with buckets of its own
        batches = math.ceil(len(shifted) / 256)
        assert len(trace.key_versions) == math.ceil(batches / key_every)
        assert all(k.space == "k" for k in trace.key_versions)
        for k in trace.key_versions:
            await delete_memory(redis, k)
    y, p_base, p_mem = trace.arrays()
    seg = segment_metrics(y, p_base, p_mem, shifted_mask(shifted, flip, horizon_events=2_000))
    assert seg["n"] > 200
    assert seg["logloss_memory"] < seg["logloss_base"], seg
    if learned:
        assert trace.memory_weight[-1] > 0.0, trace.memory_weight[-10:]


async def test_sums_before_count_only_earlier_events(redis: Redis, prefix: str) -> None:
    """The fusion writer's as-of read: whatever was written since (the event itself, later events), an
    event's estimate is the one its buckets gave from strictly earlier entries."""
    s = Settings(key_prefix=prefix)
    # capacities above the batch: what a FIFO has evicted since cannot be read as of any time
    s.memory = s.memory.model_copy(update={"n_tables": 2, "n_bits": 2, "session_capacity": 128, "bucket_capacity": 128})
    memories = ServedErrorMemories(redis, s)
    names = BucketNames(
        MemoryKeys(prefix, 1, s.memory.n_shards, space="k"),
        RandomProjectionLSH(DIM, s.memory.n_tables, s.memory.n_bits, seed=s.memory.seed, version=1),
    )
    view = KeyView(1, None, None, names)  # type: ignore[arg-type]  # hidden vectors given, no model needed
    rng = np.random.default_rng(3)
    xs, probs, hidden = _batch(rng, 0, 60, n_clusters=2)
    xs = [
        Interaction(user_id="u", item_id=x.item_id, ts=x.ts, label=x.label, event_id=x.event_id, category="c")
        for x in xs
    ]
    first, later = xs[:30], xs[30:]
    await memories.write(first, probs[:30], (view, hidden[:30]))
    q = probs[30:31]
    sums = await memories.sums_before(later[:1], [(view, hidden[30:31])])
    assert sums.session is not None and sums.lsh is not None
    expected_lsh, expected_session = sums.lsh.estimate(q), sums.session.estimate(q)
    await memories.write(later, probs[30:], (view, hidden[30:]))  # the event itself and later ones land
    got = await memories.sums_before(later[:1], [(view, hidden[30:31])])
    assert got.session is not None and got.lsh is not None
    assert np.abs(expected_session).sum() > 0 and np.abs(expected_lsh).sum() > 0
    np.testing.assert_allclose(got.session.estimate(q), expected_session, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.lsh.estimate(q), expected_lsh, rtol=0, atol=1e-12)
    # and an event after all of them sees all 60 (the as-of prefix is not stuck at the first write)
    tail = [Interaction(user_id="u", item_id="x", ts=1e6, label=1, event_id="z", category="c")]
    everything = await memories.sums_before(tail, [(view, hidden[:1])])
    assert everything.session is not None
    assert everything.session.estimate(probs[:1])[0] != got.session.estimate(q)[0]
