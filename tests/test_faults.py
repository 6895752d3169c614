"""Faults against real processes: a real broker, a real worker, a real (own, killable) Redis.

Each case once lost good events while the worker stayed up: ~1 MB messages whose dead letters
exceeded the producer's limit, a Redis killed or frozen mid-stream, and event ids reused with
other contents. Here every good event must end up applied, exactly once, and every bad one in
the dead-letter topic with its reason.
"""

from __future__ import annotations

import asyncio

import orjson

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, free_port, wait_for
from driftrec.procs import RedisServer
from driftrec.storage.client import connect
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot
from driftrec.streams.datasets import taobao_sample_events
from driftrec.streams.lineage import OFFSETS_PART, LineagePosition
from driftrec.streams.log_identity import BrokerLog
from driftrec.streams.producer import EventProducer
from driftrec.streams.replay import publish
from tests.conftest import SHARED_DATA
from tests.state_model import expected_state, redis_state
from tests.test_worker_integration import read_dlq


def _good(n: int) -> list[Event]:
    return sorted(taobao_sample_events(SHARED_DATA), key=lambda e: e.ts)[:n]


def _applied(settings: Settings, events: list[Event]) -> bool:
    return redis_state(settings) == expected_state(events, settings.key_prefix, settings.user_seq_len)


def test_large_keyless_and_reused_ids_lose_no_good_event(isolated: Settings, tmp_path) -> None:
    settings = isolated.model_copy(deep=True)
    settings.tpp.enabled = False  # the DSL trainer stands for the learners: it must agree with the state
    settings.serving.kafka_agent = False
    good = _good(300)
    first, rest = good[:150], good[150:]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, first, progress=False)
        wait_for(lambda: _applied(settings, first), 120, "the first events applied", worker)
        with EventProducer(settings, max_request_size=4 << 20) as producer:
            for i in range(5):  # ~900 KB each: refused unparsed, their letters cut to fit
                big = {"event_id": f"big{i}", "user_id": "u-big", "pad": "x" * 900_000}
                producer.send_raw(orjson.dumps(big), key=b"u-big")
            for i in range(10):  # valid events without a key
                e = first[i].model_copy(update={"event_id": f"keyless{i}"})
                producer.send_raw(e.to_bytes(), key=None)
            for e in first[:20]:  # another user's event under a taken id
                other = e.model_copy(update={"user_id": f"{e.user_id}-other", "item_id": "not-this"})
                producer.send_raw(other.to_bytes(), key=other.user_id.encode())
            for e in first[20:40]:  # a producer's retry: the same event again
                producer.send_raw(e.to_bytes(), key=e.user_id.encode())
        publish(settings, rest, progress=False)
        wait_for(lambda: _applied(settings, good), 120, "every good event applied exactly once", worker)
        letters = read_dlq(settings, expected=35)
        reasons = [letter["reason"] for letter in letters]
        oversized = [letter for letter in letters if "exceeds ingest.max_event_bytes" in letter["reason"]]
        assert len(oversized) == 5
        assert all(letter["truncated"] and letter["original_bytes"] > 900_000 for letter in oversized)
        assert sum("no key" in r for r in reasons) == 10
        assert sum("is taken by the copy at partition" in r for r in reasons) == 20
        assert len(letters) == 35
        # the trainer reads the same log and reaches the same verdicts: it saw the 300 events
        wait_for(
            lambda: (m := worker.metrics()) and m.get('driftrec_learner_seen_total{learner="trainer"}') == len(good),
            60,
            "the trainer to have seen each good event once",
            worker,
        )
        m = worker.metrics() or {}
        assert m["driftrec_events_processed_total"] == len(good)
        assert m["driftrec_events_duplicate_total"] == 20
        assert m.get('driftrec_agent_failures_total{agent="ingest"}', 0) == 0
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()


def test_redis_killed_frozen_and_a_worker_killed_mid_retry_lose_nothing(isolated: Settings, tmp_path) -> None:
    own = RedisServer(tmp_path / "redis", free_port()).start()
    settings = isolated.model_copy(update={"redis_url": own.url, "worker_roles": frozenset({"ingest"})}, deep=True)
    settings.tpp.enabled = settings.dsl.enabled = False
    settings.serving.kafka_agent = False
    settings.redis_socket_timeout_s = 0.5
    events = _good(1500)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, events[:500], progress=False)
        wait_for(lambda: _applied(settings, events[:500]), 120, "the first events applied", worker)

        own.kill()  # Redis dies; events keep coming; the worker is killed while it waits
        publish(settings, events[500:1000], progress=False)
        wait_for(
            lambda: (m := worker.metrics()) and m.get('driftrec_transient_failures_total{agent="ingest"}', 0) >= 3,
            30,
            "ingest to wait for Redis",
            worker,
        )
        assert (worker.health() or {}).get("failing_agents") == ["ingest"]
        worker.kill()
        own.start()
        worker = WorkerProcess(settings, tmp_path / "worker2.log").start()
        wait_for(lambda: _applied(settings, events[:1000]), 120, "the held batch redelivered and applied", worker)

        own.pause()  # Redis hangs: calls time out and are retried
        publish(settings, events[1000:], progress=False)
        wait_for(
            lambda: (m := worker.metrics()) and m.get('driftrec_transient_failures_total{agent="ingest"}', 0) >= 2,
            30,
            "ingest to time out on the frozen Redis",
            worker,
        )
        own.resume()
        wait_for(lambda: _applied(settings, events), 120, "every event applied after the pause", worker)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
        own.stop()


def test_a_broker_restart_loses_only_what_it_held_and_the_producer_recovers(isolated: Settings, tmp_path) -> None:
    """The embedded broker keeps nothing when it stops (README); the same producer and worker must
    carry on on the new one, and every event published after it is up must be applied and learned:
    offsets restart at 0 there, below the read positions of the old log (streams/log_identity.py)."""
    from driftrec import embedded

    own = isolated.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}", "home": tmp_path}, deep=True)
    own.tpp.enabled = False  # the DSL trainer stands for the learners: its offsets must move to the new log
    own.serving.kafka_agent = False
    events = _good(600)
    embedded.up(own)
    worker = None
    try:
        old_log = asyncio.run(BrokerLog(own).current())
        worker = WorkerProcess(own, tmp_path / "worker.log").start()
        with EventProducer(own) as producer:
            for e in events[:300]:
                producer.send(e)
            producer.flush()
            wait_for(lambda: _applied(own, events[:300]), 120, "the first half applied", worker)
            _wait_learned(own, worker, 300)
            embedded.down(own)
            embedded.up(own)  # empty: topics declared again
            new_log = asyncio.run(BrokerLog(own).current())
            assert new_log and new_log != old_log  # each start of the embedded broker is a new log
            for e in events[300:]:
                producer.send(e)
            producer.flush()
            assert producer.rebuilds >= 1  # the old client had gone fatal; a new one took over
        wait_for(lambda: _applied(own, events), 120, "the second half applied on the new broker", worker)
        # the trainer learned the new log from offset 0, and its snapshot says which log the offsets count in
        _wait_learned(own, worker, 600)
        wait_for(lambda: _snapshot_position(own).log_id == new_log, 60, "a snapshot stamped with the new log", worker)
        wait_for(lambda: sum(_snapshot_position(own).next_offsets.values()) >= 300, 60, "the new log learned", worker)
        wait_for(
            lambda: ((worker.metrics() or {}).get("driftrec_broker_log_replaced_total") or 0) >= 1,
            30,
            "ingest to have noticed the new log",
            worker,
        )
    finally:
        if worker is not None:
            worker.stop()
        embedded.down(own)


def _wait_learned(settings: Settings, worker: WorkerProcess, n: int) -> None:
    wait_for(
        lambda: (worker.metrics() or {}).get('driftrec_learner_seen_total{learner="trainer"}', 0) >= n,
        120,
        f"the trainer to have seen {n} events",
        worker,
    )


def _snapshot_position(settings: Settings) -> LineagePosition:
    async def read() -> LineagePosition:
        redis = connect(settings)
        try:
            found = await load_snapshot(redis, SnapshotKeys(settings.key_prefix, "dsl"))
        finally:
            await redis.aclose()
        parts = found[1] if found else {}
        return LineagePosition.from_bytes(parts.get(OFFSETS_PART), settings.events_topic)

    return asyncio.run(read())
