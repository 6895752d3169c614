"""The Faust worker: thin agents over plain functions.

Each agent reads ``events`` in micro-batches (``take_events``) and hands the batch to a plain
async function that can be unit-tested without Faust (``streams.ingest``). Only the ``ingest``
agent dead-letters; learner agents (``build_app(learners=...)``) skip what ``ingest`` rejects.
Other agents (the Kafka scoring agent of ``serving``) are added to the built app by the caller:
transport does not import the HTTP layer.

Delivery is at-least-once (Faust commits offsets after processing), so every handler is
idempotent per ``event_id``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import faust
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from redis.asyncio import Redis

from driftrec.contract.settings import Settings
from driftrec.storage.client import connect
from driftrec.storage.event_state import EventState
from driftrec.streams.ingest import BatchHandler, RawMessage, dead_letter, split_valid

log = logging.getLogger(__name__)


class WorkerMetrics:
    """Prometheus metrics of one worker process (its own registry, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.processed = Counter(
            "driftrec_events_processed_total", "Valid events processed by ingest", registry=self.registry
        )
        self.duplicates = Counter(
            "driftrec_events_duplicate_total", "Redelivered events ignored by ingest", registry=self.registry
        )
        self.dead_lettered = Counter(
            "driftrec_events_dead_lettered_total", "Events sent to the DLQ", registry=self.registry
        )
        self.batch_seconds = Histogram(
            "driftrec_batch_seconds", "Time to process one micro-batch", ["agent"], registry=self.registry
        )
        self.learner_events = Counter(
            "driftrec_learner_events_total", "Events learned, per learner", ["learner"], registry=self.registry
        )
        self.learner_seen = Counter(
            "driftrec_learner_seen_total",
            "Valid events a learner has handled (learned or deliberately skipped)",
            ["learner"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _raw(event: faust.EventT) -> RawMessage:
    m = event.message
    return RawMessage(value=m.value, key=m.key, topic=m.topic, partition=m.partition, offset=m.offset)


def build_app(settings: Settings, learners: dict[str, Callable[[Redis], BatchHandler]] | None = None) -> faust.App:
    """Build the worker app. ``learners`` maps an agent name to a factory of its batch handler."""
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_port=settings.worker_web_port,
        web_host=settings.worker_web_host,
        topic_partitions=settings.events_partitions,
        topic_replication_factor=1,
        topic_allow_declare=False,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
    )
    metrics = WorkerMetrics()
    app.driftrec_metrics = metrics  # type: ignore[attr-defined]  # carried on the app for its page and for tests
    events_topic = app.topic(
        settings.events_topic, key_serializer="raw", value_serializer="raw", partitions=settings.events_partitions
    )
    dlq_topic = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw", partitions=1)
    redis = connect(settings)
    state = EventState(redis, settings.key_prefix, max_seq_len=settings.user_seq_len, dedup_ttl_s=settings.dedup_ttl_s)
    take, within = settings.worker_batch_size, settings.worker_batch_within_s

    @app.agent(events_topic, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(take, within=within):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            started = time.perf_counter()
            valid, rejected = split_valid([_raw(e) for e in batch])
            for msg, reason in rejected:
                await dlq_topic.send(key=msg.key, value=dead_letter(msg, reason).model_dump_json().encode())
                log.warning("dead-lettered offset %s/%s: %s", msg.partition, msg.offset, reason)
            new = await state.apply(valid)
            metrics.processed.inc(new)
            metrics.duplicates.inc(len(valid) - new)
            metrics.dead_lettered.inc(len(rejected))
            metrics.batch_seconds.labels("ingest").observe(time.perf_counter() - started)

    for name, factory in (learners or {}).items():
        _register_learner(app, events_topic, name, factory(redis), metrics, take, within)

    @app.page("/metrics")  # type: ignore[arg-type]  # faust types pages as View methods
    async def prometheus_metrics(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    return app


def _register_learner(
    app: faust.App,
    topic: faust.TopicT,
    name: str,
    handler: BatchHandler,
    metrics: WorkerMetrics,
    take: int,
    within: float,
) -> None:
    async def learner(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(take, within=within):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            started = time.perf_counter()
            valid, _ = split_valid([_raw(e) for e in batch])
            learned = await handler(valid)
            metrics.learner_events.labels(name).inc(learned)
            metrics.learner_seen.labels(name).inc(len(valid))
            metrics.batch_seconds.labels(name).observe(time.perf_counter() - started)

    learner.__name__ = name
    app.agent(topic, name=name)(learner)


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run a built worker app in the foreground until SIGINT/SIGTERM."""
    worker = faust.Worker(app, loglevel=loglevel)
    worker.execute_from_commandline()
