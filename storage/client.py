"""The one place a Redis client is built from the settings, single server or Redis Cluster.

Every layer that talks to Redis (the worker's agents, the scoring service, the evaluation
harness) asks here, so connection options are decided once for all of them. With
``DRIFTREC_REDIS_CLUSTER=true`` the client is a cluster client (``DRIFTREC_REDIS_URL`` names any
node; Redis Cluster has DB 0 only). Keys that are read or written together share a hash tag, and
multi-key reads go through :class:`MultiGet`, which sends one ``MGET`` per slot on a cluster.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from driftrec.contract.settings import Settings

# What a failing Redis raises: callers that degrade gracefully catch all of these
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


# Replies of a Redis that is up but cannot serve right now (loading, out of memory, failing over)
_TRANSIENT_REPLIES = ("LOADING", "OOM", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "READONLY")


def _timeouts(settings: Settings) -> dict[str, Any]:
    """A hung Redis (SIGSTOP, a dead host) fails a call after the socket timeout instead of holding
    a request or a batch for the kernel's minutes; callers decide whether to retry."""
    return {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "health_check_interval": 15,
    }


def connect(settings: Settings) -> Any:
    """An asyncio client for ``settings.redis_url`` (bind it to the loop that uses it)."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **_timeouts(settings))
    return Redis.from_url(settings.redis_url, **_timeouts(settings))


def connect_sync(settings: Settings) -> Any:
    """A blocking client, for command-line tools and the harness outside an event loop."""
    if settings.redis_cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **_timeouts(settings))
    return redis.Redis.from_url(settings.redis_url, **_timeouts(settings))


def is_transient(exc: BaseException) -> bool:
    """Whether a Redis failure may pass by itself (connection, timeout, loading, failover), so the
    work is worth retrying as it is; a script or type error is not."""
    if isinstance(exc, ResponseError | NoScriptError):
        return str(exc).startswith(_TRANSIENT_REPLIES)
    return isinstance(exc, REDIS_ERRORS)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | redis.cluster.RedisCluster)


class MultiGet:
    """``MGET`` of many keys inside a pipeline: one command on a single server, one per hash slot
    on a cluster (a cross-slot ``MGET`` is refused there). ``queue`` adds the commands, ``values``
    reads the pipeline's replies back in the order the keys were given."""

    def __init__(self, keys: Sequence[bytes | str], cluster: bool) -> None:
        self.keys = list(keys)
        if cluster:
            by_slot: dict[int, list[int]] = defaultdict(list)
            for i, key in enumerate(self.keys):
                by_slot[key_slot(key.encode() if isinstance(key, str) else key)].append(i)
            self.groups = list(by_slot.values())
        else:
            self.groups = [list(range(len(self.keys)))] if self.keys else []

    def __len__(self) -> int:
        """How many pipeline commands ``queue`` adds (and ``values`` reads)."""
        return len(self.groups)

    def queue(self, pipe: Any) -> None:
        # by execute_command: redis-py's cluster pipeline refuses its own mget() (it cannot know
        # the keys share a slot; here they do), and routes a raw MGET by its first key
        for group in self.groups:
            pipe.execute_command("MGET", *(self.keys[i] for i in group))

    def values(self, replies: Sequence[Any]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(self.keys)
        for group, reply in zip(self.groups, replies):
            for i, value in zip(group, reply):
                out[i] = value
        return out


async def mget(client: Any, keys: Sequence[bytes | str]) -> list[bytes | None]:
    """``MGET`` outside a pipeline, per slot on a cluster, in one round trip either way."""
    if not keys:
        return []
    multi = MultiGet(keys, is_cluster(client))
    pipe = client.pipeline(transaction=False)
    multi.queue(pipe)
    return multi.values(await pipe.execute())


class Scripts:
    """Lua scripts called by sha inside pipelines (``pipe.execute_command("EVALSHA", ...)``: the
    cluster pipeline of redis-py refuses ``evalsha()`` but routes the raw command by its first
    key), loaded where a server lacks them.

    Why not redis-py's ``Script`` objects: on a Redis Cluster the pipeline only learns at
    ``execute`` that a node has not loaded a script (a new or restarted node). Here the whole
    pipeline is then run again after loading; every driftrec script is idempotent per event id,
    so the commands that did run the first time change nothing the second.
    """

    def __init__(self, *sources: str) -> None:
        self.sources = sources
        self.sha = {src: hashlib.sha1(src.encode()).hexdigest() for src in sources}

    async def execute(self, client: Any, build: Callable[[Any], None]) -> list[Any]:
        """``build(pipe)`` queues the pipeline's commands; returns its replies, errors raised."""
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            build(pipe)
            results = list(await pipe.execute(raise_on_error=False))
            if not any(isinstance(r, NoScriptError) for r in results):
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
                return results
            if attempt == 0:
                for src in self.sources:
                    await client.script_load(src)
        raise RuntimeError("the Redis server keeps dropping driftrec's scripts")
