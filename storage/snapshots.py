"""Versioned model snapshots in Redis, published atomically and loaded by version.

Why a pointer plus immutable blobs: the trainer writes blob ``v`` and moves ``latest`` to ``v``
in one MULTI/EXEC, so a reader that reads ``latest`` and then blob ``latest`` never sees half a
snapshot; old versions stay readable for a grace period (``keep``) so a reader that lost the
race still finds the version it was told about. All keys share the ``{snap:<name>}`` hash tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis


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

    def blob(self, version: int) -> str:
        """A HASH of named parts (e.g. ``model``, ``catalog``) written together."""
        return f"{self.tag}:blob:{version}"


async def publish_snapshot(redis: Redis, keys: SnapshotKeys, parts: dict[str, bytes], keep: int = 3) -> int:
    """Store ``parts`` as the next version and make it the latest; return its version."""
    version = int(await redis.incr(keys.counter))
    async with redis.pipeline(transaction=True) as tx:
        tx.hset(keys.blob(version), mapping=parts)  # type: ignore[arg-type]  # redis-py's Mapping key type is invariant
        tx.set(keys.latest, version)
        if version > keep:
            tx.delete(keys.blob(version - keep))
        await tx.execute()
    return version


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
