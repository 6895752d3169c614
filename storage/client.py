"""The one place a Redis client is built from the settings.

Every layer that talks to Redis (the worker's agents, the scoring service, the evaluation
harness) asks here, so connection options are decided once for all of them.
"""

from __future__ import annotations

import redis
from redis.asyncio import Redis

from driftrec.contract.settings import Settings


def connect(settings: Settings) -> Redis:
    """An asyncio client for ``settings.redis_url`` (bind it to the loop that uses it)."""
    return Redis.from_url(settings.redis_url)


def connect_sync(settings: Settings) -> redis.Redis:
    """A blocking client, for command-line tools and the harness outside an event loop."""
    return redis.Redis.from_url(settings.redis_url)
