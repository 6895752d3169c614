"""Good events applied vs sent under faults, and memory over a bounded soak, on real processes.

Each scenario gets its own topics and key prefix on one embedded broker, a `driftrec worker`
(ingest role) and a private ``redis-server`` that keeps an fsynced append-only file, so a killed
Redis comes back with what it acknowledged and the loss counted is driftrec's alone:

* ``flood``: 10,000 malformed messages interleaved with 5,000 good events;
* ``large``: 20 messages of ~1 MB among 1,000 good events;
* ``redis_kill``: Redis SIGKILLed for 10 s while events keep coming, then restarted;
* ``redis_pause``: Redis SIGSTOPped for 10 s (calls hang until the socket timeout);
* ``worker_kill``: the worker SIGKILLed mid-stream and a new one started;
* ``broker_restart``: the embedded broker (Tansu, memory storage) restarted between two halves
  of the stream, the same producer publishing both: the second half must arrive; what the
  restart itself loses is measured separately (``broker_restart_unconsumed_lost``: events
  published just before it and not yet consumed) — memory storage keeps nothing;
* ``soak``: ``--soak-s`` seconds of new users and items at ``--soak-rate`` events/s through a
  worker running both roles with bounded state (``state_ttl_s``/``dedup_ttl_s`` = ``--soak-ttl-s``,
  a capped catalog): worker RSS and Redis memory are sampled, and their slope over the second
  half (after the TTL has turned over once) is reported in MB per minute, with a plot.

    python benchmarks/faults.py [--data ml-100k|taobao-sample|events.jsonl] [--soak-s 600]

Applied = the events recorded in the per-user counts in Redis; ``lost`` = good sent − applied.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import orjson

from benchmarks._common import RESULTS, emit, private_settings, quiet_logging
from driftrec import embedded
from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, free_port
from driftrec.procs import RedisServer
from driftrec.storage.client import connect_sync
from driftrec.streams.producer import EventProducer
from driftrec.streams.replay import source_items
from driftrec.streams.topics import ensure_topics

log = logging.getLogger("bench.faults")
OUTAGE_S = 10.0


def applied(settings: Settings) -> int:
    """Distinct events recorded in the per-user counts."""
    client = connect_sync(settings)
    total = 0
    keys = list(client.scan_iter(match=f"{settings.key_prefix}:{{u:*}}:counts", count=5000))
    for start in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 1000]:
            pipe.hget(key, "events")
        total += sum(int(v or 0) for v in pipe.execute())
    return total


def settle(settings: Settings, expected: int, timeout_s: float = 120.0, stall_s: float = 30.0) -> int:
    """Wait until ``expected`` events are applied or nothing moves for ``stall_s``; the count reached."""
    deadline, last, last_change = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = applied(settings)
        if n >= expected:
            return n
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            break
        time.sleep(0.5)
    return applied(settings)


def fresh(base: Settings, tag: str) -> Settings:
    run = uuid.uuid4().hex[:6]
    s = base.model_copy(
        update={
            "topic_prefix": f"{base.topic_prefix}{tag}{run}.",
            "key_prefix": f"{base.key_prefix}{tag}{run}",
            "worker_id": f"{base.worker_id}-{tag}{run}",
            "worker_web_port": free_port(),
        },
        deep=True,
    )
    ensure_topics(s)
    return s


def renamed(events: list[Event], tag: str) -> list[Event]:
    """The same events under ids of their own (each scenario sends each event once)."""
    return [e.model_copy(update={"event_id": f"{tag}-{e.event_id}"}) for e in events]


def send(producer: EventProducer, events: list[Event]) -> None:
    for e in events:
        producer.send(e)
    producer.flush()


def malformed(i: int) -> tuple[bytes, bytes]:
    kinds = [
        b"{oops",
        b'{"event_id":"m%d","user_id":"u","item_id":"i","ts":"yesterday","kind":"click"}',
        b'{"event_id":"m%d","user_id":"u","item_id":"i","ts":880000000,"kind":"click","label":7}',
        b'{"event_id":"m%d","item_id":"i","ts":880000000,"kind":"click"}',
        b"[1, 2, 3]",
    ]
    value = kinds[i % len(kinds)]
    return (value % i if b"%d" in value else value), b"u"


def scenario(base: Settings, home: Path, tag: str, events: list[Event]) -> dict[str, float]:
    """One fault scenario; returns its figures (``sent``, ``applied``, ``lost`` and extras)."""
    own = RedisServer(home / f"redis-{tag}", free_port()).start()
    s = fresh(base.model_copy(update={"redis_url": own.url}, deep=True), tag)
    s.worker_roles = frozenset({"ingest"})
    s.tpp.enabled = s.dsl.enabled = False
    s.serving.kafka_agent = False
    good = renamed(events, tag)
    worker = WorkerProcess(s, home / f"{tag}.log").start()
    out: dict[str, float] = {"sent": len(good)}
    started = time.monotonic()
    try:
        with EventProducer(s, max_request_size=4 << 20) as producer:
            half = len(good) // 2
            if tag == "flood":
                for i, e in enumerate(good):
                    producer.send(e)
                    for j in range(2):
                        value, key = malformed(2 * i + j)
                        producer.send_raw(value, key=key)
            elif tag == "large":
                for i, e in enumerate(good):
                    producer.send(e)
                    if i % (len(good) // 20) == 0 and out.get("large_sent", 0) < 20:
                        big = {"event_id": f"big{i}", "user_id": e.user_id, "pad": "x" * 1_000_000}
                        producer.send_raw(orjson.dumps(big), key=e.user_id.encode())
                        out["large_sent"] = out.get("large_sent", 0) + 1
            elif tag in ("redis_kill", "redis_pause"):
                send(producer, good[:half])
                settle(s, half)
                outage = time.monotonic()
                own.kill() if tag == "redis_kill" else own.pause()
                send(producer, good[half:])  # arrives while Redis is gone
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage)))
                own.start() if tag == "redis_kill" else own.resume()
                out["outage_s"] = round(time.monotonic() - outage, 2)
            elif tag == "worker_kill":
                send(producer, good[:half])
                worker.kill()  # mid-stream: some of the first half is applied, some is not
                send(producer, good[half:])
                worker = WorkerProcess(s, home / f"{tag}-2.log").start()
            producer.flush()
        n = settle(s, len(good))
        out |= {"applied": n, "lost": len(good) - n, "seconds": round(time.monotonic() - started, 2)}
        bad = {"flood": 2 * len(good), "large": out.get("large_sent", 0)}.get(tag, 0)
        deadline = time.monotonic() + 60.0  # the refused messages may still be on their way to the DLQ
        while (m := worker.metrics() or {}).get("driftrec_events_dead_lettered_total", 0.0) < bad:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        out["dead_lettered"] = m.get("driftrec_events_dead_lettered_total", 0.0)
        out["transient_failures"] = m.get('driftrec_transient_failures_total{agent="ingest"}', 0.0)
        out["worker_alive"] = float(worker.proc is not None and worker.proc.poll() is None)
    finally:
        worker.stop()
        own.stop()
    log.info("%s: %s", tag, out)
    return out


def broker_restart(base: Settings, home: Path, events: list[Event]) -> dict[str, float]:
    """Two halves through one producer with an embedded-broker restart between them."""
    own = RedisServer(home / "redis-broker", free_port()).start()
    s = fresh(base.model_copy(update={"redis_url": own.url}, deep=True), "broker")
    s.worker_roles = frozenset({"ingest"})
    s.tpp.enabled = s.dsl.enabled = False
    s.serving.kafka_agent = False
    good = renamed(events, "broker")
    half = len(good) // 2
    worker = WorkerProcess(s, home / "broker.log").start()
    out: dict[str, float] = {"sent": len(good)}
    try:
        with EventProducer(s) as producer:
            send(producer, good[:half])
            settle(s, half)
            # what memory storage loses: events published and not yet consumed when it stops
            unconsumed = renamed(good[: max(1, half // 10)], "unconsumed")
            send(producer, unconsumed)
            embedded.down(s)
            time.sleep(2.0)  # the batch in flight lands; what is applied now is all the old broker gave
            before = applied(s)
            embedded.up(s)  # a fresh, empty broker; `up` declares the topics again
            restarted = time.monotonic()
            send(producer, good[half:])  # the same producer: it must find the new broker
            n = settle(s, before + len(good) - half, timeout_s=240, stall_s=120)
        second_half = n - before
        out |= {
            "applied": half + second_half,
            "lost": len(good) - half - second_half,
            "broker_restart_unconsumed_sent": len(unconsumed),
            "broker_restart_unconsumed_lost": len(unconsumed) - (before - half),
            "recovery_s": round(time.monotonic() - restarted, 2),
        }
    finally:
        worker.stop()
        own.stop()
    log.info("broker_restart: %s", out)
    return out


def soak_stream(events: list[Event], rate: float, seconds: float) -> Iterator[Event]:
    """New users, items and ids on every pass over ``events``, at ``rate`` events/s."""
    start, sent, lap = time.monotonic(), 0, 0
    while time.monotonic() - start < seconds:
        for e in events:
            if time.monotonic() - start >= seconds:
                return
            yield e.model_copy(
                update={
                    "event_id": f"s{lap}-{e.event_id}",
                    "user_id": f"s{lap}-{e.user_id}",
                    "item_id": f"s{lap}-{e.item_id}",
                    "ts": time.time(),
                }
            )
            sent += 1
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        lap += 1


def rss_mb(pid: int) -> float:
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += float(line.split()[1]) / 1024
    return total


def slope_per_min(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def soak(base: Settings, home: Path, events: list[Event], seconds: float, rate: float, ttl_s: int) -> dict[str, float]:
    own = RedisServer(home / "redis-soak", free_port()).start()
    s = fresh(base.model_copy(update={"redis_url": own.url}, deep=True), "soak")
    s.state_ttl_s = s.dedup_ttl_s = ttl_s
    s.memory.ttl_s = ttl_s
    s.dsl.catalog_size = 5000
    worker = WorkerProcess(s, home / "soak.log").start()
    samples: list[tuple[float, float, float]] = []  # (t, worker RSS MB, Redis used MB)
    stop = threading.Event()
    client = connect_sync(s)

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(5.0):
            assert worker.proc is not None
            redis_mb = float(client.info("memory")["used_memory"]) / 2**20
            samples.append((time.monotonic() - t0, rss_mb(worker.proc.pid), redis_mb))
            if len(samples) % 12 == 0:
                log.info("soak %.0f s: worker %.1f MB, redis %.1f MB", *samples[-1])

    sampler = threading.Thread(target=sample, daemon=True)
    sent = 0
    try:
        sampler.start()
        with EventProducer(s) as producer:
            for e in soak_stream(events, rate, seconds):
                producer.send(e)
                sent += 1
        stop.set()
        sampler.join()
    finally:
        stop.set()
        worker.stop()
        own.stop()
    second = [x for x in samples if x[0] >= seconds / 2]
    out = {
        "soak_s": seconds,
        "soak_events": sent,
        "soak_rate": round(sent / seconds, 1),
        "soak_ttl_s": ttl_s,
        "worker_rss_mb_start": round(samples[len(samples) // 10][1], 1) if samples else 0.0,
        "worker_rss_mb_end": round(samples[-1][1], 1) if samples else 0.0,
        "redis_mb_half": round(second[0][2], 2) if second else 0.0,
        "redis_mb_end": round(samples[-1][2], 2) if samples else 0.0,
        "worker_rss_slope_mb_per_min_2nd_half": round(slope_per_min([(t, r) for t, r, _ in second]), 3),
        "redis_slope_mb_per_min_2nd_half": round(slope_per_min([(t, m) for t, _, m in second]), 3),
    }
    plot(samples, RESULTS / "faults_soak.png", ttl_s)
    return out


def plot(samples: list[tuple[float, float, float]], path: Path, ttl_s: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    t = [x[0] / 60 for x in samples]
    ax.plot(t, [x[1] for x in samples], label="worker RSS (MB)")
    ax.plot(t, [x[2] for x in samples], label="Redis used memory (MB)")
    ax.axvline(ttl_s / 60, color="grey", linestyle=":", label=f"state TTL ({ttl_s} s)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_title("bounded soak: new users and items all the time")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k", help="ml-100k, taobao-sample or a JSONL file of events")
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--soak-rate", type=float, default=200.0)
    parser.add_argument("--soak-ttl-s", type=int, default=120)
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    args = parser.parse_args()
    quiet_logging()
    base = private_settings("fault", events_partitions=4)
    home = base.home
    events = [x for x in source_items(base, args.data, 20_000) if isinstance(x, Event)]
    only = set(filter(None, args.only.split(",")))
    figures: dict[str, object] = {"data": args.data, "cpu_cores": os.cpu_count() or 0, "outage_s": OUTAGE_S}
    embedded.up(base)
    try:
        sizes = {"flood": 5000, "large": 1000, "redis_kill": 4000, "redis_pause": 4000, "worker_kill": 6000}
        for tag, n in sizes.items():
            if not only or tag in only:
                for name, value in scenario(base, home, tag, events[:n]).items():
                    figures[f"{tag}_{name}"] = value
        if not only or "broker_restart" in only:
            for name, value in broker_restart(base, home, events[:4000]).items():
                figures[f"broker_restart_{name}" if not name.startswith("broker_restart") else name] = value
        if (not only or "soak" in only) and args.soak_s > 0:
            figures |= soak(base, home, events, args.soak_s, args.soak_rate, args.soak_ttl_s)
    finally:
        embedded.down(base)
    losses = [v for k, v in figures.items() if k.endswith("_lost") and not k.startswith("broker_restart_unconsumed")]
    figures["lost_total"] = sum(float(v) for v in losses if isinstance(v, int | float))
    emit("faults", figures, record=not only)


if __name__ == "__main__":
    main()
