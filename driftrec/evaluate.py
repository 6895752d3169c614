"""Prequential (test-then-train) evaluation through the real pipeline, and the one-command demo.

Protocol (DESIGN.md, "Evaluation protocol")
--------------------------------------------
The stream is cut into windows of ``window`` events, in event-time order. For each window:

1. **test** — every labelled event of the window is scored by the real scoring service
   (``POST /v1/score``, a few requests in flight) with ``ts`` = the event's time and candidates =
   [the event's item] + ``negatives`` items sampled with a fixed seed from the items seen so far
   in the stream, excluding items the user already interacted with. Positive events are ranked
   (Recall@20 / NDCG@20 of the positive among the candidates) — all of them, or a fixed-seed
   fraction ``rank_fraction`` to keep long runs fast; the others are scored on their own item.
2. **train** — then the window is published to the ``events`` topic; the real worker process
   (ingest with the error-memory writes, DSL trainer, TPP when present) learns it and publishes snapshots
   and memory/TPP state to Redis, which the scoring service reloads.

So the state that scored an event never includes the event itself. **Synchronous** (the
default): after publishing a window the run waits until the worker has taken in every published
event (ingest with its error-memory writes, DSL trainer, TPP) and the scoring service serves the
snapshot the trainer published after its last batch (the run sets ``dsl.snapshot_every_s = 0``
and polls reloads every 50 ms; no model setting changes). Every window is then scored by a state
that has learned exactly the events before the window. Without ``synchronous`` the run only
bounds the worker's lag (``max_lag`` events, default 2 × window) and the trainer publishes on its
own schedule: the served state is then ``window + max_lag`` events plus one snapshot interval
behind at worst, as in a deployment that scores while it learns. Each record keeps
``published_before`` and ``model_version`` so the lag is visible.

Variants, all from the *same served responses* (``models.served.ablations``, the served rule):
``full`` = the score, ``full-no-memory`` / ``full-no-tpp`` / ``full-no-wide`` = the score with
that term's logit part left out (leave-one-out: the other weights as learned), ``base`` = the DSL
alone. The wide term alone is the ``ftrl`` peer: the same FTRL (``models/wide.py``) without the
DSL and the other terms, learning what the served state learns at the same lag.
External peers (``river-lr``, ``river-fm``, ``vw``, see ``models/baselines.py``) are learned
test-then-train in-process on the same events and score the same candidates. The named peers
learn each window right after it is scored, so they have exactly the information the served
state has. The ``<peer>@event`` references learn each event right after scoring it. No pipeline
that learns through a broker in windows can match that: on ML-100K 89 % of consecutive events
are the same user's rating session, and within a window that session is invisible to the served
state while a per-event learner sees all of it. The report keeps both, so the cost of window
granularity is visible beside the model comparison.

**Fast-path lag** (``fast_path_only``, ``driftrec evaluate --fast-path-only``, with a small
``--window``): after each window the run waits only until ingest has applied every published
event, which also writes the events' served errors into the memories, so the fast path is as
fresh as it is deployed (``benchmarks/freshness.py``: ~0.1-0.4 s), while the trainer keeps its
real snapshot cadence and the service its real reload interval. The model then lags by however
many events the replay pushes through in its ~2-3 s, which is more than a deployment at
ML-100K's real pace (0.005 events/s) would see: a conservative protocol for the model.

``events_per_s``: for the served variants, labelled events scored per wall second of the whole
loop (scoring, publishing and waiting for the worker: the pipeline's pace); for a peer, labelled
events per second of its own predict + learn time.

Outputs in ``out``: ``served.jsonl`` (one record per scored event: label, time, the served
``base``/``compensation``/``tpp``/``score``, every variant's pointwise score and rank counts),
``report.json``, ``report.html`` (self-contained) and one PNG per metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from redis.asyncio import Redis as AsyncRedis
from tqdm import tqdm

from driftrec.contract.events import Event
from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models import metrics
from driftrec.models.served import ablations
from driftrec.procs import ChildProcess, serving_healthy, serving_url, start_server, start_worker, worker_metrics
from driftrec.provenance import stamp
from driftrec.report import PER_EVENT, SERVED_VARIANTS, plot_series, summarize, write_html
from driftrec.storage.client import connect, connect_sync
from driftrec.storage.error_memory import KEY_SPACE

log = logging.getLogger(__name__)

# The demo must finish in < 10 minutes on a fresh 2-core machine. It runs the event-time lag
# protocol at DEMO_LAG_S: the fast path is fresh within 0.1-0.4 s (benchmarks/freshness.py, p50 /
# p99), so a second covers its p99 with margin, a rule stated once rather than a value tuned.
# Measured with 0.7.0: ~43-50 labelled events/s for the whole loop (each event scored over HTTP
# after the fast path took in what became due; 0.6.x did 65-80, before ingest read both memories
# as of each event to learn their weights), so 25,000 events (a quarter of ML-100K, ~98 days of
# it) take ~9-10 minutes with start-up and the report: at the bound. Full ML-100K:
# ``driftrec evaluate ml-100k --lag-s 1`` (~35-40 minutes).
DEMO_LIMIT: int | None = 25_000
DEMO_RANK_FRACTION = 0.2
DEMO_LAG_S = 1.0


@dataclass
class EvalOptions:
    negatives: int = 49
    k: int = 20
    window: int = 250
    concurrency: int = 8
    rank_fraction: float = 1.0
    seed: int = 0
    max_lag: int | None = None  # default: 2 × window
    baselines: tuple[str, ...] = ("river-lr", "river-fm", "vw", "ftrl")
    # each peer again, learning every event right after scoring it: a no-lag reference (module doc)
    per_event_baselines: bool = True
    # score each window with a state that has learned every earlier event (module doc)
    synchronous: bool = True
    # wait after each window for ingest alone (the fast path: memories, user state, propensities),
    # while the trainer learns and publishes on its real cadence (module doc, "fast-path lag")
    fast_path_only: bool = False
    # event-time lag protocol (module doc): the fast path learns each event once it is this many
    # seconds (event time) old, the model on its real cadence; None: the window protocols above
    lag_s: float | None = None
    series_window: int | None = None  # default: n/20 clamped to [200, 5000]
    namespace: bool = True  # run in fresh topics / key prefix / ports (False: use the settings as given)
    keep_state: bool = False  # keep the run's Redis keys afterwards (only with namespace=True)
    progress: bool = True
    drain_timeout_s: float = 180.0


@dataclass
class _Plan:
    event: Event
    candidates: list[str]
    categories: list[str | None]
    ranked: bool

    @property
    def queries(self) -> list[Interaction]:
        """The candidates as a peer scores them (the event's own item first, unlabelled)."""
        e = self.event
        return [Interaction(e.user_id, item, e.ts, category=cat) for item, cat in zip(self.candidates, self.categories)]

    @property
    def learned(self) -> Interaction:
        """The labelled event as a peer learns it."""
        e = self.event
        return Interaction(e.user_id, e.item_id, e.ts, label=e.label, category=e.category)


@dataclass
class _Run:
    records: list[dict[str, Any]] = field(default_factory=list)
    peer_seconds: dict[str, float] = field(default_factory=dict)
    published: int = 0
    dead_lettered: int = 0
    serving_s: float = 0.0
    lag_waits_s: float = 0.0
    max_observed_lag: int = 0
    term_weights: list[dict[str, float]] = field(default_factory=list)  # the fusion's, as the run went


def served_variants(
    base: np.ndarray, comp: np.ndarray, tpp: np.ndarray, wide: np.ndarray, eps: float
) -> dict[str, np.ndarray]:
    """The ablations from one served response (the rule's own, ``models.served.ablations``)."""
    return ablations(base, wide, tpp, comp, eps)


class _Sampler:
    """Fixed-seed negatives from the items seen so far, excluding the user's known items."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.rank_rng = np.random.default_rng(seed + 1)
        self.seen: list[str] = []
        self.seen_set: set[str] = set()
        self.known: dict[str, set[str]] = {}
        self.category: dict[str, str] = {}

    def negatives(self, user: str, item: str, n: int) -> list[str] | None:
        known = self.known.get(user, set())
        eligible = len(self.seen) - len(known) - (1 if item in self.seen_set and item not in known else 0)
        if eligible < n:
            return None
        out: list[str] = []
        chosen: set[str] = set()
        for _ in range(50 * n):
            cand = self.seen[int(self.rng.integers(len(self.seen)))]
            if cand != item and cand not in known and cand not in chosen:
                out.append(cand)
                chosen.add(cand)
                if len(out) == n:
                    return out
        pool = [i for i in self.seen if i != item and i not in known and i not in chosen]
        extra = self.rng.choice(len(pool), size=n - len(out), replace=False)
        return out + [pool[int(j)] for j in extra]

    def observe(self, event: Event) -> None:
        if event.item_id not in self.seen_set:
            self.seen_set.add(event.item_id)
            self.seen.append(event.item_id)
        self.known.setdefault(event.user_id, set()).add(event.item_id)
        if event.category:
            self.category[event.item_id] = event.category


def _plan(sampler: _Sampler, event: Event, opts: EvalOptions) -> _Plan | None:
    plan = None
    if event.label is not None:
        want_rank = event.label == 1 and sampler.rank_rng.random() < opts.rank_fraction
        negs = sampler.negatives(event.user_id, event.item_id, opts.negatives) if want_rank else None
        cands = [event.item_id] + (negs or [])
        cats = [event.category] + [sampler.category.get(i) for i in (negs or [])]
        plan = _Plan(event, cands, cats, negs is not None)
    sampler.observe(event)
    return plan


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluation_settings(settings: Settings, run_id: str) -> Settings:
    """Fresh topics, key prefix, consumer group and ports, so no earlier state leaks into the run."""
    s = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}eval-{run_id}.",
            "key_prefix": f"{settings.key_prefix}:eval-{run_id}",
            "worker_id": f"{settings.worker_id}-eval-{run_id}",
            "worker_web_port": _free_port(),
        }
    )
    s.serving = s.serving.model_copy(update={"port": _free_port()})
    return s


def synchronous_settings(settings: Settings) -> Settings:
    """The trainer publishes after every batch and the service polls for it often, so a window
    can wait for a served state that has learned every earlier event (nothing about the models)."""
    s = settings.model_copy()
    s.dsl = s.dsl.model_copy(update={"snapshot_every_s": 0.0})
    s.serving = s.serving.model_copy(update={"reload_every_s": min(s.serving.reload_every_s, 0.05)})
    return s


def _learner_names(settings: Settings) -> list[str]:
    from driftrec.streams.learners import default_learners

    return list(default_learners(settings))


def _progress_counts(m: dict[str, float] | None, learners: list[str], ingest: bool = True) -> int:
    """Events the worker has fully taken in: min over ingest (when it runs there) and the
    learners named (none: ingest)."""
    if not m:
        return 0
    counts = [m.get("driftrec_events_processed_total", 0.0)] if ingest else []
    for name in ("trainer", "tpp"):
        if name in learners:
            counts.append(m.get(f'driftrec_learner_seen_total{{learner="{name}"}}', 0.0))
    return int(min(counts)) if counts else 0


async def _worker_progress(client: httpx.AsyncClient, settings: Settings, learners: list[str]) -> int:
    ingest = "ingest" in settings.worker_roles
    try:
        resp = await client.get(f"http://127.0.0.1:{settings.worker_web_port}/metrics", timeout=2.0)
    except httpx.HTTPError:
        return 0
    from driftrec.procs import parse_prometheus

    return _progress_counts(parse_prometheus(resp.text), learners, ingest)


async def _evaluate_loop(
    settings: Settings, items: list[Any], opts: EvalOptions, peers: dict[str, Any], bar: tqdm, served_path: Path
) -> _Run:
    from driftrec.streams.producer import EventProducer

    run = _Run(peer_seconds={name: 0.0 for name in peers})
    sampler = _Sampler(opts.seed)
    learners = _learner_names(settings)
    awaited = [] if opts.fast_path_only else learners  # whose progress bounds the lag after a window
    eps = settings.serving.eps
    max_lag = _max_lag(opts)
    sem = asyncio.Semaphore(opts.concurrency)
    events = [x for x in items if isinstance(x, Event)]
    rejects = [x for x in items if not isinstance(x, Event)]

    from driftrec.storage.snapshots import SnapshotKeys

    latest_key = SnapshotKeys(settings.key_prefix, "dsl").latest
    # pooled connections expire well before the service's keep-alive timeout: a synchronous window
    # can wait seconds for the worker, and a connection the server closes while we reuse it fails
    limits = httpx.Limits(
        max_connections=opts.concurrency,
        max_keepalive_connections=opts.concurrency,
        keepalive_expiry=min(2.0, settings.serving.keep_alive_s / 2),
    )
    async with (
        httpx.AsyncClient(base_url=serving_url(settings), timeout=60.0, limits=limits) as client,
        httpx.AsyncClient() as metrics_client,
        connect(settings) as snapshots_redis,
    ):

        async def ask(plan: _Plan) -> dict[str, Any]:
            body = orjson.dumps({"user_id": plan.event.user_id, "candidates": plan.candidates, "ts": plan.event.ts})
            async with sem:
                for attempt in range(2):  # scoring is read-only, so one retry on a dropped connection is safe
                    try:
                        resp = await client.post(
                            "/v1/score", content=body, headers={"content-type": "application/json"}
                        )
                        break
                    except httpx.TransportError:
                        if attempt:
                            raise
            if resp.status_code != 200:
                raise RuntimeError(f"scoring service answered {resp.status_code}: {resp.text[:300]}")
            return orjson.loads(resp.content)

        async def test(plans: list[_Plan], served: Any) -> None:
            """Score ``plans`` with the served state as it is now, and every peer beside it."""
            t0 = time.perf_counter()
            responses = await asyncio.gather(*(ask(p) for p in plans))
            run.serving_s += time.perf_counter() - t0
            for plan, resp in zip(plans, responses):
                rec = _record(plan, resp, eps, run.published)
                for name, peer in peers.items():
                    t1 = time.perf_counter()
                    p = peer.predict_many(plan.queries)
                    if name.endswith(PER_EVENT):  # the no-lag reference learns right away
                        peer.learn_one(plan.learned)
                    run.peer_seconds[name] += time.perf_counter() - t1
                    rec["scores"][name] = float(p[0])
                    if plan.ranked:
                        rec["rank"][name] = list(metrics.rank_counts(p[0], p[1:]))
                run.records.append(rec)
                served.write(orjson.dumps(rec) + b"\n")

        def learn_peers(learned: list[Interaction]) -> None:
            """The named peers learn what the served state learns, when it learns it."""
            for name, peer in peers.items():
                if not name.endswith(PER_EVENT) and learned:
                    t1 = time.perf_counter()
                    peer.learn_many(learned)
                    run.peer_seconds[name] += time.perf_counter() - t1

        async def bound_lag(wait_served: bool) -> int:
            """Wait until the worker is at most ``max_lag`` events behind what was published
            (and, with ``wait_served``, until the service serves the newest snapshot)."""
            t2 = time.perf_counter()
            while True:
                done = await _worker_progress(metrics_client, settings, awaited)
                lag = run.published - done
                run.max_observed_lag = max(run.max_observed_lag, lag)
                if lag <= max_lag:
                    break
                await asyncio.sleep(0.02)
            if wait_served:
                await _until_served_latest(client, snapshots_redis, latest_key)
            run.lag_waits_s += time.perf_counter() - t2
            return lag

        with EventProducer(settings) as producer, served_path.open("wb") as served:
            for raw, reason in rejects:  # invalid lines of a JSONL source still reach the DLQ
                producer.dead_letter(raw, reason, "evaluate")
                run.dead_lettered += 1
            if opts.lag_s is not None:
                await _event_time_loop(
                    settings, events, opts, sampler, producer, run, bar, test, learn_peers, bound_lag, served
                )
                return run
            for start in range(0, len(events), opts.window):
                window = events[start : start + opts.window]
                plans = [p for p in (_plan(sampler, e, opts) for e in window) if p is not None]
                # ---- test: the served state has seen only events published before this window
                await test(plans, served)
                # ---- train the peers on the window: the information the served state gets
                learn_peers([plan.learned for plan in plans])
                # ---- train: publish the window to the real broker
                for e in window:
                    producer.send(e)
                producer.flush()
                run.published += len(window)
                bar.update(len(window))
                # bound the worker's lag so the served state stays at most window + max_lag behind
                # (synchronous: until the scoring service serves a snapshot that learned it all)
                lag = await bound_lag(opts.synchronous and not opts.fast_path_only and "trainer" in learners)
                if run.records:
                    bar.set_postfix(v=run.records[-1]["model_version"], lag=lag, refresh=False)
    return run


async def _event_time_loop(
    settings: Settings,
    events: list[Event],
    opts: EvalOptions,
    sampler: _Sampler,
    producer: Any,
    run: _Run,
    bar: tqdm,
    test: Callable[[list[_Plan], Any], Awaitable[None]],
    learn_peers: Callable[[list[Interaction]], None],
    bound_lag: Callable[[bool], Awaitable[int]],
    served: Any,
) -> None:
    """The event-time lag protocol (module doc): before each event is scored, the fast path takes
    in, as one micro-batch, every event that became ``lag_s`` old since the last one, in this
    process with the worker's own ingest code against the real Redis; those events are then
    published for the worker's trainers, whose lag is bounded by ``max_lag`` events.

    Events scored between two such batches are scored together (a few requests in flight); the
    state they see is the same, so nothing depends on the order they are answered in.
    """
    from driftrec.models.wide import FTRLParams
    from driftrec.storage.client import connect as connect_redis
    from driftrec.storage.client import is_transient
    from driftrec.storage.wide import WideStore
    from driftrec.streams.fast_path import ingest_batch
    from driftrec.streams.ingest import RawMessage

    lag_s = float(opts.lag_s or 0.0)

    async def no_letters(letters: list[tuple[bytes | None, bytes]]) -> list[BaseException | None]:
        raise RuntimeError("the evaluation's own events cannot be dead letters")  # they were validated

    redis = connect_redis(settings)
    batch = ingest_batch(redis, settings, no_letters, is_transient=is_transient)
    store = WideStore(redis, settings.key_prefix, settings.dedup_ttl_s)
    params = FTRLParams(**settings.wide.ftrl_params())
    pending: list[tuple[Event, _Plan | None]] = []  # taken in order of time, not yet learned
    group: list[_Plan] = []
    first_pending = 0
    since_bound = 0
    try:
        for e in events:
            cutoff = e.ts - lag_s
            due_end = first_pending
            while due_end < len(pending) and pending[due_end][0].ts <= cutoff:
                due_end += 1
            if due_end > first_pending:
                await test(group, served)  # scored by the state before these events arrive
                group = []
                due = pending[first_pending:due_end]
                first_pending = due_end
                outcome = await batch.handle(
                    [RawMessage(d.to_bytes(), d.user_id.encode(), settings.events_topic, None, None) for d, _ in due]
                )
                if outcome.dead_lettered:
                    raise RuntimeError(f"the fast path refused evaluation events: {outcome.reasons[:3]}")
                learn_peers([p.learned for _, p in due if p is not None])
                for d, _ in due:
                    producer.send(d)
                run.published += len(due)
                since_bound += len(due)
                if since_bound >= opts.window:  # the trainers' lag, bounded now and then
                    producer.flush()
                    since_bound = 0
                    lag = await bound_lag(False)
                    run.term_weights.append({"events": float(run.published), **await store.weights(params)})
                    if run.records:
                        bar.set_postfix(v=run.records[-1]["model_version"], lag=lag, refresh=False)
                if first_pending > 4096:  # keep the list short
                    pending = pending[first_pending:]
                    first_pending = 0
            plan = _plan(sampler, e, opts)
            if plan is not None:
                group.append(plan)
            pending.append((e, plan))
            bar.update(1)
        await test(group, served)
        rest = pending[first_pending:]  # learned after the stream ends (nothing scores them)
        if rest:
            await batch.handle(
                [RawMessage(d.to_bytes(), d.user_id.encode(), settings.events_topic, None, None) for d, _ in rest]
            )
            for d, _ in rest:
                producer.send(d)
            run.published += len(rest)
        producer.flush()
        run.term_weights.append({"events": float(run.published), **await store.weights(params)})
    finally:
        await redis.aclose()


def _max_lag(opts: EvalOptions) -> int:
    if opts.lag_s is not None:
        return opts.max_lag if opts.max_lag is not None else 2 * opts.window
    if opts.synchronous or opts.fast_path_only:
        return 0
    return opts.max_lag if opts.max_lag is not None else 2 * opts.window


async def _until_served_latest(
    client: httpx.AsyncClient, r: AsyncRedis, latest_key: str, timeout_s: float = 60.0
) -> None:
    """Wait until the scoring service has loaded the newest DSL snapshot in Redis.

    Called once the trainer has learned every published event; in synchronous mode the trainer
    publishes after every batch, so the newest snapshot has learned them all.
    """
    deadline = time.monotonic() + timeout_s
    raw = None
    while time.monotonic() < deadline:
        raw = await r.get(latest_key)
        if raw is None:
            return  # nothing published yet (no labelled event so far)
        resp = await client.get("/healthz")
        if resp.status_code == 200 and resp.json().get("model_version") == int(raw):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"the scoring service did not load DSL snapshot {raw!r} within {timeout_s:.0f} s")


def _record(plan: _Plan, resp: dict[str, Any], eps: float, published_before: int) -> dict[str, Any]:
    rows = {it["item_id"]: it for it in resp["items"]}
    ordered = [rows[i] for i in plan.candidates]
    base = np.array([r["base"] for r in ordered], dtype=np.float64)
    comp = np.array([r["compensation"] for r in ordered], dtype=np.float64)
    tpp = np.array([r["tpp"] for r in ordered], dtype=np.float64)
    wide = np.array([r.get("wide", 0.0) for r in ordered], dtype=np.float64)
    score = np.array([r["score"] for r in ordered], dtype=np.float64)
    variants = served_variants(base, comp, tpp, wide, eps)
    e = plan.event
    rec: dict[str, Any] = {
        "event_id": e.event_id,
        "user_id": e.user_id,
        "item_id": e.item_id,
        "category": e.category,
        "ts": e.ts,
        "label": int(e.label or 0),  # planned events are labelled
        "ranked": plan.ranked,
        "n_candidates": len(plan.candidates),
        "model_version": resp.get("model_version"),
        "published_before": published_before,
        "took_ms": resp.get("took_ms"),
        "served": {
            "base": float(base[0]),
            "compensation": float(comp[0]),
            "tpp": float(tpp[0]),
            "wide": float(wide[0]),
            "score": float(score[0]),
        },
        "scores": {v: float(a[0]) for v, a in variants.items()},
        "rank": {},
    }
    if plan.ranked:
        rec["rank"] = {v: list(metrics.rank_counts(a[0], a[1:])) for v, a in variants.items()}
    return rec


def _wait_drained(settings: Settings, total: int, timeout_s: float) -> dict[str, float] | None:
    learners = _learner_names(settings)
    ingest = "ingest" in settings.worker_roles
    deadline = time.monotonic() + timeout_s
    m = worker_metrics(settings)
    while time.monotonic() < deadline:
        m = worker_metrics(settings)
        if _progress_counts(m, learners, ingest) >= total:
            break
        time.sleep(0.25)
    return m


def _redis_counts(settings: Settings) -> dict[str, int]:
    client = connect_sync(settings)
    p = settings.key_prefix
    latest = client.get(f"{p}:{{snap:dsl}}:latest")
    em = sum(1 for _ in client.scan_iter(match=f"{p}:{KEY_SPACE}:*", count=2000))
    tpp = sum(1 for _ in client.scan_iter(match=f"{p}:{{u:*}}:tpp", count=2000))
    return {"dsl_snapshot_version": int(latest) if latest else 0, "error_memory_keys": em, "tpp_user_keys": tpp}


def _delete_prefix(settings: Settings) -> None:
    client = connect_sync(settings)
    batch = []
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Ctrl-C and SIGTERM both unwind through ``finally`` so child processes are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_evaluation(
    settings: Settings,
    source: str,
    out: Path,
    limit: int | None = None,
    options: EvalOptions | None = None,
    **overrides: Any,
) -> Path:
    """Run the prequential evaluation (see the module doc); return the path of ``report.html``."""
    from driftrec.models.baselines import make_peer
    from driftrec.streams.replay import source_items
    from driftrec.streams.topics import ensure_topics

    opts = options or EvalOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown evaluation option {key!r}")
        setattr(opts, key, value)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    s = evaluation_settings(settings, run_id) if opts.namespace else settings
    if opts.lag_s is not None:  # the fast path runs in this process; the worker trains
        s = s.model_copy(update={"worker_roles": frozenset({"trainer"})})
    elif opts.synchronous and not opts.fast_path_only:
        s = synchronous_settings(s)
    started_wall = time.time()
    t_start = time.perf_counter()

    from driftrec import embedded

    if not embedded.redis_answers(s) or not _broker_answers(s):
        raise RuntimeError(
            f"no broker at {s.kafka_bootstrap} or no Redis at {s.redis_url}: run `driftrec up` "
            "first (or `driftrec demo`, which does)"
        )
    items = source_items(settings, source, limit)
    n_events = sum(1 for x in items if isinstance(x, Event))
    peers = {name: make_peer(name) for name in opts.baselines}
    if opts.per_event_baselines:
        peers.update({name + PER_EVENT: make_peer(name) for name in opts.baselines})
    procs: list[ChildProcess] = []
    with _sigterm_as_interrupt():
        try:
            with tqdm(
                total=n_events, unit="ev", desc=f"evaluate {source}", disable=not opts.progress, dynamic_ncols=True
            ) as bar:
                bar.set_postfix_str("starting worker + scoring service", refresh=True)
                ensure_topics(s)
                procs.append(start_worker(s, out / "logs" / "worker.log"))
                procs.append(start_server(s, out / "logs" / "serve.log"))
                bar.set_postfix_str("", refresh=True)
                t_loop = time.perf_counter()
                run = asyncio.run(_evaluate_loop(s, items, opts, peers, bar, out / "served.jsonl"))
                loop_s = time.perf_counter() - t_loop
                bar.set_postfix_str("draining the worker", refresh=True)
                final_metrics = _wait_drained(s, run.published, opts.drain_timeout_s)
                health = serving_healthy(s)
                counts = _redis_counts(s)
        except Exception as exc:
            # a child that died takes the real cause with it; say which one and how, with its log
            dead = [(p, why) for p in procs if (why := p.exit_reason()) is not None]
            if dead:
                detail = "\n".join(f"{why}; last lines of {p.log_path}:\n{p.log_tail(15)}" for p, why in dead)
                raise RuntimeError(f"evaluation stopped: {detail}") from exc
            raise
        finally:
            for proc in reversed(procs):
                proc.stop()
            for peer in peers.values():
                close = getattr(peer, "close", None)
                if close:
                    close()
            if opts.namespace and not opts.keep_state:
                with contextlib.suppress(Exception):
                    _delete_prefix(s)

    return _write_report(
        out,
        source,
        limit,
        s,
        opts,
        run,
        loop_s,
        time.perf_counter() - t_start,
        started_wall,
        final_metrics,
        health,
        counts,
    )


def _write_report(
    out: Path,
    source: str,
    limit: int | None,
    s: Settings,
    opts: EvalOptions,
    run: _Run,
    loop_s: float,
    wall_s: float,
    started_wall: float,
    final_metrics: dict[str, float] | None,
    health: dict | None,
    counts: dict[str, int],
) -> Path:
    records = run.records
    variants = list(SERVED_VARIANTS) + list(run.peer_seconds)
    n = len(records)
    size = opts.series_window or max(200, min(5000, n // 20 or 1))
    overall, series = summarize(records, variants, size, max(1, size // 2))
    for v in variants:
        secs = run.peer_seconds.get(v, loop_s)
        overall[v]["events_per_s"] = round(n / secs, 1) if secs > 0 else None
    versions = [r["model_version"] for r in records if r["model_version"] is not None]
    report = {
        "stamp": stamp(),
        "variants": overall,
        "series": series,
        "run": {
            "source": source,
            "limit": limit,
            "n_events": run.published,
            "n_scored": n,
            "n_ranked": sum(1 for r in records if r["ranked"]),
            "n_positive": sum(r["label"] for r in records),
            "dead_lettered": run.dead_lettered,
            "negatives": opts.negatives,
            "k": opts.k,
            "rank_fraction": opts.rank_fraction,
            "seed": opts.seed,
            "window": opts.window,
            "concurrency": opts.concurrency,
            "synchronous": opts.synchronous and not opts.fast_path_only and opts.lag_s is None,
            "fast_path_only": opts.fast_path_only and opts.lag_s is None,
            "lag_s": opts.lag_s,
            "max_lag": _max_lag(opts),
            "max_observed_lag": run.max_observed_lag,
            "started": started_wall,
            "wall_s": round(wall_s, 2),
            "loop_s": round(loop_s, 2),
            "serving_s": round(run.serving_s, 2),
            "lag_waits_s": round(run.lag_waits_s, 2),
            "peer_seconds": {k: round(v, 2) for k, v in run.peer_seconds.items()},
            "requests_per_s": round(n / run.serving_s, 1) if run.serving_s > 0 else None,
            "first_served_version_at": next((i for i, r in enumerate(records) if r["model_version"] is not None), None),
            "last_model_version": versions[-1] if versions else None,
            "events_with_compensation": sum(1 for r in records if r["served"]["compensation"] != 0.0),
            "events_with_tpp": sum(1 for r in records if r["served"]["tpp"] != 0.0),
            # the fusion layer's term weights (m: DSL logit, e: LSH memory, s: session memory,
            # t: TPP) as the run went (the event-time lag protocol, where ingest runs in this process)
            "term_weights": run.term_weights,
            "worker_metrics": {
                k: v
                for k, v in (final_metrics or {}).items()
                if k.startswith(("driftrec_events_", "driftrec_learner_events_total"))
            },
            "serving_health": health,
            "redis": counts,
            "namespace": {"key_prefix": s.key_prefix, "topic_prefix": s.topic_prefix, "worker_id": s.worker_id},
            "settings": {
                "dsl": s.dsl.model_dump(mode="json"),
                "memory": s.memory.model_dump(mode="json", by_alias=True),
                "tpp": s.tpp.model_dump(mode="json"),
                "serving": s.serving.model_dump(mode="json"),
            },
            "protocol": _protocol_text(opts),
        },
    }
    (out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    pngs = plot_series(series, variants, out)
    html_path = out / "report.html"
    write_html(report, pngs, html_path)
    return html_path


def _protocol_text(opts: EvalOptions) -> str:
    if opts.lag_s is not None:
        return (
            f"Prequential with an event-time lag of {opts.lag_s:g} s: every event is scored by the scoring "
            f"service once the fast path (state, error and session memories, the wide model, TPP propensities) has "
            f"taken in every earlier event at least {opts.lag_s:g} s older and none newer, through the worker's own "
            "ingest code against the real Redis; those events are then published to the broker, where the worker's "
            f"trainers learn them on their real snapshot cadence, at most {_max_lag(opts)} events behind. No score "
            f"includes its own event. Peers score the same candidates and learn the same events at the same moment "
            f"(the same information at the same lag); '<peer>{PER_EVENT}' peers learn each event right after scoring "
            f"it (zero lag). Ranking: the positive among {opts.negatives} fixed-seed sampled negatives (items seen so "
            "far, not the user's), ties broken uniformly in expectation."
        )
    if opts.fast_path_only:
        lag = (
            "after each window the run waits for ingest alone, so the fast path (error and session memories, "
            "user state, TPP propensities) has taken in every earlier event, while the DSL model is trained "
            "and served on its real cadence (fast-path lag)"
        )
    elif opts.synchronous:
        lag = "every window is scored by a served state that has learned every earlier event (synchronous)"
    else:
        lag = f"served state lags by at most window + {_max_lag(opts)} events plus the trainer's snapshot interval"
    return (
        f"Prequential in windows of {opts.window} events: each window's labelled events are scored by the "
        f"scoring service before the window is published; {lag}; no score includes its own event. "
        "Peers score the same candidates and learn each window right after it is scored (the same "
        f"information as the served state); '<peer>{PER_EVENT}' peers learn each event right after scoring it "
        f"(no lag, a reference the pipeline cannot match by construction). Ranking: the positive among "
        f"{opts.negatives} fixed-seed sampled negatives (items seen so far, not the user's), ties broken "
        "uniformly in expectation."
    )


def variant_table(report: dict[str, Any]) -> str:
    """The variants for a terminal. The two rates are different things (README, Evaluation), so
    they get their own columns: the pipeline's whole loop for the served variants, the in-process
    compute of a peer for the peers."""
    cols = ("auc", "logloss", "recall20", "ndcg20")
    head = "".join(f"{c:>10}" for c in cols)
    lines = [f"{'variant':<16}{head}{'pipeline ev/s':>15}{'compute ev/s':>14}"]
    for v, m in report["variants"].items():
        cells = "".join(f"{'-' if m.get(c) is None else format(m[c], '.4f'):>10}" for c in cols)
        rate = "-" if m.get("events_per_s") is None else f"{m['events_per_s']:,.0f}"
        pipeline, compute = (rate, "") if v in SERVED_VARIANTS else ("", rate)
        lines.append(f"{v:<16}{cells}{pipeline:>15}{compute:>14}")
    return "\n".join(lines)


def _broker_answers(settings: Settings) -> bool:
    """Probe the port first: a client bootstrapping against a closed port retries for ~30 s."""
    from driftrec import embedded

    return embedded.port_open(embedded.kafka_endpoint(settings)) and embedded.kafka_answers(settings)


def _stop_embedded(settings: Settings, name: str) -> None:
    """Stop what this demo's ``up`` started, leaving what was already running."""
    from driftrec import embedded

    if (pid := embedded.stop_started(settings, name)) is not None:
        print(f"  stopped {name} (pid {pid})", flush=True)


def run_demo(settings: Settings, out: Path, limit: int | None = None) -> Path:
    """``driftrec demo``: up → worker → serve → replay ML-100K (test-then-train at the event-time
    lag protocol, with the zero-lag ``@event`` references beside it) → report."""
    from driftrec import embedded

    started = time.perf_counter()
    had_broker, had_redis = _broker_answers(settings), embedded.redis_answers(settings)
    print("bringing up the embedded broker and Redis …", flush=True)
    for line in embedded.up(settings):
        print(f"  {line}", flush=True)
    try:
        path = run_evaluation(
            settings,
            "ml-100k",
            out,
            limit=limit if limit is not None else DEMO_LIMIT,
            rank_fraction=DEMO_RANK_FRACTION,
            lag_s=DEMO_LAG_S,
        )
    finally:
        for name, had in (("tansu", had_broker), ("redis", had_redis)):
            if not had:
                _stop_embedded(settings, name)
    report = orjson.loads((Path(out) / "report.json").read_bytes())
    print(variant_table(report), flush=True)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; open {path}", flush=True)
    return path
