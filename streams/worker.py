"""The Faust worker: a thin ingest agent over plain functions, and the trainer role.

Two roles (``worker_roles``), which one process may both run:

* **ingest** (scales out): a Faust agent in the worker's consumer group reads ``events`` in
  micro-batches (``take_events``) and hands each batch to plain functions that can be
  unit-tested without Faust (``streams.ingest``): dead-letter what is invalid, apply per-user and
  per-item state, refresh the touched users' TPP propensities (``streams.propensity``). Delivery
  is at-least-once (Faust commits offsets after processing), so every write is idempotent per
  ``event_id``.
* **trainer** (one lineage per model): a ``LineageRunner`` per learner (``streams.lineage``)
  holds the model's lease or stands by for it, reads every partition itself and learns each
  event exactly once. Started with the app as a ``mode.Service``, stopped before it (a clean
  stop publishes and releases the lease).

Other agents (the Kafka scoring agent of ``serving``) are added to the built app by the caller:
transport does not import the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import faust
import mode
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from driftrec.contract.settings import Settings
from driftrec.storage.client import connect
from driftrec.storage.event_state import EventState
from driftrec.streams.ingest import RawMessage, dead_letter, split_valid
from driftrec.streams.learners import Lineage
from driftrec.streams.lineage import LineageLearner, LineageRunner

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
        self.runners: dict[str, LineageRunner] = {}  # learner name -> its lineage runner (trainer role)

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
        """``ok`` unless an agent failed, or a trainer lost its lease, within ``window_s``."""
        now = time.time()
        failing = sorted(a for a, t in self.last_failure.items() if now - t < window_s)
        lost = sorted(
            r.model
            for r in self.runners.values()
            if r.stats.last_lease_lost is not None and now - r.stats.last_lease_lost < window_s
        )
        return {
            "status": "degraded" if failing or lost else "ok",
            "failing_agents": failing,
            "lost_lease": lost,
            "lineages": {
                r.model: {"active": r.stats.active, "epoch": r.stats.epoch, "version": r.stats.version}
                for r in self.runners.values()
            },
        }

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


class LineageCollector:
    """The trainer role's state at scrape time: who leads, at which version, leases lost, lag."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        active = GaugeMetricFamily("driftrec_lineage_active", "1 while this process trains the model", labels=["model"])
        version = GaugeMetricFamily("driftrec_lineage_version", "Snapshot version last seen", labels=["model"])
        lost = CounterMetricFamily(
            "driftrec_lineage_lease_lost", "Times this process lost a model's lease and stepped down", labels=["model"]
        )
        lag = GaugeMetricFamily(
            "driftrec_trainer_lag", "Messages not yet learned by the active trainer", labels=["model", "partition"]
        )
        for runner in self.metrics.runners.values():
            st = runner.stats
            active.add_metric([runner.model], 1.0 if st.active else 0.0)
            version.add_metric([runner.model], float(st.version or 0))
            lost.add_metric([runner.model], float(st.lease_lost))
            for partition, n in sorted(st.lag.items()):
                lag.add_metric([runner.model, str(partition)], float(n))
        yield from (active, version, lost, lag)


def _raw(event: faust.EventT) -> RawMessage:
    m = event.message
    return RawMessage(value=m.value, key=m.key, topic=m.topic, partition=m.partition, offset=m.offset)


def app_id(settings: Settings) -> str:
    """The Faust app id (its consumer group): a trainer-only process must not join the ingest group."""
    return settings.worker_id if "ingest" in settings.worker_roles else f"{settings.worker_id}-trainer"


def build_app(settings: Settings, learners: dict[str, Lineage] | None = None) -> faust.App:
    """Build the worker app for ``settings.worker_roles``; ``learners`` (trainer role) maps a
    learner's metrics name to its lineage (``streams.learners.default_learners``)."""
    app = faust.App(
        app_id(settings),
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
    if "ingest" in settings.worker_roles:
        _register_ingest(app, settings, redis, metrics, events_topic, dlq_topic)
    if "trainer" in settings.worker_roles:
        _register_trainers(app, settings, redis, metrics, learners or {})

    metrics.registry.register(ConsumerLag(app))
    metrics.registry.register(LineageCollector(metrics))

    @app.page("/metrics")  # type: ignore[arg-type]  # faust types pages as View methods
    async def prometheus_metrics(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")  # type: ignore[arg-type]  # faust types pages as View methods
    async def healthz(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        body = metrics.health()
        return web.json(body)  # 200 either way: a liveness probe must not restart a worker for a dependency

    return app


def _register_ingest(
    app: faust.App,
    settings: Settings,
    redis: Any,
    metrics: WorkerMetrics,
    events_topic: faust.TopicT,
    dlq_topic: faust.TopicT,
) -> None:
    state = EventState(redis, settings.key_prefix, max_seq_len=settings.user_seq_len, dedup_ttl_s=settings.dedup_ttl_s)
    propensities = None
    if settings.tpp.enabled:
        from driftrec.streams.propensity import PropensityWriter

        propensities = PropensityWriter(redis, settings)
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
                if propensities is not None:
                    await propensities.write(valid)
                metrics.processed.inc(new)
                metrics.duplicates.inc(len(valid) - new)
                metrics.dead_lettered.inc(len(rejected))
                metrics.batch_seconds.labels("ingest").observe(time.perf_counter() - started)


def _bind(lineage: Lineage, redis: Any) -> Callable[[], LineageLearner]:
    return lambda: lineage.learner(redis)


def _register_trainers(
    app: faust.App, settings: Settings, redis: Any, metrics: WorkerMetrics, learners: dict[str, Lineage]
) -> None:
    """One ``LineageRunner`` per learner, started and stopped with the app."""
    for name, lineage in learners.items():

        def on_batch(valid: int, learned: int, seconds: float, name: str = name) -> None:
            metrics.learner_events.labels(name).inc(learned)
            metrics.learner_seen.labels(name).inc(valid)
            metrics.batch_seconds.labels(name).observe(seconds)

        metrics.runners[name] = LineageRunner(settings, redis, lineage.model, _bind(lineage, redis), on_batch=on_batch)
    runners = list(metrics.runners.items())
    if not runners:
        return

    @app.service
    class TrainerRole(mode.Service):
        """Runs every lineage runner; on stop, lets each publish what it learned and release its lease."""

        tasks: list[asyncio.Task[None]]

        async def on_start(self) -> None:
            self.tasks = [asyncio.ensure_future(self._run(name, runner)) for name, runner in runners]

        async def _run(self, name: str, runner: LineageRunner) -> None:
            while not runner.stopping.is_set():
                try:
                    with metrics.guard(name):
                        await runner.run()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s trainer failed; restarting it from the newest snapshot", name)
                    await asyncio.sleep(1.0)

        async def on_stop(self) -> None:
            for _, runner in runners:
                runner.stop()
            _, pending = await asyncio.wait(self.tasks, timeout=settings.lineage.lease_ttl_s)
            for task in pending:
                task.cancel()


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run a built worker app in the foreground until SIGINT/SIGTERM."""
    worker = faust.Worker(app, loglevel=loglevel)
    worker.execute_from_commandline()
