"""Worker throughput on ML-100K beside raw aiokafka consumption of the same topic, same run.

Why the raw figure: it is the ceiling the broker and client allow on this machine; the ratio
says how much of it the worker's validation, dead-lettering and idempotent Redis writes cost.
Also measures the time from `driftrec up` (a cold Tansu start + topic creation) to ready.

    python benchmarks/worker_throughput.py [--data events.jsonl] [--limit N] [--learners]

The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks._common import emit
from driftrec import embedded
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, delete_prefix, free_port, wait_for
from driftrec.streams.replay import publish, source_items

log = logging.getLogger("bench.worker")


async def raw_consume(settings: Settings, expected: int) -> float:
    """Seconds for a bare aiokafka consumer (no group, no processing) to read every message."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=2000,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        seen, started = 0, time.perf_counter()
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            seen += sum(len(msgs) for msgs in batches.values())
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k", help="ml-100k or a JSONL file of events")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--learners", action="store_true", help="run the worker with every learner enabled")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for chatty in ("kafka", "aiokafka", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)

    home = Path(tempfile.mkdtemp(prefix="driftrec-bench-"))
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        home=home,
        key_prefix=f"bench{run}",
        worker_id=f"bench-{run}",
        worker_web_port=free_port(),
        topic_prefix=f"b{run}.",
    )
    for section in ("memory", "dsl", "tpp"):
        getattr(settings, section).enabled = args.learners

    t0 = time.perf_counter()
    embedded.up(settings)
    up_seconds = time.perf_counter() - t0
    worker = None
    try:
        items = source_items(settings, args.data, args.limit)
        n = sum(1 for item in items if not isinstance(item, tuple))
        report = publish(settings, items, total=len(items), progress=True, source=args.data)
        log.info("published %d events at %.0f ev/s", report.published, report.rate)

        raw_s = asyncio.run(raw_consume(settings, n))
        log.info("raw aiokafka: %d messages in %.2f s (%.0f msg/s)", n, raw_s, n / raw_s)

        worker = WorkerProcess(settings, home / "worker.log").start()
        first = cast(
            float,
            wait_for(
                lambda: (m := worker.metrics()) and m["driftrec_events_processed_total"] > 0 and time.perf_counter(),
                120,
                "first processed event",
                worker,
                interval=0.05,
            ),
        )
        last_log = time.perf_counter()

        def done() -> float | None:
            nonlocal last_log
            m = worker.metrics() or {}
            processed = float(m.get("driftrec_events_processed_total", 0))
            if time.perf_counter() - last_log > 5:
                last_log = time.perf_counter()
                log.info("worker: %d/%d processed (%.0f ev/s)", processed, n, processed / (last_log - first))
            return time.perf_counter() if processed >= n else None

        end = wait_for(done, 1800, "all events processed", worker, interval=0.05)
        worker_s = float(cast(float, end)) - float(first)
    finally:
        if worker:
            worker.stop()
        embedded.down(settings)
        delete_prefix(settings)
        redis.Redis.from_url(settings.redis_url).close()

    figures = {
        "events": n,
        "worker_events_per_s": round(n / worker_s, 1),
        "raw_aiokafka_events_per_s": round(n / raw_s, 1),
        "worker_to_raw_ratio": round((n / worker_s) / (n / raw_s), 4),
        "publish_events_per_s": round(report.rate, 1),
        "up_to_ready_s": round(up_seconds, 3),
        "learners": args.learners,
    }
    emit("worker_throughput", figures)


if __name__ == "__main__":
    main()
