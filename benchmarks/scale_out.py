"""The learning plane's scale-out figures, in one run on one embedded broker.

1. **Ingest events/s with 1, 2 and 3 workers** (`driftrec worker --roles ingest`, one consumer
   group each run, fresh topic) over the same events, beside raw aiokafka consumption of that
   topic (the ceiling the broker and client allow here).
2. **Trainer events/s**: the DSL lineage's learner alone (``DSLTrainer.handle``, no broker),
   micro-batches of ``worker_batch_size``.
3. **Failover**: two `driftrec trainer` processes; the active one is SIGKILLed mid-stream; the
   time from the kill to the standby's first publish, with no new events arriving.
4. **Scoring p99 at 100 candidates on a single Redis and on a local 3-master Redis Cluster**
   (``benchmarks/serving_latency.py`` run twice, ``--counts 100``).

    python benchmarks/scale_out.py [--data ml-100k|events.jsonl] [--limit N]

On a 2-core machine every extra worker competes for the same two cores as the broker, Redis and
the producer: the scaling ratio is bounded by the cores and is reported with ``cpu_cores``.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit, private_settings, quiet_logging
from benchmarks.worker_throughput import raw_consume
from driftrec import embedded
from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, delete_prefix, free_port, wait_for
from driftrec.storage.client import connect, connect_sync
from driftrec.storage.snapshots import SnapshotKeys
from driftrec.streams.replay import publish, source_items
from driftrec.streams.topics import ensure_topics

log = logging.getLogger("bench.scale_out")


def _fresh(settings: Settings, tag: str) -> Settings:
    """Own topics, group and key prefix for one measurement on the shared broker."""
    run = uuid.uuid4().hex[:6]
    s = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}{tag}{run}.",
            "key_prefix": f"{settings.key_prefix}{tag}{run}",
            "worker_id": f"{settings.worker_id}-{tag}{run}",
        },
        deep=True,  # each measurement changes its own sections
    )
    ensure_topics(s)
    return s


def ingest_rate(settings: Settings, events: list[Event], workers: int, home: Path) -> tuple[float, float]:
    """(ingest events/s with ``workers`` processes, raw aiokafka events/s) on a fresh topic."""
    s = _fresh(settings, f"i{workers}")
    s.worker_roles = frozenset({"ingest"})
    for section in ("dsl", "tpp", "memory"):
        getattr(s, section).enabled = False
    procs = [
        WorkerProcess(s.model_copy(update={"worker_web_port": free_port()}), home / f"ingest{workers}-{i}.log")
        for i in range(workers)
    ]
    try:
        for p in procs:
            p.start()

        def assigned() -> list[int]:
            return [
                sum(1 for k in (p.metrics() or {}) if k.startswith("driftrec_consumer_lag{") and s.events_topic in k)
                for p in procs
            ]

        def processed() -> float:
            return sum((p.metrics() or {}).get("driftrec_events_processed_total", 0) for p in procs)

        # warm-up: a few hundred events, until every worker holds partitions and all are held, so
        # no rebalance falls inside the measured interval
        warm, measured = events[-500:], events[:-500]
        publish(s, warm, progress=False)
        wait_for(
            lambda: processed() >= len(warm) and all(assigned()) and sum(assigned()) == s.events_partitions,
            240,
            "a stable group",
            interval=0.5,
        )
        # the workers are frozen while the events are published, so the producer's rate does not
        # bound what is measured: the clock runs from their release to the last event ingested
        for p in procs:
            p.pause()
        try:
            publish(s, measured, progress=False)
        finally:
            for p in procs:
                p.resume()
        first = time.perf_counter()
        end = cast(
            float,
            wait_for(lambda: processed() >= len(events) and time.perf_counter(), 1800, "all ingested", interval=0.05),
        )
        raw_s = asyncio.run(raw_consume(s, len(events)))
        rate = len(measured) / (end - first)
        log.info("%d ingest worker(s): %.0f ev/s (raw aiokafka %.0f ev/s)", workers, rate, len(events) / raw_s)
        return rate, len(events) / raw_s
    finally:
        for p in procs:
            p.stop()
        delete_prefix(s)


async def trainer_rate(settings: Settings, events: list[Event]) -> float:
    """DSL micro-batch learning alone (the trainer's handler with its as-of memory reads), events/s."""
    from driftrec.streams.trainer import DSLTrainer

    s = _fresh(settings, "t")
    redis = connect(s)
    try:
        trainer = DSLTrainer(redis, s)
        trainer.restore(None)
        take = s.worker_batch_size
        started, last = time.perf_counter(), time.perf_counter()
        for k in range(0, len(events), take):
            await trainer.handle(events[k : k + take])
            if trainer.due():  # the publish's CPU (serialise, fit hidden statistics), not its Redis write
                await trainer.snapshot_parts()
                trainer.published(0)
            if time.perf_counter() - last > 5:
                last = time.perf_counter()
                log.info("trainer: %d/%d events (%.0f ev/s)", k + take, len(events), (k + take) / (last - started))
        return len(events) / (time.perf_counter() - started)
    finally:
        await redis.aclose()
        delete_prefix(s)


def failover_seconds(settings: Settings, events: list[Event], home: Path) -> float:
    """Kill the active trainer mid-stream; seconds until the standby's first publish."""
    s = _fresh(settings, "f")
    s.tpp.enabled = False
    s.lineage = s.lineage.model_copy(update={"lease_ttl_s": 5.0, "standby_poll_s": 0.5, "idle_publish_s": 1.0})
    s.dsl.snapshot_every_s = 2.0
    keys = SnapshotKeys(s.key_prefix, "dsl")
    client = connect_sync(s)
    trainers = [
        WorkerProcess(s.model_copy(update={"worker_web_port": free_port()}), home / f"trainer{i}.log", ("trainer",))
        for i in range(2)
    ]
    try:
        for t in trainers:
            t.start()
        half = len(events) // 2
        publish(s, events[:half], progress=False)

        def offsets() -> dict[str, int | str]:
            raw = client.get(keys.latest)
            blob = client.hget(keys.blob(int(cast(bytes, raw))), "offsets") if raw else None
            return json.loads(cast(bytes, blob)) if blob else {}

        wait_for(lambda: int(offsets().get("messages", 0)) >= half, 300, "the first half learned")
        # the second half streams in over ~8 s, so the kill lands with learning not yet published
        rest = events[half:]

        def stream_in() -> None:
            for k in range(0, len(rest), 250):
                publish(s, rest[k : k + 250], progress=False)
                time.sleep(8.0 * 250 / len(rest))

        producer = threading.Thread(target=stream_in, daemon=True)
        producer.start()
        wait_for(lambda: int(offsets().get("messages", 0)) > half, 120, "learning of the second half")
        epoch = offsets()["epoch"]
        active = next(t for t in trainers if (t.health() or {}).get("lineages", {}).get("dsl", {}).get("active"))
        assert active.proc is not None
        os.killpg(active.proc.pid, signal.SIGKILL)
        killed = time.perf_counter()
        wait_for(lambda: offsets().get("epoch") != epoch, 120, "the standby's first publish", interval=0.05)
        seconds = time.perf_counter() - killed
        producer.join(60)
        log.info("failover: %.2f s from SIGKILL to the standby's first publish (lease %.0f s)", seconds, 5.0)
        return seconds
    finally:
        for t in trainers:
            t.stop()
        client.close()
        delete_prefix(s)


def scoring_p99(cluster_url: str | None, duration: float) -> float:
    env = dict(os.environ)
    if cluster_url:
        env.update(DRIFTREC_REDIS_URL=cluster_url, DRIFTREC_REDIS_CLUSTER="true")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serving_latency.py"),
            "--counts",
            "100",
            "--duration",
            str(duration),
            "--no-record",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["p99_ms_100"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k", help="ml-100k, taobao-sample or a JSONL file of events")
    parser.add_argument("--limit", type=int, default=30_000)
    parser.add_argument("--scoring-duration", type=float, default=15.0)
    args = parser.parse_args()
    quiet_logging()
    settings = private_settings("scale")
    home = settings.home
    embedded.up(settings)
    figures: dict[str, object] = {"cpu_cores": os.cpu_count() or 0, "partitions": settings.events_partitions}
    try:
        events = [x for x in source_items(settings, args.data, args.limit) if isinstance(x, Event)]
        figures["events"] = len(events)
        for workers in (1, 2, 3):
            rate, raw = ingest_rate(settings, events, workers, home)
            figures[f"ingest_events_per_s_{workers}"] = round(rate, 1)
            figures[f"ingest_to_raw_{workers}"] = round(rate / raw, 4)
            figures[f"raw_aiokafka_events_per_s_{workers}"] = round(raw, 1)
        figures["scaling_3_over_1"] = round(
            cast(float, figures["ingest_events_per_s_3"]) / cast(float, figures["ingest_events_per_s_1"]), 3
        )
        figures["trainer_events_per_s"] = round(asyncio.run(trainer_rate(settings, events)), 1)
        figures["failover_s"] = round(failover_seconds(settings, events[:10_000], home), 2)
        figures["lease_ttl_s"] = 5.0
    finally:
        embedded.down(settings)
    figures["scoring_p99_ms_100_redis"] = round(scoring_p99(None, args.scoring_duration), 3)
    from driftrec.local_cluster import local_cluster

    with local_cluster(home / "cluster") as url:
        figures["scoring_p99_ms_100_cluster"] = round(scoring_p99(url, args.scoring_duration), 3)
    emit("scale_out", figures)


if __name__ == "__main__":
    main()
