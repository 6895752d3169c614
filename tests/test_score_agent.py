"""The Kafka scoring path end to end: real broker → real worker process (score agent) → results."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.asyncio import Redis

from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from tests.test_serving import TS, snapshot_parts

GOOD: list[dict[str, Any]] = [
    {"request_id": f"r{k}", "user_id": f"u{k}", "candidates": [f"i{j}" for j in range(k, k + 5)], "ts": TS}
    for k in range(3)
]
BAD: list[tuple[bytes, str | None, str]] = [
    (b'{"request_id": "broken-1", "user_id": ', None, "malformed_json"),  # unreadable: no id
    (orjson.dumps({"request_id": "bad-2", "user_id": "u", "candidates": []}), "bad-2", "validation_error"),
    (orjson.dumps({"request_id": "bad-3", "user_id": 7, "candidates": ["a"]}), "bad-3", "validation_error"),
    (orjson.dumps({"user_id": "u", "candidates": ["a"]}), None, "validation_error"),  # no request_id at all
]


async def _exchange(settings: Settings, expected: int, timeout_s: float = 60.0) -> list[dict]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    consumer = AIOKafkaConsumer(
        settings.score_results_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await producer.start()
    await consumer.start()
    results: list[dict] = []
    try:
        for i, req in enumerate(GOOD):
            await producer.send_and_wait(settings.score_requests_topic, orjson.dumps(req), key=req["user_id"].encode())
            if i == 0:  # malformed requests in the middle of good ones: the agent must keep going
                for value, _, _ in BAD:
                    await producer.send_and_wait(settings.score_requests_topic, value, key=b"k")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(results) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for msgs in batches.values():
                for m in msgs:
                    doc = orjson.loads(m.value)
                    doc["_key"] = None if m.key is None else m.key.decode()
                    results.append(doc)
    finally:
        await consumer.stop()
        await producer.stop()
    return results


async def _publish(settings: Settings) -> int:
    client = Redis.from_url(settings.redis_url)
    try:
        return await publish_snapshot(client, SnapshotKeys(settings.key_prefix, "dsl"), snapshot_parts())
    finally:
        await client.aclose()


def test_score_agent_answers_requests_and_survives_bad_ones(isolated: Settings, tmp_path) -> None:
    version = asyncio.run(_publish(isolated))
    worker = WorkerProcess(isolated, tmp_path / "worker.log").start()
    try:
        results = asyncio.run(_exchange(isolated, len(GOOD) + len(BAD)))
        assert len(results) == len(GOOD) + len(BAD), worker.log_tail()
        by_id: dict[str | None, list[dict]] = {}
        for r in results:
            by_id.setdefault(r["request_id"], []).append(r)
        for req in GOOD:
            (res,) = by_id[req["request_id"]]
            assert res["error"] is None and res["_key"] == req["request_id"]
            body = res["response"]
            assert body["user_id"] == req["user_id"] and body["model_version"] == version
            assert sorted(x["item_id"] for x in body["items"]) == sorted(req["candidates"])
            scores = [x["score"] for x in body["items"]]
            assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for _, rid, kind in BAD:
            matches = [r for r in by_id.get(rid, []) if r["error"] and r["error"]["error"] == kind]
            assert matches, (rid, kind, by_id.get(rid))
            assert all(r["response"] is None and r["error"]["message"] for r in matches)
        assert worker.proc is not None and worker.proc.poll() is None, "the worker must survive bad requests"
    finally:
        worker.stop()
