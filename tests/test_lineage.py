"""One model lineage across real processes: scale-out ingest, leased trainers, SIGKILL, SIGSTOP.

Every test here starts real `driftrec worker --roles ingest` and `driftrec trainer` processes on
the session's broker and Redis (or the local Redis Cluster) and checks the learning plane's
contract from outside: versions only grow and each is published by the lease holder of its
time, the newest snapshot's offsets account for every published event exactly once, ingest state
equals the single-process reference, and a frozen trainer cannot publish after it wakes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings, get_settings
from driftrec.harness import WorkerProcess, delete_prefix, free_port, wait_for
from driftrec.storage.client import connect_sync
from driftrec.storage.snapshots import SnapshotKeys
from driftrec.streams.datasets import ml100k_events
from driftrec.streams.replay import publish
from tests.state_model import expected_state, redis_state

pytestmark = pytest.mark.integration


def fast_failover(settings: Settings, tpp: bool = True) -> Settings:
    s = settings.model_copy(deep=True)
    s.lineage = s.lineage.model_copy(update={"lease_ttl_s": 4.0, "standby_poll_s": 0.5, "idle_publish_s": 1.0})
    s.tpp.enabled = tpp
    s.dsl.snapshot_every_s = s.tpp.snapshot_every_s = 2.0  # several publishes while a half streams in
    s.serving.kafka_agent = False
    return s


def process(settings: Settings, log: Path, role: str) -> WorkerProcess:
    own = settings.model_copy(update={"worker_web_port": free_port()})
    command = ("trainer",) if role == "trainer" else ("worker", "--roles", "ingest")
    return WorkerProcess(own, log, command)


@dataclass(frozen=True)
class Seen:
    version: int
    epoch: int
    owner: str
    messages: int
    events: int
    learned: int


class LineageWatch:
    """Polls a lineage's ``latest`` in the background and keeps every version it sees."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.keys = SnapshotKeys(settings.key_prefix, model)
        self.client = connect_sync(settings)
        self.seen: dict[int, Seen] = {}
        self.order: list[int] = []  # versions in the order `latest` showed them
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the poller and the test's own reads share one record
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> LineageWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.latest()
            time.sleep(0.05)

    def latest(self) -> Seen | None:
        with self._lock:
            return self._latest()

    def _latest(self) -> Seen | None:
        raw = self.client.get(self.keys.latest)
        if raw is None:
            return None
        version = int(cast(bytes, raw))
        if version not in self.seen:
            blob = self.client.hget(self.keys.blob(version), "offsets")
            if blob is None:
                return None
            o = orjson.loads(cast(bytes, blob))
            self.seen[version] = Seen(version, o["epoch"], o["owner"], o["messages"], o["events"], o["learned"])
            self.order.append(version)
        return self.seen[version]

    def assert_one_lineage(self) -> None:
        """Versions appear strictly increasing; epochs never go back; one owner per epoch."""
        assert self.order == sorted(self.order) and len(set(self.order)) == len(self.order)
        epochs = [self.seen[v].epoch for v in self.order]
        assert epochs == sorted(epochs), f"a publish under an older epoch reached latest: {epochs}"
        owners: dict[int, set[str]] = {}
        for v in self.order:
            owners.setdefault(self.seen[v].epoch, set()).add(self.seen[v].owner)
        assert all(len(o) == 1 for o in owners.values()), owners
        counts = [self.seen[v].messages for v in self.order]
        assert counts == sorted(counts), "a later version learned less than an earlier one"


def active_trainer(trainers: list[WorkerProcess], model: str) -> WorkerProcess | None:
    for t in trainers:
        h = t.health()
        if h and h.get("lineages", {}).get(model, {}).get("active"):
            return t
    return None


def publish_slowly(
    settings: Settings,
    events: list[Event],
    seconds: float = 8.0,
    chunk: int = 250,
    hold: tuple[int, threading.Event] | None = None,
) -> threading.Thread:
    """Publish ``events`` over about ``seconds`` in the background (so a kill lands mid-stream).

    ``hold=(n, release)``: after the first ``n`` events, wait until ``release`` is set (at most
    120 s) before the rest, so a kill meant to land mid-stream does by construction, however
    slowly a loaded machine lets the learners reach the point the test waits for."""
    pause_s = seconds / max(len(events) // chunk, 1)

    def run() -> None:
        for start in range(0, len(events), chunk):
            if hold is not None and start >= hold[0] > start - chunk:
                hold[1].wait(120)
            publish(settings, events[start : start + chunk], progress=False)
            time.sleep(pause_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def stopper() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for p in started:
        p.stop()


def run_failover(settings: Settings, tmp_path: Path, stopper: list[WorkerProcess], n_ingest: int, n: int) -> None:
    """n_ingest ingest workers + 2 trainers over ``n`` ML-100K events, killing the active trainer
    mid-stream (then timing the standby's first publish with no new events) and one ingest worker."""
    events = ml100k_events(get_settings().data_cache, limit=n)
    trainers = [process(settings, tmp_path / f"trainer{i}.log", "trainer") for i in range(2)]
    ingest = [process(settings, tmp_path / f"ingest{i}.log", "ingest") for i in range(n_ingest)]
    for p in trainers + ingest:
        stopper.append(p.start())
    half = n // 2
    with LineageWatch(settings, "dsl") as dsl, LineageWatch(settings, "tpp") as tpp:
        release = threading.Event()
        producer = publish_slowly(settings, events[:half], hold=(half // 2, release))
        wait_for(lambda: (s := dsl.latest()) and s.messages >= half // 5, 180, "the DSL lineage into the stream")
        victim = active_trainer(trainers, "dsl")
        assert victim is not None and victim.proc is not None
        victim_led = {m for m, st in cast(dict, victim.health())["lineages"].items() if st["active"]}
        killed_epoch = cast(Seen, dsl.latest()).epoch
        assert producer.is_alive(), "the kill must land while events still stream in"
        victim.kill()
        killed_at = time.monotonic()
        release.set()
        producer.join(60)
        survivor = next(t for t in trainers if t is not victim)
        # the standby takes the lease and publishes what the victim had not, with no new events
        wait_for(
            lambda: (s := dsl.latest()) and s.epoch > killed_epoch and s.messages == half,
            60,
            "the standby's publish of the first half",
            survivor,
        )
        failover_s = time.monotonic() - killed_at
        assert failover_s < settings.lineage.lease_ttl_s + 30

        producer = publish_slowly(settings, events[half:])
        wait_for(
            lambda: (m := ingest[0].metrics()) and m.get("driftrec_events_processed_total", 0) > 0, 60, "ingest busy"
        )
        ingest[-1].kill()  # an ingest worker dies mid-stream; the group hands its partitions on
        producer.join(120)
        wait_for(lambda: (s := dsl.latest()) and s.messages == n, 240, "the DSL lineage to learn every event", survivor)
        if settings.tpp.enabled:
            wait_for(
                lambda: (s := tpp.latest()) and s.messages == n, 240, "the TPP lineage to learn every event", survivor
            )
        expected = expected_state(events, settings.key_prefix, settings.user_seq_len)
        wait_for(lambda: redis_state(settings) == expected, 240, "ingest state equal to the single-worker reference")
        for model, watch in (("dsl", dsl), ("tpp", tpp)) if settings.tpp.enabled else (("dsl", dsl),):
            final = cast(Seen, watch.latest())
            # every valid event learned exactly once: the offsets account for each message once
            assert (final.messages, final.events, final.learned) == (n, n, n), final
            watch.assert_one_lineage()
            if model in victim_led:  # the lineage really changed hands (the victim may not have published it yet)
                assert final.epoch >= 2 and final.owner != ""
        health = survivor.health()
        assert health is not None and health["lineages"]["dsl"]["active"]


def test_scale_out_and_failover_keep_one_lineage(
    isolated: Settings, tmp_path: Path, stopper: list[WorkerProcess]
) -> None:
    run_failover(fast_failover(isolated), tmp_path, stopper, n_ingest=3, n=20_000)


def test_a_frozen_trainer_cannot_publish_after_it_wakes(
    isolated: Settings, tmp_path: Path, stopper: list[WorkerProcess]
) -> None:
    settings = fast_failover(isolated, tpp=False)
    events = ml100k_events(get_settings().data_cache, limit=4000)
    first = process(settings, tmp_path / "a.log", "trainer")
    stopper.append(first.start())
    with LineageWatch(settings, "dsl") as dsl:
        publish(settings, events[:2000], progress=False)
        wait_for(lambda: (s := dsl.latest()) and s.messages == 2000, 120, "A's snapshot of 2,000 events", first)
        a_epoch = cast(Seen, dsl.latest()).epoch
        second = process(settings, tmp_path / "b.log", "trainer")
        stopper.append(second.start())
        first.pause()  # frozen past its lease: B takes over
        wait_for(lambda: active_trainer([second], "dsl"), 30, "B to take the lease", second)
        publish(settings, events[2000:], progress=False)
        wait_for(lambda: (s := dsl.latest()) and s.messages == 4000, 120, "B's snapshot of every event", second)
        first.resume()
        wait_for(lambda: (h := first.health()) and "dsl" in h["lost_lease"], 30, "A to notice the lost lease", first)
        metrics = cast(dict[str, float], first.metrics())
        assert metrics['driftrec_lineage_lease_lost_total{model="dsl"}'] >= 1
        publish(settings, events[:1], progress=False)  # one more message: B learns it, A must not publish
        wait_for(lambda: (s := dsl.latest()) and s.messages == 4001, 60, "B's publish after A woke", second)
        time.sleep(2.0)
        dsl.assert_one_lineage()
        after = [dsl.seen[v] for v in dsl.order if dsl.seen[v].epoch != a_epoch]
        assert after and all(s.owner == after[0].owner for s in after)
        assert all(dsl.seen[v].epoch == a_epoch for v in dsl.order[: dsl.order.index(after[0].version)])
        # the trainer group's committed offsets are those of the published snapshot, no further
        committed = asyncio.run(committed_offsets(settings, f"{settings.worker_id}-trainer-dsl"))
        assert sum(committed.values()) == 4001


async def committed_offsets(settings: Settings, group: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for p in range(settings.events_partitions):
            offset = await consumer.committed(TopicPartition(settings.events_topic, p))
            out[p] = offset or 0
        return out
    finally:
        await consumer.stop()


def test_failover_on_a_redis_cluster(
    isolated: Settings, cluster: str, tmp_path: Path, stopper: list[WorkerProcess]
) -> None:
    settings = fast_failover(isolated.model_copy(update={"redis_url": cluster, "redis_cluster": True}), tpp=True)
    try:
        run_failover(settings, tmp_path, stopper, n_ingest=2, n=6000)
    finally:
        for p in stopper:
            p.stop()
        delete_prefix(settings)
