"""``driftrec worker``: the Faust worker with every agent the settings switch on.

Composed here, at the top, because its parts live in two layers that never import each other:
ingest and the learners are transport (``streams``), the Kafka scoring agent answers
``score-requests`` with the scoring service's ``Scorer`` (``serving``).
"""

from __future__ import annotations

import faust

from driftrec.contract.settings import Settings
from driftrec.serving.kafka_agent import register_scoring_agent
from driftrec.serving.scorer import Scorer
from driftrec.streams.learners import default_learners
from driftrec.streams.worker import build_app, run_worker


def build_worker(settings: Settings) -> faust.App:
    app = build_app(settings, default_learners(settings))
    if settings.serving.kafka_agent and "ingest" in settings.worker_roles:  # one group answers requests
        register_scoring_agent(app, settings, lambda: Scorer(settings))
    return app


def main(settings: Settings, loglevel: str = "info") -> None:
    run_worker(build_worker(settings), loglevel)
