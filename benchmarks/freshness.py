"""How fresh the served system is: wall time from an event's publish to its effect on ``/v1/score``.

Real processes on loopback: the embedded broker, Redis, one ``driftrec worker`` (ingest + the
DSL trainer) and the scoring service. After a warm-up (``--warm`` events learned and a snapshot
served), a background producer publishes the dataset's next events at ``--rate`` events/s while
``--probes`` probe events are published, one every ``--probe-every-s``, each a labelled event of a
user never seen before on an item whose category is known. For each probe:

* **applied** (``applied_*``): from the probe's publish until ingest has applied it to the
  user's state in Redis (the broker, the consumer and ingest's micro-batch window);
* **fast path** (``fast_*``): from the probe's publish (``send_and_wait`` returned) until
  ``/v1/score`` for that user and item answers a different ``compensation`` than just before the
  publish — the probe's served error has reached the session memory and is read back. Polled
  every 5 ms.
* **wide** (``wide_*``): from the same publish until the probe's step of the wide layer
  (``models/wide.py``) is in Redis: its new user's feature key exists. The scorer reads that key
  in every request's round trip (no cache), so the next request is scored with it. (Watching the
  served ``wide`` term instead would be fooled: the background stream moves the shared bias and
  item weights all the time.) Measured in the same polls as the fast path.
* **model** (``model_*``): from the same publish until ``/v1/score`` answers with a
  ``model_version`` whose snapshot's recorded offsets cover the probe's offset — the DSL model
  serving has loaded has learned the probe. Polled every 50 ms.

The fast path (``fast_*``) is the probe's served error in the session memory: its event id is a
member of the ``(user, category)`` bucket the scorer reads in every request's round trip. (The
served ``compensation`` moves only once the fusion layer has learned a weight for the memory,
which a fixed-weight run used to stand in for.) This run switches the TPP off; nothing else
differs from the defaults, whose cadences set the figures:
``worker_batch_within_s`` (ingest's micro-batch window), ``dsl.snapshot_every_s`` /
``snapshot_every_steps`` (the trainer's publish cadence) and ``serving.reload_every_s``
(how often serving looks for a new snapshot). They are reported with the figures.

    python benchmarks/freshness.py [--data ml-100k|taobao-sample|events.jsonl] [--rate 200]

The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from benchmarks._common import emit, private_settings, quiet_logging
from driftrec import embedded
from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, free_port, wait_for
from driftrec.models.error_memory import session_code
from driftrec.procs import serving_url, start_server
from driftrec.storage.client import connect
from driftrec.storage.error_memory import MemoryKeys
from driftrec.storage.event_state import StateKeys
from driftrec.storage.snapshots import SnapshotKeys
from driftrec.storage.wide import WideKeys
from driftrec.streams.kafka_client import aiokafka_options
from driftrec.streams.producer import EventProducer
from driftrec.streams.replay import publish, source_items
from driftrec.streams.topics import ensure_topics

log = logging.getLogger("bench.freshness")
FAST_POLL_S = 0.005
MODEL_POLL_S = 0.05


def settings_for_run() -> Settings:
    s: Settings = private_settings("fresh", events_partitions=4)
    s.tpp.enabled = False
    s.serving.kafka_agent = False
    s.serving.port = free_port()
    return s


def background_load(settings: Settings, events: list[Event], rate: float, stop: threading.Event) -> dict[str, float]:
    """Publish ``events`` at ``rate`` per second until ``stop``; what was sent, how fast."""
    sent, started = 0, time.monotonic()
    with EventProducer(settings) as producer:
        for e in events:
            if stop.is_set():
                break
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.send(e)
            sent += 1
    seconds = time.monotonic() - started
    return {"sent": sent, "seconds": seconds}


class Probe:
    """One probe event and the two latencies it measures."""

    def __init__(self, event: Event) -> None:
        self.event = event
        self.applied_s: float | None = None  # ingest applied it to the user's state (the counts key)
        self.fast_s: float | None = None
        self.wide_s: float | None = None
        self.model_s: float | None = None


async def covered(redis, keys: SnapshotKeys, version: int, partition: int, offset: int, cache: dict) -> bool:
    """Whether snapshot ``version`` has learned the message at ``partition``/``offset``."""
    if version not in cache:
        raw = await redis.hget(keys.blob(version), "offsets")
        cache[version] = orjson.loads(raw).get("next", {}) if raw else {}
    return int(cache[version].get(str(partition), 0)) > offset


async def run_probe(
    probe: Probe,
    producer: AIOKafkaProducer,
    client: httpx.AsyncClient,
    settings: Settings,
    redis,
    cache: dict,
    timeout_s: float,
) -> None:
    e = probe.event
    body = {"user_id": e.user_id, "candidates": [e.item_id], "ts": e.ts + 1}
    memory_keys = MemoryKeys.from_settings(settings.key_prefix, settings.dsl.generation, settings.memory.n_shards)
    session_key = memory_keys.session_bucket(session_code(e.user_id, e.category))[0]
    wide_key = WideKeys(settings.key_prefix).feature(e.user_id, f"u:{e.user_id}")
    t0 = time.perf_counter()
    md = await producer.send_and_wait(settings.events_topic, e.to_bytes(), key=e.user_id.encode())
    sent = time.perf_counter()
    deadline = sent + timeout_s
    counts_key = StateKeys(settings.key_prefix).user_counts(e.user_id)
    while time.perf_counter() < deadline:
        if probe.applied_s is None and await redis.exists(counts_key):
            probe.applied_s = time.perf_counter() - t0
        if probe.wide_s is None and await redis.exists(wide_key):
            probe.wide_s = time.perf_counter() - t0
        await client.post("/v1/score", json=body)  # the service under the load a reader gives it
        if probe.fast_s is None and await redis.zscore(session_key, e.event_id) is not None:
            probe.fast_s = time.perf_counter() - t0
        if probe.fast_s is not None and probe.wide_s is not None:
            break
        await asyncio.sleep(FAST_POLL_S)
    keys = SnapshotKeys(settings.key_prefix, "dsl")
    deadline = time.perf_counter() + 4 * timeout_s
    while time.perf_counter() < deadline:
        doc = (await client.post("/v1/score", json=body)).json()
        version = doc.get("model_version")
        if version is not None and await covered(redis, keys, int(version), md.partition, md.offset, cache):
            probe.model_s = time.perf_counter() - t0
            return
        await asyncio.sleep(MODEL_POLL_S)


async def probe_all(settings: Settings, probes: list[Probe], every_s: float, timeout_s: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks=1, **aiokafka_options(settings))
    await producer.start()
    redis = connect(settings)
    cache: dict = {}
    try:
        async with httpx.AsyncClient(base_url=serving_url(settings), timeout=10.0) as client:
            tasks = []
            for k, probe in enumerate(probes):
                tasks.append(asyncio.create_task(run_probe(probe, producer, client, settings, redis, cache, timeout_s)))
                if (k + 1) % 10 == 0:
                    done = [p for p in probes[: k + 1] if p.fast_s is not None]
                    log.info("%d probes sent, %d seen on the fast path so far", k + 1, len(done))
                await asyncio.sleep(every_s)
            await asyncio.gather(*tasks)
    finally:
        await producer.stop()
        await redis.aclose()


def quantiles(values: list[float], scale: float) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(values) * scale
    return {
        q: round(float(v), 3)
        for q, v in (("p50", np.percentile(a, 50)), ("p99", np.percentile(a, 99)), ("max", a.max()))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k", help="ml-100k, taobao-sample or a JSONL file of events")
    parser.add_argument("--rate", type=float, default=200.0, help="background events per second")
    parser.add_argument("--warm", type=int, default=3000, help="events learned before probing")
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--probe-every-s", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=15.0, help="per probe, fast path (model: 4x)")
    args = parser.parse_args()
    quiet_logging()
    s = settings_for_run()
    home = s.home
    load_n = int(args.rate * (args.probes * args.probe_every_s + 4 * args.timeout_s + 30))
    events = [x for x in source_items(s, args.data, args.warm + load_n) if isinstance(x, Event)]
    warm, load = events[: args.warm], events[args.warm :]
    labelled = [e for e in warm if e.label is not None and e.category]
    if not labelled:
        raise SystemExit(f"{args.data}: the warm-up holds no labelled event with a category to probe with")
    embedded.up(s)
    worker = server = None
    try:
        ensure_topics(s)
        worker = WorkerProcess(s, home / "worker.log").start()
        server = start_server(s, home / "serve.log")
        log.info("warm-up: %d events", len(warm))
        publish(s, warm, progress=False)
        wait_for(
            lambda: (worker.metrics() or {}).get("driftrec_events_processed_total", 0) >= len(warm),
            300,
            "the warm-up applied",
            worker,
        )

        def served_version() -> object:
            body = {"user_id": warm[0].user_id, "candidates": [warm[0].item_id]}
            return httpx.post(f"{serving_url(s)}/v1/score", json=body, timeout=5).json().get("model_version")

        wait_for(served_version, 120, "a served snapshot", worker)
        stop = threading.Event()
        load_out: dict[str, float] = {}
        thread = threading.Thread(target=lambda: load_out.update(background_load(s, load, args.rate, stop)))
        thread.start()
        time.sleep(3.0)  # the load is flowing before the first probe
        run = uuid.uuid4().hex[:6]
        rng = np.random.default_rng(0)
        picks = rng.choice(len(labelled), size=args.probes)
        probes = [
            Probe(
                labelled[int(j)].model_copy(
                    update={"event_id": f"probe-{run}-{k}", "user_id": f"probe-{run}-{k}", "label": 1}
                )
            )
            for k, j in enumerate(picks)
        ]
        started = time.monotonic()
        asyncio.run(probe_all(s, probes, args.probe_every_s, args.timeout_s))
        stop.set()
        thread.join()
        m = worker.metrics() or {}
    finally:
        for proc in (server, worker):
            if proc is not None:
                proc.stop()
        embedded.down(s)
    applied = [p.applied_s for p in probes if p.applied_s is not None]
    fast = [p.fast_s for p in probes if p.fast_s is not None]
    model = [p.model_s for p in probes if p.model_s is not None]
    wide = [p.wide_s for p in probes if p.wide_s is not None]
    figures: dict[str, object] = {
        "data": args.data,
        "cpu_cores": os.cpu_count() or 0,
        "rate_target": args.rate,
        "rate_achieved": round(load_out.get("sent", 0) / max(load_out.get("seconds", 1.0), 1e-9), 1),
        "probes": len(probes),
        "probing_s": round(time.monotonic() - started, 1),
        **{f"applied_{k}_ms": v for k, v in quantiles(applied, 1000.0).items()},
        "fast_seen": len(fast),
        **{f"fast_{k}_ms": v for k, v in quantiles(fast, 1000.0).items()},
        "wide_seen": len(wide),
        **{f"wide_{k}_ms": v for k, v in quantiles(wide, 1000.0).items()},
        "model_seen": len(model),
        **{f"model_{k}_s": v for k, v in quantiles(model, 1.0).items()},
        "worker_batch_within_s": s.worker_batch_within_s,
        "worker_batch_size": s.worker_batch_size,
        "snapshot_every_s": s.dsl.snapshot_every_s,
        "snapshot_every_steps": s.dsl.snapshot_every_steps,
        "reload_every_s": s.serving.reload_every_s,
        "events_processed": m.get("driftrec_events_processed_total"),
    }
    for name, total in m.items():  # where the time goes: each agent's mean micro-batch time
        if name.startswith("driftrec_batch_seconds_sum{"):
            agent = name.split('"')[1]
            count = m.get(f'driftrec_batch_seconds_count{{agent="{agent}"}}', 0.0)
            figures[f"batch_ms_mean_{agent}"] = round(1000.0 * total / count, 1) if count else None
    emit("freshness", figures)


if __name__ == "__main__":
    main()
