"""Scoring-service latency and throughput over real Redis and a real `driftrec serve` process.

1. Trains a ``DSLRecommender`` briefly on ML-100K (or ``--data``: an ML-100K directory), publishes
   it with its catalog as three snapshots, the last naming the second as the error memory's key
   snapshot and the first as the previous key (so a request hashes its candidates in both key
   spaces, as after every key renewal), writes error memory under both keys and a TPP
   propensity for every user, all under a private key prefix (deleted at the end).
2. Starts ``driftrec serve`` (one uvicorn worker) in a subprocess.
3. For each candidate count (1, 100, 1000) a *separate* load process keeps ``--concurrency``
   keep-alive connections busy for ``--duration`` seconds (after a short warm-up) with
   pre-encoded requests for random users and candidates (catalog items plus some unknown ids),
   and reports client-observed latencies.

Prints a progress line with the request rate every few seconds; the last line is one JSON
object. The client shares the machine with the server, so its CPU is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import cast

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit


# ---- load generator (runs in its own process) -----------------------------------------------
class _KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client over one asyncio stream.

    Why not httpx: on a 2-core machine the load generator shares the CPU with the server, and
    httpx spends ~1 ms of Python per request, which would be measured as service latency. Here a
    request is one pre-encoded write and the response is read by its Content-Length.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def encode(self, body: bytes) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _load(
    url: str, bodies: list[bytes], duration: float, warmup: float, concurrency: int, label: str
) -> dict[str, float]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    server_ms: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup
    clients = [
        _KeepAliveClient(parts.hostname or "127.0.0.1", parts.port or 80, parts.path) for _ in range(concurrency)
    ]
    requests = [clients[0].encode(body) for body in bodies]

    async def worker(k: int, client: _KeepAliveClient) -> None:
        nonlocal errors
        await client.connect()
        i = k
        while (now := time.perf_counter()) < stop_at:
            request = requests[i % len(requests)]
            i += concurrency
            status, body = await client.send(request)
            done = time.perf_counter()
            if status != 200:
                errors += 1
            elif now >= measure_from:
                latencies.append(done - now)
                server_ms.append(json.loads(body)["took_ms"])
        await client.close()

    async def progress() -> None:
        last, last_t = 0, time.perf_counter()
        while time.perf_counter() < stop_at:
            await asyncio.sleep(5.0)
            n, t = len(latencies), time.perf_counter()
            print(
                f"[{label}] {n} requests measured, {(n - last) / (t - last_t):.0f} req/s", file=sys.stderr, flush=True
            )
            last, last_t = n, t

    ticker = asyncio.create_task(progress())
    await asyncio.gather(*(worker(k, c) for k, c in enumerate(clients)))
    ticker.cancel()
    lat = np.asarray(latencies) * 1000.0
    return {
        "n": int(lat.size),
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests_per_s": lat.size / duration,
        "server_p50_ms": float(np.percentile(server_ms, 50)),
        "server_p99_ms": float(np.percentile(server_ms, 99)),
    }


def load_main(args: argparse.Namespace) -> None:
    bodies = [line.encode() for line in Path(args.bodies).read_text().splitlines()]
    out = asyncio.run(_load(args.url, bodies, args.duration, args.warmup, args.concurrency, args.label))
    print(json.dumps(out), flush=True)


# ---- setup: state in Redis -----------------------------------------------------------------
async def prepare_state(settings, data: Path | None, train_events: int, memory_events: int) -> dict[str, object]:
    import orjson

    from driftrec.models.dsl import DSLRecommender, SparseScorer
    from driftrec.models.error_memory import RandomProjectionLSH
    from driftrec.storage.client import connect
    from driftrec.storage.error_memory import MemoryKeys, write_errors
    from driftrec.storage.event_state import StateKeys
    from driftrec.storage.served_memory import KEY_PART, KeyRef, pin_ttl_s
    from driftrec.storage.snapshots import SnapshotKeys, pin_snapshot, publish_snapshot
    from driftrec.streams.datasets import load_ml100k_interactions

    t0 = time.perf_counter()
    xs = load_ml100k_interactions(data)
    labelled = [x for x in xs if x.label is not None]
    d = settings.dsl
    model = DSLRecommender(n_rows=d.n_rows, dim=d.dim, density=d.density, lr=d.lr, seed=d.seed)
    train = labelled[:train_events]
    for k in range(0, len(train), d.batch_size):
        model.learn_many(train[k : k + d.batch_size])
    catalog = {x.item_id: x.category for x in xs if x.category is not None}
    blob = model.to_bytes()
    print(
        f"trained on {len(train)} events in {time.perf_counter() - t0:.1f} s; snapshot {len(blob) / 1e6:.1f} MB, "
        f"{len(catalog)} catalog items",
        file=sys.stderr,
        flush=True,
    )
    redis = connect(settings)  # a single Redis or, with DRIFTREC_REDIS_CLUSTER, a cluster client
    # the most a request computes: the served snapshot names a key snapshot and a previous one,
    # so the scorer hashes the candidates in both spaces (two more forward passes, two bucket sets)
    snap_keys = SnapshotKeys(settings.key_prefix, "dsl")
    parts = {"model": blob, "catalog": orjson.dumps(catalog)}
    previous = await publish_snapshot(redis, snap_keys, parts)
    key = await publish_snapshot(redis, snap_keys, parts)
    for v in (previous, key):
        await pin_snapshot(redis, snap_keys, v, pin_ttl_s(settings))
    parts[KEY_PART] = KeyRef(key, previous, time.time()).to_bytes()
    version = await publish_snapshot(redis, snap_keys, parts)
    scorer = SparseScorer.from_bytes(blob)
    m = settings.memory
    mem = labelled[train_events : train_events + memory_events]
    for v in (previous, key):  # entries under both keys: each view's buckets hold data
        lsh = RandomProjectionLSH(dim=scorer.hidden, n_tables=m.n_tables, n_bits=m.n_bits, seed=m.seed, version=v)
        keys = MemoryKeys(settings.key_prefix, v, m.n_shards, space="k")
        for k in range(0, len(mem), 2000):
            chunk = mem[k : k + 2000]
            probs, hidden = scorer.predict_with_hidden(chunk)
            await write_errors(redis, keys, lsh, chunk, probs, hidden, capacity=m.bucket_capacity)
    users = sorted({x.user_id for x in xs})
    cats = sorted(set(catalog.values()))
    rng = np.random.default_rng(0)
    state = StateKeys(settings.key_prefix)
    pipe = redis.pipeline(transaction=False)
    for u in users:
        p = rng.dirichlet(np.ones(len(cats)))
        pipe.set(
            state.user_tpp(u),
            orjson.dumps(
                {"ts": time.time() - 600, "version": 1, "n_types": len(cats), "probs": dict(zip(cats, p.tolist()))}
            ),
        )
    await pipe.execute()
    # every term weight non-zero, so every request reads every term (the scorer skips a term
    # whose learned weight is exactly 0): the most a request reads
    from driftrec.models.served import REAL_FEATURES
    from driftrec.storage.wide import WideStore, WideUpdate

    store = WideStore(redis, settings.key_prefix, settings.dedup_ttl_s)
    await store.add([WideUpdate("bench-weights", users[0], {f: (-1.0, 1.0) for f in REAL_FEATURES})])
    await redis.aclose()
    print(
        f"state ready: snapshot v{version}, memory for {len(mem)} events, tpp for {len(users)} users "
        f"({time.perf_counter() - t0:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return {"version": version, "users": users, "items": sorted(catalog)}


def cleanup(settings) -> None:
    from driftrec.harness import delete_prefix

    delete_prefix(settings)


def make_bodies(users: list[str], items: list[str], n: int, count: int, rng: np.random.Generator) -> list[str]:
    out = []
    for _ in range(count):
        known = rng.choice(items, size=min(n, len(items)), replace=False).tolist()
        cands = [c if rng.random() > 0.05 else f"unknown-{rng.integers(1 << 30)}" for c in known]
        while len(cands) < n:
            cands.append(f"unknown-{rng.integers(1 << 30)}")
        out.append(json.dumps({"user_id": str(rng.choice(users)), "candidates": cands}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="an ML-100K directory (default: the cached one)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per candidate count")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--counts", default="1,100,1000")
    parser.add_argument("--train-events", type=int, default=5_000)
    parser.add_argument("--memory-events", type=int, default=20_000)
    parser.add_argument("--no-record", action="store_true", help="print the figures without logging them")
    # internal: the load-generator process
    parser.add_argument("--_load", dest="load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load_main(args)
        return

    import httpx

    from driftrec.contract.settings import get_settings
    from driftrec.harness import free_port

    base = get_settings()
    settings = base.model_copy(update={"key_prefix": f"bench-serving-{uuid.uuid4().hex[:8]}"})
    settings.serving = settings.serving.model_copy(update={"port": free_port(), "max_candidates": 2000})
    counts = [int(c) for c in args.counts.split(",")]
    server: subprocess.Popen[bytes] | None = None
    try:
        info = asyncio.run(prepare_state(settings, args.data, args.train_events, args.memory_events))
        env = dict(
            os.environ,
            DRIFTREC_KEY_PREFIX=settings.key_prefix,
            DRIFTREC_REDIS_URL=settings.redis_url,
            DRIFTREC_REDIS_CLUSTER=str(settings.redis_cluster).lower(),
            DRIFTREC_SERVING__PORT=str(settings.serving.port),
            DRIFTREC_SERVING__MAX_CANDIDATES="2000",
        )
        server = subprocess.Popen([sys.executable, "-m", "driftrec.cli", "serve"], env=env, cwd=REPO)
        base_url = f"http://127.0.0.1:{settings.serving.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).json().get("model_version") == info["version"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the scoring server did not come up")
            time.sleep(0.2)
        rng = np.random.default_rng(1)
        results: dict[str, float] = {}
        per_count: dict[int, dict[str, float]] = {}
        bodies_dir = settings.home / "bench-serving"
        bodies_dir.mkdir(parents=True, exist_ok=True)
        for n in counts:
            path = bodies_dir / f"bodies-{n}.jsonl"
            users, items = cast(list[str], info["users"]), cast(list[str], info["items"])
            path.write_text("\n".join(make_bodies(users, items, n, 300 if n <= 100 else 60, rng)))
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_load",
                    "--url",
                    f"{base_url}/v1/score",
                    "--bodies",
                    str(path),
                    "--duration",
                    str(args.duration),
                    "--warmup",
                    str(args.warmup),
                    "--concurrency",
                    str(args.concurrency),
                    "--label",
                    f"{n} candidates",
                ],
                capture_output=False,
                stdout=subprocess.PIPE,
                text=True,
                check=True,
                cwd=REPO,
            )
            stats = json.loads(done.stdout.strip().splitlines()[-1])
            per_count[n] = stats
            print(
                f"{n:>5} candidates: p50 {stats['p50_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms "
                f"(in the service: p50 {stats['server_p50_ms']:.2f}, p99 {stats['server_p99_ms']:.2f}), "
                f"{stats['requests_per_s']:.0f} req/s, {stats['errors']} errors",
                flush=True,
            )
            results[f"p50_ms_{n}"] = round(stats["p50_ms"], 3)
            results[f"p99_ms_{n}"] = round(stats["p99_ms"], 3)
            results[f"server_p99_ms_{n}"] = round(stats["server_p99_ms"], 3)
            results[f"requests_per_s_{n}"] = round(stats["requests_per_s"], 1)
        results["requests_per_s"] = max(s["requests_per_s"] for s in per_count.values())
        results["concurrency"] = args.concurrency
        results["duration_s"] = args.duration
        results["cpu_cores"] = os.cpu_count() or 0
        results["load_avg_1m"] = round(os.getloadavg()[0], 2)
        results["errors"] = sum(int(s["errors"]) for s in per_count.values())
        emit("serving_latency", results, record=not args.no_record)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        cleanup(settings)


if __name__ == "__main__":
    main()
