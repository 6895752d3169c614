"""Which model lineages the trainer role runs, each a factory of its learner (``streams.lineage``).

Kept apart from the worker so each learner can be switched off by settings and so tests can
build a worker with exactly the learners they exercise. The key is the learner's name in the
worker's metrics (``driftrec_learner_events_total{learner=...}``); the value names the lineage
(its snapshot keys) and builds a fresh learner for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from driftrec.contract.settings import Settings
from driftrec.streams.lineage import LineageLearner


@dataclass(frozen=True)
class Lineage:
    model: str  # snapshot lineage name: SnapshotKeys(prefix, model)
    learner: Callable[[Any], LineageLearner]  # redis client -> a fresh learner


def default_learners(settings: Settings) -> dict[str, Lineage]:
    learners: dict[str, Lineage] = {}
    if settings.dsl.enabled:
        from driftrec.streams.trainer import DSLTrainer

        # the trainer also writes the served snapshot's errors (ReLoop2) before each step
        learners["trainer"] = Lineage("dsl", lambda redis: DSLTrainer(redis, settings))
    if settings.tpp.enabled:
        from driftrec.streams.tpp_agent import TPPLearner

        learners["tpp"] = Lineage("tpp", lambda redis: TPPLearner(redis, settings))
    return learners
