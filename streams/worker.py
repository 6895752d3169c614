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

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import faust
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
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
        self.agent_failures = Counter(
            "driftrec_agent_failures_total",
            "Micro-batches an agent failed on (the agent is restarted and the batch redelivered)",
            ["agent"],
            registry=self.registry,
        )
        self.last_failure: dict[str, float] = {}  # agent -> wall time of its last failure (health)

    @contextlib.contextmanager
    def guard(self, agent: str) -> Iterator[None]:
        """Count a failing batch and let it propagate: Faust restarts the agent, and the batch's
        offsets, never acknowledged, are delivered again (at-least-once, idempotent handlers)."""
        try:
            yield
        except Exception:
            self.agent_failures.labels(agent).inc()
            self.last_failure[agent] = time.time()
            raise

    def health(self, window_s: float = 60.0) -> dict[str, Any]:
        """``ok`` unless an agent failed within ``window_s``; the failing agents by name."""
        now = time.time()
        failing = sorted(a for a, t in self.last_failure.items() if now - t < window_s)
        return {"status": "degraded" if failing else "ok", "failing_agents": failing}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ConsumerLag:
    """Per-partition consumer lag of the worker's group, read at scrape time: the partition's
    high watermark minus the group's committed offset, for every partition assigned here."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "driftrec_consumer_lag", "Messages not yet committed, per partition", labels=["topic", "partition"]
        )
        try:
            consumer = self.app.consumer
            assigned = consumer.assignment()
        except Exception:
            assigned = set()
        for tp in sorted(assigned):
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]  # faust has no public accessor
            lag.add_metric([tp.topic, str(tp.partition)], max(int(highwater) - int(committed or 0), 0))
        yield lag


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
            with metrics.guard("ingest"):
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

    metrics.registry.register(ConsumerLag(app))

    @app.page("/metrics")  # type: ignore[arg-type]  # faust types pages as View methods
    async def prometheus_metrics(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")  # type: ignore[arg-type]  # faust types pages as View methods
    async def healthz(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        body = metrics.health()
        return web.json(body)  # 200 either way: a liveness probe must not restart a worker for a dependency

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
            with metrics.guard(name):
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
