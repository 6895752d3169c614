"""Snapshot publishing against a real Redis: atomic versions, and fencing by lease epoch."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from driftrec.storage.snapshots import (
    SnapshotKeys,
    StaleEpoch,
    acquire_lease,
    latest_version,
    load_snapshot,
    publish_snapshot,
    release_lease,
)
from tests.test_serving import REDIS_URL, prefix, redis  # noqa: F401


async def test_concurrent_publishers_never_move_latest_backwards(redis: Redis, prefix: str) -> None:  # noqa: F811
    keys = SnapshotKeys(prefix, "dsl")
    other = Redis.from_url(REDIS_URL)  # a second connection, as a second process would have
    seen: list[int] = []

    async def publisher(client: Redis, name: str) -> None:
        for k in range(15):
            version = await publish_snapshot(client, keys, {"model": f"{name}{k}".encode()}, keep=4)
            assert (await latest_version(client, keys) or 0) >= version  # latest never falls below it
            seen.append(version)

    try:
        await asyncio.gather(publisher(redis, "a"), publisher(other, "b"))
    finally:
        await other.aclose()
    assert sorted(seen) == list(range(1, 31))  # every publish got its own version
    found = await load_snapshot(redis, keys)
    assert found is not None and found[0] == 30 and found[1]["model"] in (b"a14", b"b14")
    assert not await redis.exists(keys.blob(26)) and await redis.exists(keys.blob(27))  # keep=4
    assert await load_snapshot(redis, keys, newer_than=30) is None
    with pytest.raises(ValueError):
        await publish_snapshot(redis, keys, {})


async def test_a_publisher_that_lost_its_lease_cannot_publish(redis: Redis, prefix: str) -> None:  # noqa: F811
    keys = SnapshotKeys(prefix, "dsl")
    first = await acquire_lease(redis, keys, "trainer-a", ttl_ms=150)
    assert first == 1
    assert await acquire_lease(redis, keys, "trainer-b", ttl_ms=150) is None  # held by a
    assert await acquire_lease(redis, keys, "trainer-a", ttl_ms=150) == first  # a renews, same epoch
    assert await publish_snapshot(redis, keys, {"model": b"a1"}, epoch=first) == 1

    await asyncio.sleep(0.3)  # a stalls past its lease (as under SIGSTOP)
    second = await acquire_lease(redis, keys, "trainer-b", ttl_ms=5_000)
    assert second == first + 1
    with pytest.raises(StaleEpoch, match=f"epoch {first} refused"):
        await publish_snapshot(redis, keys, {"model": b"a2"}, epoch=first)
    assert await latest_version(redis, keys) == 1  # the refused publish left no trace
    assert not await redis.exists(keys.blob(2))
    assert await acquire_lease(redis, keys, "trainer-a", ttl_ms=150) is None  # a cannot take it back
    assert await publish_snapshot(redis, keys, {"model": b"b1"}, epoch=second) == 2

    assert not await release_lease(redis, keys, "trainer-a")  # only the holder can release
    assert await release_lease(redis, keys, "trainer-b")
    assert await acquire_lease(redis, keys, "trainer-a", ttl_ms=150) == second + 1  # at once, no expiry wait
