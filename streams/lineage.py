"""One lineage per model: a leased, fenced trainer that learns every event exactly once.

Why not a Faust agent in the ingest consumer group: a group splits the partitions, so two
workers would each train a model on half of the users and publish to the same pointer (two
hidden spaces, two sets of fusion weights, serving flipping between them). A model needs one
writer that sees every partition. So each model (``dsl``: the DSL scorer with its fusion
weights; ``tpp``: PromptTPP) is trained by whichever process holds its
*lease* (``storage.snapshots.acquire_lease``); every other process running the trainer role is
a standby that polls for the lease and takes over when it expires.

Exactly once, by offsets. The trainer reads every partition of ``events`` by manual assignment
(no group rebalancing) and each snapshot it publishes carries, as its ``offsets`` part, the next
offset of every partition it has learned: the model in the snapshot is exactly the model that
learned those messages and nothing else. A trainer that takes over loads the newest snapshot
and seeks to exactly those offsets, so what the previous holder learned but never published is
learned again once (it never reached serving), and nothing is learned twice. No "seen" markers:
they were written before learning and made a crash lose events forever. Kafka offsets of the
trainer's group are committed only after a publish, only up to what that snapshot holds (they
are for lag dashboards; the snapshot is the truth).

Fencing. A publish runs under the lease's epoch in one Lua step that checks the epoch, bumps
the version and moves ``latest``, so a trainer that stalled past its lease (GC pause, SIGSTOP)
and wakes after a standby took over is refused and steps down; versions served only grow.
The lease is renewed between batches; a failed renewal also steps down.

A new log. Offsets name messages of one log: a memory-storage broker (the embedded default) that
restarts numbers its new log from 0 again. The position is stamped with the broker's cluster id
(``streams.log_identity``); a position from another log is void, and the trainer reads the new
log from its beginning. While it leads, it asks the id every ``kafka_log_check_s`` and on any
out-of-range fetch: what it learned of the old log is published first, then it starts the new
one from 0. The events of the new log it read before it noticed (at most ``kafka_log_check_s``
of them, and none when the new log was still shorter than the old position) are learned twice.

When it publishes: every ``snapshot_every_steps`` steps or ``snapshot_every_s`` seconds of
unpublished learning (the learner's ``due``), after ``lineage.idle_publish_s`` without new
events, and on a clean stop (then it releases the lease so a standby need not wait for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import OffsetAndMetadata

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.storage.claims import EventClaims
from driftrec.storage.snapshots import (
    SnapshotKeys,
    StaleEpoch,
    acquire_lease,
    load_snapshot,
    publish_snapshot,
    release_lease,
)
from driftrec.streams.ingest import RawMessage, parse_batch
from driftrec.streams.kafka_client import aiokafka_options
from driftrec.streams.log_identity import BrokerLog

log = logging.getLogger(__name__)

OFFSETS_PART = "offsets"


class LineageLearner(Protocol):
    """What the runner needs of a model's learner (``streams.trainer.DSLTrainer``, ``streams.tpp_agent.TPPLearner``)."""

    def restore(self, parts: dict[str, bytes] | None) -> None:
        """Continue from a snapshot's parts (``None``: start a fresh model)."""

    async def handle(self, events: list[Event]) -> int:
        """Learn one micro-batch of valid events (each delivered once); return how many it learned."""

    def due(self) -> bool:
        """Whether the learner's own cadence (steps or seconds) asks for a publish now."""

    async def snapshot_parts(self) -> dict[str, bytes]:
        """The parts of the next snapshot (the runner adds ``offsets``)."""

    def published(self, version: int) -> None:
        """The parts just returned are now version ``version``, served."""


class LeaseLost(RuntimeError):
    """The lease expired or moved while this trainer held the model: it must step down."""


class LogReplaced(RuntimeError):
    """The broker's log is not the one the position's offsets count in (``streams.log_identity``)."""


@dataclass
class LineagePosition:
    """Where a lineage stands in the stream: the snapshot's ``offsets`` part."""

    topic: str
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to learn
    messages: int = 0  # messages consumed by the lineage, all partitions (valid + invalid)
    events: int = 0  # valid events handed to the learner
    learned: int = 0  # what the learner said it learned of those
    epoch: int = 0  # the lease epoch of the publish that wrote it (who published, for audits)
    owner: str = ""
    log_id: str = ""  # the broker's cluster id the offsets belong to ("" : unknown, older snapshots)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "topic": self.topic,
                "epoch": self.epoch,
                "owner": self.owner,
                "next": {str(p): o for p, o in sorted(self.next_offsets.items())},
                "messages": self.messages,
                "events": self.events,
                "learned": self.learned,
                "log": self.log_id,
            }
        )

    @classmethod
    def from_bytes(cls, blob: bytes | None, topic: str) -> LineagePosition:
        if not blob:
            return cls(topic)
        raw = orjson.loads(blob)
        if raw.get("topic") != topic:
            raise ValueError(f"the snapshot learned topic {raw.get('topic')!r}, this trainer reads {topic!r}")
        return cls(
            topic,
            {int(p): int(o) for p, o in raw.get("next", {}).items()},
            int(raw.get("messages", 0)),
            int(raw.get("events", 0)),
            int(raw.get("learned", 0)),
            log_id=str(raw.get("log", "")),
        )


class LineageStats:
    """What a runner reports to its worker's metrics page (``streams.worker.WorkerMetrics``)."""

    def __init__(self) -> None:
        self.active = False
        self.epoch: int | None = None
        self.version: int | None = None
        self.lease_lost = 0
        self.last_lease_lost: float | None = None
        self.lag: dict[int, int] = {}


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LineageRunner:
    """Holds (or waits for) one model's lease and, while it holds it, trains and publishes."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        model: str,
        learner_factory: Callable[[], LineageLearner],
        on_batch: Callable[[int, int, float], None] | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.model = model
        self.keys = SnapshotKeys(settings.key_prefix, model)
        self.claims = EventClaims(redis, settings.key_prefix, settings.dedup_ttl_s)
        self.learner_factory = learner_factory
        self.on_batch = on_batch  # (valid events, learned, seconds) per batch, for the worker's metrics
        self.owner = owner or owner_id()
        self.stats = LineageStats()
        self.stopping = asyncio.Event()
        self.cfg = settings.lineage
        self.ttl_ms = int(self.cfg.lease_ttl_s * 1000)
        self._unpublished = 0  # messages consumed since the last publish
        self.broker_log = BrokerLog(settings)

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Standby until the lease is free, then lead; after losing it, standby again."""
        while not self.stopping.is_set():
            epoch = await self._acquire()
            if epoch is None:
                await self._sleep(self.cfg.standby_poll_s)
                continue
            try:
                await self._lead(epoch)
            except (LeaseLost, StaleEpoch) as exc:
                self.stats.lease_lost += 1
                self.stats.last_lease_lost = time.time()
                log.warning("%s trainer %s steps down: %s", self.model, self.owner, exc)
            finally:
                self.stats.active = False
                self.stats.lag = {}

    async def _acquire(self) -> int | None:
        try:
            return await acquire_lease(self.redis, self.keys, self.owner, self.ttl_ms)
        except Exception as exc:  # Redis down: stay standby and ask again
            log.warning("%s lease request failed: %s", self.model, exc)
            return None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _lead(self, epoch: int) -> None:
        snapshot = await load_snapshot(self.redis, self.keys)
        parts = snapshot[1] if snapshot else None
        position = LineagePosition.from_bytes(parts.get(OFFSETS_PART) if parts else None, self.settings.events_topic)
        learner = self.learner_factory()
        learner.restore(parts)
        self._unpublished = 0
        self.stats.active, self.stats.epoch = True, epoch
        self.stats.version = snapshot[0] if snapshot else None
        log.info(
            "%s trainer %s leads at epoch %d from v%s (%d messages learned)",
            self.model,
            self.owner,
            epoch,
            self.stats.version,
            position.messages,
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=f"{self.settings.worker_id}-trainer-{self.model}",
            client_id=f"driftrec-trainer-{self.model}",
            enable_auto_commit=False,
            auto_offset_reset="none",  # a position past the log's end raises: the log may be new
            max_poll_records=self.settings.worker_batch_size,
            fetch_max_wait_ms=self.settings.worker_fetch_max_wait_ms,
            **aiokafka_options(self.settings),
        )
        await consumer.start()
        try:
            partitions = await self._assign(consumer, position)
            while True:
                try:
                    await self._learn_until_stopped(consumer, learner, position, partitions, epoch)
                    break
                except LogReplaced as exc:
                    log.warning(
                        "%s trainer: %s; what it learned is published, the new log is read from 0", self.model, exc
                    )
                    if self._unpublished:
                        await self._publish(consumer, learner, position, epoch)
                    position.next_offsets.clear()
                    position.log_id = self.broker_log.known or ""
                    for tp in partitions:
                        await consumer.seek_to_beginning(tp)
            if self._unpublished:  # a clean stop publishes what it learned
                await self._publish(consumer, learner, position, epoch)
            await release_lease(self.redis, self.keys, self.owner)
        finally:
            await consumer.stop()
            await self.broker_log.close()

    async def _assign(self, consumer: AIOKafkaConsumer, position: LineagePosition) -> list[TopicPartition]:
        topic = self.settings.events_topic
        found = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 30
        while not found and time.monotonic() < deadline:
            await consumer.topics()  # refreshes metadata of every topic, also those not subscribed
            found = consumer.partitions_for_topic(topic)
            if not found:
                await asyncio.sleep(0.5)
        if not found:
            raise RuntimeError(f"topic {topic!r} has no partitions (create it first: driftrec up)")
        partitions = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        now = await self.broker_log.learn() or ""  # known before the first read; a change is judged by the position
        if position.log_id and now and position.log_id != now:
            log.warning(
                "%s trainer: the snapshot's offsets count in log %s, the broker's is %s: reading it from 0",
                self.model,
                position.log_id,
                now,
            )
            position.next_offsets.clear()
        position.log_id = now or position.log_id
        for tp in partitions:
            if tp.partition in position.next_offsets:
                consumer.seek(tp, position.next_offsets[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        return partitions

    async def _learn_until_stopped(
        self,
        consumer: AIOKafkaConsumer,
        learner: LineageLearner,
        position: LineagePosition,
        partitions: list[TopicPartition],
        epoch: int,
    ) -> None:
        renew_every = self.cfg.lease_ttl_s / 3
        last_renew = time.monotonic()
        last_event = time.monotonic()
        last_log_check = time.monotonic()
        while not self.stopping.is_set():
            if time.monotonic() - last_renew >= renew_every:
                held = await acquire_lease(self.redis, self.keys, self.owner, self.ttl_ms)
                if held != epoch:
                    raise LeaseLost(f"lease renewal at epoch {epoch} answered {held}")
                last_renew = time.monotonic()
                await self._update_lag(consumer, partitions)
            if time.monotonic() - last_log_check >= self.settings.kafka_log_check_s:
                last_log_check = time.monotonic()
                if await self.broker_log.replaced():
                    raise LogReplaced(f"the broker's log is now {self.broker_log.known}")
            try:
                fetched = await consumer.getmany(
                    timeout_ms=int(self.cfg.poll_timeout_s * 1000), max_records=self.settings.worker_batch_size
                )
            except OffsetOutOfRangeError as exc:
                if await self.broker_log.replaced():
                    raise LogReplaced(f"a position is past the end of the log, now {self.broker_log.known}") from exc
                # the same log, whose retention dropped what was not read yet: go on from its start
                # (what auto_offset_reset="earliest" did)
                gone = list(exc.args[0]) if exc.args and isinstance(exc.args[0], dict) else partitions
                log.warning("%s trainer: %s out of range in the same log; reading on from its start", self.model, gone)
                for tp in gone:
                    await consumer.seek_to_beginning(tp)
                continue
            started = time.perf_counter()
            batch = await self._learn_batch(learner, position, fetched) if fetched else None
            if batch is not None:
                last_event = time.monotonic()
            idle = time.monotonic() - last_event >= self.cfg.idle_publish_s
            if self._unpublished and (learner.due() or idle):
                await self._publish(consumer, learner, position, epoch)
                last_renew = time.monotonic()  # a publish under the epoch proves the lease
            if batch is not None and self.on_batch is not None:  # after the publish: a batch counts once served
                self.on_batch(*batch, time.perf_counter() - started)

    async def _learn_batch(self, learner: LineageLearner, position: LineagePosition, fetched: dict) -> tuple[int, int]:
        """Hand one fetch's valid events to the learner and move the position past every message;
        returns (valid events, learned)."""
        messages = [m for tp in sorted(fetched, key=lambda t: t.partition) for m in fetched[tp]]
        raw = [
            RawMessage(value=m.value, key=m.key, topic=m.topic, partition=m.partition, offset=m.offset)
            for m in messages
        ]
        cfg = self.settings.ingest
        accepted, _ = parse_batch(raw, cfg.max_event_bytes, cfg.require_key)  # ingest dead-letters the rest
        # the same claims as ingest's: a producer's retry, or another event under a taken id, is
        # not learned, so every learner and the state agree on what the events were
        claimed = await self.claims.claim([(a.event, a.msg.partition, a.msg.offset) for a in accepted])
        valid = [a.event for a, c in zip(accepted, claimed) if c.verdict == "canonical"]
        learned = await learner.handle(valid)
        for m in messages:
            position.next_offsets[m.partition] = m.offset + 1
        position.messages += len(messages)
        position.events += len(valid)
        position.learned += learned
        self._unpublished += len(messages)
        return len(valid), learned

    async def _publish(
        self, consumer: AIOKafkaConsumer, learner: LineageLearner, position: LineagePosition, epoch: int
    ) -> None:
        parts = await learner.snapshot_parts()
        position.epoch, position.owner = epoch, self.owner
        parts[OFFSETS_PART] = position.to_bytes()
        # the publish is fenced; the lease renewal beside it keeps a long publish from expiring it
        if await acquire_lease(self.redis, self.keys, self.owner, self.ttl_ms) != epoch:
            raise LeaseLost(f"lease lost before publishing at epoch {epoch}")
        version = await publish_snapshot(self.redis, self.keys, parts, epoch=epoch)
        learner.published(version)
        self._unpublished = 0
        self.stats.version = version
        log.info("%s v%d published at epoch %d (%d messages learned)", self.model, version, epoch, position.messages)
        commit = {
            TopicPartition(position.topic, p): OffsetAndMetadata(o, f"v{version}")
            for p, o in position.next_offsets.items()
        }
        try:
            await consumer.commit(commit)
        except Exception as exc:  # the snapshot holds the offsets; the group's copy is for lag dashboards
            log.debug("%s: committing the published offsets failed: %s", self.model, exc)

    async def _update_lag(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Messages on the broker not yet consumed here, per partition (the ingest group's lag is
        exported by ``streams.worker.ConsumerLag``)."""
        lag: dict[int, int] = {}
        for tp in partitions:
            high = consumer.highwater(tp)
            if high is not None:
                lag[tp.partition] = max(int(high) - int(await consumer.position(tp)), 0)
        self.stats.lag = lag
