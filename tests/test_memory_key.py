"""The LSH memory's key snapshot (``storage/served_memory.py``): entries are only ever compared
with queries hashed in the same hidden space, whatever snapshots were published since."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import HiddenStandardizer
from driftrec.models.served import logit
from driftrec.serving.scorer import Scorer
from driftrec.storage.client import mget
from driftrec.storage.error_memory import plan_buckets, sums_from_values, write_errors
from driftrec.storage.served_memory import KEY_PART, KeyRef, KeyViews
from driftrec.storage.snapshots import SnapshotKeys, load_pinned, pin_snapshot, publish_snapshot
from driftrec.streams.trainer import DSLTrainer
from tests.test_serving import (
    TS,
    catalog,
    make_settings,
    model_blob,
    set_weights,
    snapshot_parts,
    write_memory,
)
from tests.test_serving import prefix as prefix
from tests.test_serving import redis as redis


# ---- the part a snapshot names its key with (unit) ------------------------------------------------
def test_a_snapshot_without_a_key_is_its_own() -> None:
    assert KeyRef.of_parts({}, 7) == KeyRef(7)
    assert KeyRef.of_parts({}, None) is None
    ref = KeyRef(3, 2, 12.5)
    assert KeyRef.of_parts({KEY_PART: ref.to_bytes()}, 9) == ref
    assert ref.renewed(9, 20.0) == KeyRef(9, 3, 20.0)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        orjson.dumps({"version": 0}),
        orjson.dumps({"version": True}),
        orjson.dumps({"version": "3"}),
        orjson.dumps({"version": 3, "previous": -1}),
        orjson.dumps({"version": 3, "at": "now"}),
        b'{"version": 3, "at": 1e999}',
    ],
)
def test_a_crafted_key_part_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        KeyRef.of_parts({KEY_PART: raw}, 5)


# ---- against Redis ------------------------------------------------------------------------------
async def test_a_pin_outlives_the_store_keep_window(redis: Redis, prefix: str) -> None:
    keys = SnapshotKeys(prefix, "dsl")
    v1 = await publish_snapshot(redis, keys, {"model": b"m1"}, keep=2)
    assert await pin_snapshot(redis, keys, v1, 60.0)
    for k in range(3):
        await publish_snapshot(redis, keys, {"model": f"m{k + 2}".encode()}, keep=2)
    assert not await redis.exists(keys.blob(v1))  # the store retired it ...
    assert await load_pinned(redis, keys, v1) == {"model": b"m1"}  # ... the pin kept it
    assert 0 < await redis.ttl(keys.pinned(v1)) <= 60
    assert await pin_snapshot(redis, keys, v1, 120.0)  # renewing a pin whose blob is gone
    assert await redis.ttl(keys.pinned(v1)) > 60
    assert not await pin_snapshot(redis, keys, 999, 60.0)  # nothing to pin
    assert await load_pinned(redis, keys, 999) is None


def parts_with_stats(steps: int, **more: bytes) -> dict[str, bytes]:
    """A snapshot with its hidden statistics, as the trainer publishes it (codes then spread)."""
    model = SparseScorer.from_bytes(model_blob(steps))
    xs = [Interaction(f"u{u}", i, TS, category=c) for u in range(20) for i, c in catalog().items()]
    stats = HiddenStandardizer.fit(model.predict_with_hidden(xs)[1]).to_bytes()
    return {"model": model_blob(steps), "catalog": orjson.dumps(catalog()), "hidden_stats": stats, **more}


async def test_serving_hashes_with_the_key_snapshot_not_the_newest(redis: Redis, prefix: str) -> None:
    """Errors written under key snapshot v1 are read with v1's model after v2 (another model)
    is served, and the compensation is what v1's own hashing finds, not v2's."""
    s = make_settings(prefix)
    s.memory = s.memory.model_copy(update={"session_capacity": 0})  # the LSH memory alone
    await set_weights(redis, s, memory=1.0, tpp=0.0, model=0.0)
    keys = SnapshotKeys(prefix, "dsl")
    first = parts_with_stats(4)
    v1 = await publish_snapshot(redis, keys, first)  # names no key: its own
    old = SparseScorer.from_bytes(first["model"])
    (view_v1,) = await KeyViews(redis, s).resolve(v1, first, old, HiddenStandardizer.from_bytes(first["hidden_stats"]))
    items = [f"i{j}" for j in range(20)]
    cats = [catalog()[i] for i in items]
    xs = [
        Interaction("u3", i, TS - 10, label=1, category=c, event_id=f"e{k}")
        for k, (i, c) in enumerate(zip(items, cats))
    ]
    probs_then, _ = old.predict_with_hidden(xs)
    # written as the ingest worker writes under key v1
    m = view_v1.names
    await write_errors(redis, m.keys, m.lsh, xs, probs_then, view_v1.of_interactions(xs), capacity=32)
    assert await pin_snapshot(redis, keys, v1, 60.0)
    newer = parts_with_stats(12, **{KEY_PART: KeyRef(v1).to_bytes()})
    v2 = await publish_snapshot(redis, keys, newer)
    scorer = Scorer(s, redis)
    assert await scorer.refresh()
    assert scorer.version == v2 and scorer.current is not None
    assert [view.version for view in scorer.current.key_views] == [v1]
    res = await scorer.score("u3", items, TS)
    order = [items.index(i) for i in res.item_ids]
    # what key v1's buckets hold for these candidates, hashed by v1's model and statistics
    served = SparseScorer.from_bytes(newer["model"])
    probs, _ = served.score_candidates("u3", items, cats)
    plan = plan_buckets(m, view_v1.of_candidates("u3", items, cats))
    sums = sums_from_values(await mget(redis, plan.names), plan, gamma=s.memory.gamma, prior=s.memory.prior)
    eps = s.serving.eps
    expected = logit(np.clip(probs + sums.estimate(probs), eps, 1 - eps), eps) - logit(probs, eps)
    np.testing.assert_allclose(res.compensation, expected[order], rtol=0, atol=1e-9)
    assert (res.compensation > 0).all()  # every stored label was 1
    # the newest snapshot's own hashing would look elsewhere (it is not what serving reads)
    (view_v2,) = await KeyViews(redis, s).resolve(v2, {}, served, HiddenStandardizer.from_bytes(newer["hidden_stats"]))
    codes_v1 = m.lsh.codes(view_v1.of_candidates("u3", items, cats))
    codes_v2 = m.lsh.codes(view_v2.of_candidates("u3", items, cats))
    assert (codes_v1 != codes_v2).mean() > 0.2, (codes_v1 != codes_v2).mean()
    await scorer.close()


async def test_the_previous_key_is_read_too(redis: Redis, prefix: str) -> None:
    """After a renewal the memory is not empty: the previous key's buckets are still read."""
    s = make_settings(prefix)
    s.memory = s.memory.model_copy(update={"session_capacity": 0})
    await set_weights(redis, s, memory=1.0, tpp=0.0, model=0.0)
    keys = SnapshotKeys(prefix, "dsl")
    v1 = await publish_snapshot(redis, keys, snapshot_parts(4))
    items = [f"i{j}" for j in range(20)]
    await write_memory(redis, s, "u3", items * 2, [0] * 40)
    v2 = await publish_snapshot(redis, keys, {"model": model_blob(6), "catalog": orjson.dumps(catalog())})
    for v in (v1, v2):
        assert await pin_snapshot(redis, keys, v, 60.0)
    renewed = {"model": model_blob(6), "catalog": orjson.dumps(catalog()), KEY_PART: KeyRef(v2, v1).to_bytes()}
    await publish_snapshot(redis, keys, renewed)
    scorer = Scorer(s, redis)
    assert await scorer.refresh() and scorer.current is not None
    assert [view.version for view in scorer.current.key_views] == [v2, v1]
    res = await scorer.score("u3", items, TS)
    assert (res.compensation < 0).all()  # v2's buckets are empty: the pushes down are v1's
    # the previous key gone (its pin expired): read what is left, serve on
    await redis.delete(keys.pinned(v1))
    views = await KeyViews(redis, s).resolve(99, renewed, scorer.current.model, None)
    assert [view.version for view in views] == [v2]
    await scorer.close()


def _events(n: int, start: int = 0) -> list[Event]:
    return [
        Event(
            event_id=f"k{start + j}",
            user_id=f"u{(start + j) % 5}",
            item_id=f"i{(start + j) % 11}",
            category=catalog()[f"i{(start + j) % 11}"],
            kind="rating",
            label=1 if (start + j) % 2 else 0,
            ts=TS + start + j,
        )
        for j in range(n)
    ]


async def test_the_trainer_names_and_pins_the_key_and_renews_it(redis: Redis, prefix: str) -> None:
    s = Settings(key_prefix=prefix)
    s.dsl = s.dsl.model_copy(update={"n_rows": 1024, "dim": 8, "hidden": 8})
    keys = SnapshotKeys(prefix, "dsl")
    trainer = DSLTrainer(redis, s)
    await trainer.handle(_events(40))
    v1 = await publish_snapshot(redis, keys, await trainer.snapshot_parts())
    trainer.published(v1)
    assert trainer.memory_key is not None and trainer.memory_key.version == v1
    await trainer.handle(_events(40, 40))
    parts = await trainer.snapshot_parts()
    assert KeyRef.of_parts(parts, None) == trainer.memory_key  # the next snapshot names it ...
    assert await load_pinned(redis, keys, v1) is not None  # ... and it is pinned
    v2 = await publish_snapshot(redis, keys, parts)
    trainer.published(v2)
    assert trainer.memory_key.version == v1  # not renewed within key_every_s
    trainer.memory_key = KeyRef(v1, None, time.time() - s.memory.key_every_s)  # the period is over
    await trainer.handle(_events(40, 80))
    v3 = await publish_snapshot(redis, keys, await trainer.snapshot_parts())
    trainer.published(v3)
    assert trainer.memory_key.version == v3 and trainer.memory_key.previous == v1
    # the previous key's pin lost (expired): the next snapshot stops naming it
    await redis.delete(keys.pinned(v1), keys.blob(v1))
    assert KeyRef.of_parts(await trainer.snapshot_parts(), None) == KeyRef(v3, None, trainer.memory_key.at)
    # a trainer that takes over keeps the key the lineage named
    successor = DSLTrainer(redis, s)
    successor.restore(await trainer.snapshot_parts())
    assert successor.memory_key == trainer.memory_key


async def test_a_crafted_key_or_pin_turns_the_memory_off_not_serving(redis: Redis, prefix: str) -> None:
    """Adversarial storage: a ``memory_key`` part that is not ours, or a pin whose model does not
    load, leaves the snapshot served and the LSH memory unread (never a crash, never a mixed key)."""
    s = make_settings(prefix)
    await set_weights(redis, s, memory=1.0, tpp=0.0, model=0.0)
    keys = SnapshotKeys(prefix, "dsl")
    items = [f"i{j}" for j in range(10)]
    crafted = {"model": model_blob(4), "catalog": orjson.dumps(catalog()), KEY_PART: b'{"version": "1; DROP"}'}
    v = await publish_snapshot(redis, keys, crafted)
    scorer = Scorer(s, redis)
    assert await scorer.refresh() and scorer.version == v and scorer.current is not None
    assert scorer.current.key_views == ()
    res = await scorer.score("u3", items, TS)
    assert len(res.item_ids) == 10 and np.isfinite(res.score).all()
    await redis.hset(keys.pinned(999), mapping={"model": b"\x00not a model"})
    bad_pin = {"model": model_blob(4), "catalog": orjson.dumps(catalog()), KEY_PART: KeyRef(999).to_bytes()}
    v2 = await publish_snapshot(redis, keys, bad_pin)
    assert await scorer.refresh() and scorer.version == v2 and scorer.current is not None
    assert scorer.current.key_views == ()
    res = await scorer.score("u3", items, TS)
    assert np.isfinite(res.score).all() and (res.compensation == 0).all()
    await scorer.close()
