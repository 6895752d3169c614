"""The Faust worker: a thin ingest agent over plain functions, and the trainer role.

Two roles (``worker_roles``), which one process may both run:

* **ingest** (scales out): a Faust agent in the worker's consumer group reads ``events`` in
  micro-batches (``take_events``) and hands each batch to plain functions that can be
  unit-tested without Faust (``streams.ingest``): dead-letter what is invalid, apply per-user and
  per-item state, write the served errors of labelled events into the error and session memories
  and step the per-event wide model (the fast path, ``streams.fast_path``), refresh the touched
  users' TPP propensities (``streams.propensity``). Delivery
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
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import faust
import mode
from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, ensure_TPset
from faust.transport.drivers.aiokafka import ConsumerRebalanceListener as FaustRebalanceListener
from prometheus_client import GC_COLLECTOR, CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from driftrec.contract.settings import Settings
from driftrec.storage.client import connect
from driftrec.storage.client import is_transient as redis_transient
from driftrec.streams.fast_path import ingest_batch
from driftrec.streams.ingest import RawMessage
from driftrec.streams.kafka_client import faust_credentials
from driftrec.streams.kafka_client import is_transient as kafka_transient
from driftrec.streams.learners import Lineage
from driftrec.streams.lineage import LineageLearner, LineageRunner
from driftrec.streams.log_identity import BrokerLog

log = logging.getLogger(__name__)


class WorkerMetrics:
    """Prometheus metrics of one worker process (its own registry, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
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
        self.retries = Counter(
            "driftrec_transient_failures_total",
            "Redis or broker failures ridden out by retrying (the batch waits; nothing is skipped)",
            ["agent"],
            registry=self.registry,
        )
        self.agent_failures = Counter(
            "driftrec_agent_failures_total",
            "Unexpected failures of an agent (it is restarted; ingest holds the batch's offsets uncommitted)",
            ["agent"],
            registry=self.registry,
        )
        self.log_replaced = Counter(
            "driftrec_broker_log_replaced_total",
            "Times the broker came back as a new log (its cluster id changed, or a read position was past "
            "its end) and ingest re-read it from the beginning",
            registry=self.registry,
        )
        self.last_failure: dict[str, float] = {}  # agent -> wall time of its last failure (health)
        self.runners: dict[str, LineageRunner] = {}  # learner name -> its lineage runner (trainer role)

    def transient_failure(self, agent: str) -> None:
        """A Redis or broker failure the agent waits out: counted, and health says so meanwhile."""
        self.retries.labels(agent).inc()
        self.last_failure[agent] = time.time()

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

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper asked for (``Accept``: OpenMetrics or text) and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


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


def fetch_wait_ms(app: faust.App) -> int:
    """The ``worker_fetch_max_wait_ms`` this app's consumer is to use."""
    return int(getattr(app, "driftrec_fetch_max_wait_ms", FAUST_FETCH_MAX_WAIT_MS))


FAUST_FETCH_MAX_WAIT_MS = 1500  # what faust-streaming 0.15 passes to aiokafka, not a setting of its own


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    """Faust's own consumer, with the app's fetch wait (``worker_fetch_max_wait_ms``): Faust
    hard-codes the wait, and aiokafka reads it from this attribute when the consumer starts."""
    consumer = _faust_create_worker_consumer(self, transport)
    if not hasattr(consumer, "_fetch_max_wait_ms"):  # an aiokafka that stores it elsewhere: say so
        raise RuntimeError("aiokafka's consumer has no _fetch_max_wait_ms; update streams/worker.py")
    consumer._fetch_max_wait_ms = fetch_wait_ms(self.app)
    return consumer


_faust_create_worker_consumer = AIOKafkaConsumerThread._create_worker_consumer
AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]

_generations = itertools.count(1)


async def _on_partitions_assigned(self: Any, assigned: Any) -> None:
    """Faust's listener, with a generation id that never repeats in this process.

    Faust skips a buffered message, and stops a fetch loop, whose generation is not the app's:
    that is what keeps messages fetched before a rebalance from setting read offsets after it.
    It takes the id from the group coordinator, and a broker that restarted empty (the embedded
    default) counts generations from 1 again, so the old log's messages passed for new ones and
    the new log's first offsets were dropped as already read (streams/log_identity.py)."""
    thread = self._thread
    app = thread.app
    if getattr(app, "driftrec_log_id", None) is None and hasattr(app, "driftrec_settings"):
        # the log this first assignment is about to read, known before any read: the watch
        # (_register_log_watch) and the commit fence compare against it; a watch whose first
        # sighting were already a restarted broker's new log could not tell the log changed
        probe = BrokerLog(app.driftrec_settings)
        try:
            app.driftrec_log_id = await probe.learn()
        finally:
            await probe.close()
    generation = next(_generations)  # Faust compares it in-process only, never with the broker's
    app.consumer_generation_id = generation
    await thread.on_partitions_assigned(ensure_TPset(assigned), generation)


FaustRebalanceListener.on_partitions_assigned = _on_partitions_assigned  # type: ignore[method-assign]


async def _commit(self: Any, offsets: Any) -> bool:
    """Faust's commit, refused while the broker's log is not the one the offsets were read in.

    A broker that restarted empty is a new log; until the watch (``_register_log_watch``) has
    reset the read positions, the offsets Faust holds are the old log's, and committing them to
    the new broker (Faust commits on every revoke, and the broker's restart causes one) would
    make the next assignment seek past the new log's first messages."""
    expected = getattr(self.app, "driftrec_log_id", None)
    if expected is not None:
        probe = getattr(self, "_driftrec_log_probe", None)
        if probe is None:  # one per consumer thread: its connection lives on that thread's loop
            probe = self._driftrec_log_probe = BrokerLog(self.app.driftrec_settings)
        now = await probe.current()
        if now != expected:
            log.info("not committing: the broker's log is %s, the offsets were read in %s", now, expected)
            return False
    return bool(await _faust_commit(self, offsets))


_faust_commit = AIOKafkaConsumerThread._commit
AIOKafkaConsumerThread._commit = _commit  # type: ignore[method-assign]


def build_app(settings: Settings, learners: dict[str, Lineage] | None = None) -> faust.App:
    """Build the worker app for ``settings.worker_roles``; ``learners`` (trainer role) maps a
    learner's metrics name to its lineage (``streams.learners.default_learners``)."""
    app = faust.App(
        app_id(settings),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_port=settings.worker_web_port,
        web_host=settings.worker_web_host,
        web_bind=settings.worker_web_host,
        broker_credentials=faust_credentials(settings),
        topic_partitions=settings.events_partitions,
        topic_replication_factor=1,
        topic_allow_declare=False,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
    )
    app.driftrec_fetch_max_wait_ms = settings.worker_fetch_max_wait_ms  # type: ignore[attr-defined]  # read by _create_worker_consumer
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
        body, content_type = metrics.render(request.headers.get("Accept", ""))
        return web.bytes(body, headers={"Content-Type": content_type})  # aiohttp refuses a charset in content_type

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
    async def send_letters(letters: list[tuple[bytes | None, bytes]]) -> list[BaseException | None]:
        """Send every letter, then wait until the broker has each (or refused it)."""
        sent: list[Any] = []
        for key, value in letters:
            try:
                sent.append(await dlq_topic.send(key=key, value=value))
            except Exception as exc:  # refused before sending (too large for the producer, say)
                sent.append(exc)
        results = await asyncio.gather(
            *(_delivered(f) for f in sent if not isinstance(f, BaseException)), return_exceptions=True
        )
        it = iter(results)
        return [f if isinstance(f, BaseException) else _error_of(next(it)) for f in sent]

    batch = ingest_batch(
        redis,
        settings,
        send_letters,
        is_transient=lambda exc: redis_transient(exc) or kafka_transient(exc),
        on_retry=lambda what, exc: metrics.transient_failure("ingest"),
    )
    take, within = settings.worker_batch_size, settings.worker_batch_within_s

    @app.agent(events_topic, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for events in stream.take_events(take, within=within):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            # Faust acks a batch's events when its body ends, even by an exception or a
            # cancellation: one more reference per message, dropped only once the batch is
            # handled, keeps its offsets uncommitted until then (a stop or a crash mid-retry
            # redelivers it, never skips it)
            for event in events:
                event.message.incref()
            started = time.perf_counter()
            with metrics.guard("ingest"):
                outcome = await batch.handle([_raw(e) for e in events])
            for event in events:
                if event.message.generation_id == app.consumer_generation_id:
                    event.ack()
                else:  # taken before the log was replaced: done, but its offset must not be committed
                    event.message.acked = True
            metrics.processed.inc(outcome.applied)
            metrics.duplicates.inc(outcome.redelivered + outcome.duplicates)
            metrics.dead_lettered.inc(outcome.dead_lettered)
            metrics.batch_seconds.labels("ingest").observe(time.perf_counter() - started)

    _register_log_watch(app, settings, metrics)


def _register_log_watch(app: faust.App, settings: Settings, metrics: WorkerMetrics) -> None:
    """Re-read the events log from its beginning when the broker comes back as a new log
    (``streams.log_identity``). Done again on the next ticks: a message of the old log still in
    Faust's hands when the first reset ran sets its read offset high again."""
    from driftrec.streams.log_identity import reset_read_positions, stale_read_positions

    broker_log = BrokerLog(settings)
    again = 0
    app.driftrec_settings = settings  # type: ignore[attr-defined]  # read by _commit's probe

    async def check() -> None:
        nonlocal again
        consumer = app.consumer
        assigned = {tp for tp in consumer.assignment() if tp.topic == settings.events_topic}
        stale = stale_read_positions(consumer, assigned)
        if broker_log.known is None:  # the log the first assignment read (_on_partitions_assigned)
            broker_log.known = getattr(app, "driftrec_log_id", None)
        replaced = await broker_log.replaced()
        if replaced or stale:
            if stale:
                where = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(stale))
                log.warning("read positions past the log's end on %s: the log was replaced", where)
            metrics.log_replaced.inc()
            again = 2
        elif again:
            again -= 1
        else:
            return
        # a new generation: Faust skips the messages it still buffers, and ingest does not ack
        # a batch it took before (its offsets count in the old log)
        app.consumer_generation_id = next(_generations)
        app.driftrec_log_id = broker_log.known  # type: ignore[attr-defined]
        if assigned:
            reset_read_positions(consumer, assigned)
            await consumer._thread.seek_to_beginning(  # type: ignore[attr-defined]  # faust's consumer does not delegate it
                *(TopicPartition(tp.topic, tp.partition) for tp in assigned)  # aiokafka refuses faust's TP
            )

    @app.service
    class BrokerLogWatch(mode.Service):
        """Runs ``check`` every ``kafka_log_check_s`` in a loop of its own (not a Faust timer:
        nothing a check raises, a cancellation cut off inside a client included, may end it), and
        closes the watch's admin connection with the app."""

        async def on_started(self) -> None:
            self.add_future(self._loop_checks())

        async def _loop_checks(self) -> None:
            while not self.should_stop:
                await self.sleep(settings.kafka_log_check_s)
                if self.should_stop:
                    break
                try:
                    await check()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self.should_stop or (task is not None and task.cancelling()):
                        raise  # the app is stopping
                    log.warning("checking the broker's log was cut off; checking again")
                    metrics.transient_failure("broker-log-watch")
                except Exception:
                    log.exception("checking the broker's log failed; checking again")
                    metrics.transient_failure("broker-log-watch")

        async def on_stop(self) -> None:
            await broker_log.close()


async def _delivered(future: Any) -> Any:
    return await future


def _error_of(result: Any) -> BaseException | None:
    return result if isinstance(result, BaseException) else None


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
    if not sys.stdout.isatty():  # a log file gets log lines, not the startup spinner's cursor escapes
        worker.spinner = None
    worker.execute_from_commandline()
