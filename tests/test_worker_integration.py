"""The ingest path end to end: producer → real broker → real worker process → real Redis / DLQ."""

from __future__ import annotations

import asyncio
from typing import cast

import orjson
from aiokafka import AIOKafkaConsumer

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings, get_settings
from driftrec.harness import WorkerProcess, wait_for
from driftrec.storage.client import connect_sync
from driftrec.streams.datasets import ml100k_events, taobao_sample_events
from driftrec.streams.producer import EventProducer
from driftrec.streams.replay import publish
from tests.conftest import SHARED_DATA
from tests.state_model import expected_state, redis_state

BAD_MESSAGES: list[tuple[bytes | None, bytes, str]] = [
    (b"u1", b"{oops", "malformed JSON"),
    (b"u1", b'{"event_id":"bad1","user_id":"u1","item_id":"i","ts":"yesterday","kind":"click"}', "ts"),
    (b"u2", b'{"event_id":"bad2","user_id":"u2","item_id":"i","ts":880000000,"kind":"click","label":7}', "label"),
    (b"u3", b'{"event_id":"bad3","user_id":"u3","item_id":"i","ts":9e15,"kind":"click"}', "outside"),
    (
        b"u4",
        b'{"event_id":"bad4","user_id":"u4","item_id":"i","ts":880000000,"kind":"click","extra":1}',
        "Extra inputs",
    ),
    (b"u5", b'{"event_id":"bad5","item_id":"i","ts":880000000,"kind":"click"}', "user_id: Field required"),
]


def real_slice() -> list[Event]:
    """5,000 ML-100K events plus the whole Taobao sample, in time order."""
    events = ml100k_events(get_settings().data_cache, limit=5000) + taobao_sample_events(SHARED_DATA)
    return sorted(events, key=lambda e: e.ts)


def read_dlq(settings: Settings, expected: int, timeout_s: float = 20.0) -> list[dict]:
    async def consume() -> list[dict]:
        consumer = AIOKafkaConsumer(
            settings.dlq_topic,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        letters: list[dict] = []
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while len(letters) < expected and loop.time() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                letters += [orjson.loads(m.value) for msgs in batches.values() for m in msgs]
        finally:
            await consumer.stop()
        return letters

    return asyncio.run(consume())


def state_reaches(settings: Settings, expected: dict) -> bool:
    return redis_state(settings) == expected


def test_replay_builds_exact_state_and_dead_letters_bad_input(isolated: Settings, tmp_path) -> None:
    events = real_slice()
    expected = expected_state(events, isolated.key_prefix, isolated.user_seq_len)
    worker = WorkerProcess(isolated, tmp_path / "worker.log").start()
    try:
        publish(isolated, events[:3000], progress=False)
        with EventProducer(isolated) as producer:
            for key, value, _ in BAD_MESSAGES:
                producer.send_raw(value, key=key)
        publish(isolated, events[3000:], progress=False)
        wait_for(
            lambda: (m := worker.metrics()) and m["driftrec_events_processed_total"] >= len(events),
            120,
            "every event processed",
            worker,
        )
        wait_for(lambda: state_reaches(isolated, expected), 30, "Redis state of all events", worker, interval=1)

        letters = read_dlq(isolated, len(BAD_MESSAGES))
        assert len(letters) == len(BAD_MESSAGES)
        by_original = {letter["original"]: letter for letter in letters}
        for key, value, reason in BAD_MESSAGES:
            letter = by_original[value.decode()]
            assert reason in letter["reason"]
            assert letter["key"] == key.decode() and letter["topic"] == isolated.events_topic

        metrics = cast(
            dict[str, float],
            wait_for(
                lambda: (m := worker.metrics()) and m["driftrec_events_processed_total"] == len(events) and m,
                10,
                "metrics",
                worker,
            ),
        )
        assert metrics["driftrec_events_dead_lettered_total"] == len(BAD_MESSAGES)

        # Redelivery: the very same events again change nothing.
        publish(isolated, events, progress=False)
        wait_for(
            lambda: (m := worker.metrics()) and m["driftrec_events_duplicate_total"] == len(events),
            120,
            "duplicates to be recognised",
            worker,
        )
        assert redis_state(isolated) == expected
        assert worker.proc is not None and worker.proc.poll() is None, "worker must survive bad input"
    finally:
        worker.stop()


def test_worker_killed_mid_stream_converges_to_the_same_state(isolated: Settings, tmp_path) -> None:
    events = real_slice()
    expected = expected_state(events, isolated.key_prefix, isolated.user_seq_len)
    log = tmp_path / "worker.log"
    half = len(events) // 2
    worker = WorkerProcess(isolated, log).start()
    try:
        publish(isolated, events[:half], progress=False)
        wait_for(
            lambda: (m := worker.metrics()) and m["driftrec_events_processed_total"] >= 1000,
            120,
            "the worker to be mid-stream",
            worker,
        )
        worker.kill()
        # the second half is published while no worker runs, so the kill lands mid-stream by
        # construction (not by winning a race against a fast worker)
        publish(isolated, events[half:], progress=False)
        partial = redis_state(isolated)
        assert partial != expected, "the kill must land mid-stream for this test to mean anything"
        worker = WorkerProcess(isolated, log).start()
        wait_for(lambda: state_reaches(isolated, expected), 180, "state after restart", worker, interval=2)
        # the wide layer learned every labelled event: each has its marker in its user's slot,
        # which the slot's script sets in the same step that adds the event (so once at most)
        labelled = {e.event_id for e in events if e.label is not None}
        client = connect_sync(isolated)

        def wide_learned() -> bool:
            pattern = f"{isolated.key_prefix}:{{u:*}}:wseen:*"
            return sum(1 for _ in client.scan_iter(match=pattern, count=2000)) == len(labelled)

        wait_for(wide_learned, 60, "the wide layer to learn every labelled event", worker, interval=1)
    finally:
        worker.stop()
