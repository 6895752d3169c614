"""Versioned model snapshots in Redis, published atomically and loaded by version; publisher leases.

Why a pointer plus immutable blobs: a publish bumps the counter, writes blob ``v`` and moves
``latest`` to ``v`` in one Lua script, so a reader that reads ``latest`` and then blob ``latest``
never sees half a snapshot, and two publishers can never move ``latest`` backwards (the counter
is bumped inside the same atomic step). Old versions stay readable for a grace period (``keep``)
so a reader that lost the race still finds the version it was told about.

Fencing. A lineage has one publisher at a time: it holds the lease (``acquire_lease``, a key
with a TTL that it renews) and publishes under the lease's *epoch*, a number that grows each time
the lease changes hands. A publish under any other epoch is refused (``StaleEpoch``), so a
publisher that stalled past its lease (a GC pause, SIGSTOP) and wakes up after a standby took
over cannot publish: it must step down. All keys share the ``{snap:<name>}`` hash tag (one Redis
Cluster slot), which the scripts rely on: they touch the blob keys they name from the counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

# KEYS: counter, latest, epoch. ARGV: epoch ('' = unfenced), keep, blob key prefix, field, value, ...
_PUBLISH = """
if ARGV[1] ~= '' then
  local current = redis.call('GET', KEYS[3])
  if current ~= ARGV[1] then return {-1, current or ''} end
end
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', ARGV[3] .. v, unpack(ARGV, 4))
redis.call('SET', KEYS[2], v)
local keep = tonumber(ARGV[2])
if v > keep then redis.call('DEL', ARGV[3] .. (v - keep)) end
return {v, ARGV[1]}
"""
# KEYS: lease, epoch. ARGV: owner, ttl_ms. Returns the epoch if the owner holds the lease now.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
if holder then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""
# KEYS: lease. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StaleEpoch(RuntimeError):
    """The publisher's epoch is no longer the lineage's: another publisher took over."""


@dataclass(frozen=True)
class SnapshotKeys:
    prefix: str
    name: str = "dsl"

    @property
    def tag(self) -> str:
        return f"{self.prefix}:{{snap:{self.name}}}"

    @property
    def counter(self) -> str:
        return f"{self.tag}:counter"

    @property
    def latest(self) -> str:
        return f"{self.tag}:latest"

    @property
    def blob_prefix(self) -> str:
        return f"{self.tag}:blob:"

    def blob(self, version: int) -> str:
        """A HASH of named parts (e.g. ``model``, ``catalog``) written together."""
        return f"{self.blob_prefix}{version}"

    def pinned(self, version: int) -> str:
        """A copy of blob ``version`` that outlives ``keep`` (``pin_snapshot``): the snapshot whose
        hidden space keys the error memory stays loadable while serving reads under it."""
        return f"{self.tag}:pin:{version}"

    @property
    def lease(self) -> str:
        """Who publishes this lineage now (a string owner id with a TTL)."""
        return f"{self.tag}:lease"

    @property
    def epoch(self) -> str:
        """How many times the lease has changed hands: the fencing token of a publish."""
        return f"{self.tag}:epoch"


async def publish_snapshot(
    redis: Redis, keys: SnapshotKeys, parts: dict[str, bytes], keep: int = 3, epoch: int | None = None
) -> int:
    """Store ``parts`` as the next version and make it the latest, in one atomic step; return its
    version. With ``epoch``, only while that is still the lineage's epoch (else ``StaleEpoch``)."""
    if not parts:
        raise ValueError("a snapshot needs at least one part")
    fields: list[str | bytes] = [x for name, blob in parts.items() for x in (name, blob)]
    script = redis.register_script(_PUBLISH)
    reply = await script(
        keys=[keys.counter, keys.latest, keys.epoch],
        args=["" if epoch is None else str(epoch), keep, keys.blob_prefix, *fields],
    )
    version = int(reply[0])
    if version < 0:
        current = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        raise StaleEpoch(
            f"{keys.tag}: publish under epoch {epoch} refused, the lineage is at epoch {current or 'none'}"
        )
    return version


# KEYS: blob, pin. ARGV: ttl_ms. Copies the blob once (a pin that exists only gets its TTL renewed).
_PIN = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('COPY', KEYS[1], KEYS[2]) == 0 then return 0 end
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""


async def pin_snapshot(redis: Redis, keys: SnapshotKeys, version: int, ttl_s: float) -> bool:
    """Keep a copy of snapshot ``version`` for ``ttl_s`` more seconds (True), whatever ``keep``
    retires meanwhile; False if neither the blob nor a pin of it exists any more."""
    script = redis.register_script(_PIN)
    done = await script(keys=[keys.blob(version), keys.pinned(version)], args=[max(int(ttl_s * 1000), 1)])
    return bool(done)


async def load_pinned(redis: Redis, keys: SnapshotKeys, version: int) -> dict[str, bytes] | None:
    """The parts of pinned snapshot ``version`` (``pin_snapshot``), or None if it is not pinned."""
    parts = cast(dict[bytes, bytes], await redis.hgetall(keys.pinned(version)))
    return {k.decode(): v for k, v in parts.items()} if parts else None


async def acquire_lease(redis: Redis, keys: SnapshotKeys, owner: str, ttl_ms: int) -> int | None:
    """Take or renew the lineage's publisher lease for ``ttl_ms``; the epoch to publish under if
    ``owner`` holds it now, ``None`` while someone else does."""
    script = redis.register_script(_ACQUIRE)
    epoch = await script(keys=[keys.lease, keys.epoch], args=[owner, ttl_ms])
    return None if epoch is None else int(epoch)


async def release_lease(redis: Redis, keys: SnapshotKeys, owner: str) -> bool:
    """Give the lease up (a clean stop), so a standby need not wait for it to expire."""
    script = redis.register_script(_RELEASE)
    return bool(await script(keys=[keys.lease], args=[owner]))


async def latest_version(redis: Redis, keys: SnapshotKeys) -> int | None:
    raw = await redis.get(keys.latest)
    return None if raw is None else int(raw)


async def load_snapshot(
    redis: Redis, keys: SnapshotKeys, newer_than: int | None = None
) -> tuple[int, dict[str, bytes]] | None:
    """The latest ``(version, parts)``, or None if there is none or it is not newer than ``newer_than``."""
    version = await latest_version(redis, keys)
    if version is None or (newer_than is not None and version <= newer_than):
        return None
    parts = cast(dict[bytes, bytes], await redis.hgetall(keys.blob(version)))  # the client returns bytes
    return (version, {k.decode(): v for k, v in parts.items()}) if parts else None
