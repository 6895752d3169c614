"""Which learner agents a worker runs, each a factory of a batch handler (see ``streams.worker``).

Kept apart from the worker so each learner can be switched off by settings and so tests can
build a worker with exactly the learners they exercise.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from driftrec.contract.settings import Settings
from driftrec.streams.ingest import BatchHandler


def default_learners(settings: Settings) -> dict[str, Callable[[Redis], BatchHandler]]:
    learners: dict[str, Callable[[Redis], BatchHandler]] = {}
    if settings.dsl.enabled:
        from driftrec.streams.trainer import DSLTrainer

        # the trainer also writes the served snapshot's errors (ReLoop2) before each step
        learners["trainer"] = lambda redis: DSLTrainer(redis, settings).handle
    if settings.tpp.enabled:
        from driftrec.streams.tpp_agent import TPPLearner

        learners["tpp"] = lambda redis: TPPLearner(redis, settings).handle
    return learners
