"""Which learner agents a worker runs, each a factory of a batch handler (see ``streams.worker``).

Kept apart from the worker so each learner can be switched off by settings and so tests can
build a worker with exactly the learners they exercise.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from driftrec.settings import Settings
from streams.worker import BatchHandler


def default_learners(settings: Settings) -> dict[str, Callable[[Redis], BatchHandler]]:
    learners: dict[str, Callable[[Redis], BatchHandler]] = {}
    if settings.dsl.enabled:
        from streams.trainer import DSLTrainer

        learners["trainer"] = lambda redis: DSLTrainer(redis, settings).handle
    if settings.dsl.enabled and settings.memory.enabled:
        from streams.memory_agent import ErrorMemoryWriter

        learners["error_memory"] = lambda redis: ErrorMemoryWriter(redis, settings).handle
    return learners
