"""ReLoop2 end to end: an injected shift on real data, through the real broker, worker and Redis.

ML-100K, the labels of its most frequent genre flip at 60 % of a 16,000-event slice. The worker
(ingest, which writes the error memory, + the DSL trainer) learns from the broker; before each window of events
is published we score it exactly as serving would — the newest DSL snapshot from Redis, its hidden
statistics, and the error memory read from Redis — so each prediction uses only state from before
the event. On the shifted segment -- the flipped genre's events in the 6,400 events after the
flip -- compensated predictions must have a lower log-loss than the same served model
uncompensated.

Measured (3 runs each, see ``models/dsl.py``): with the DSL model growing rows on touch, the
flipped genre's log-loss is 0.7292 / 0.7278 / 0.7302 uncompensated and 0.7221 / 0.7203 / 0.7233
compensated, while over *all* post-flip events the two tie (0.6669 vs 0.6669, 0.6658 vs 0.6670,
0.6666 vs 0.6671): the base model already adapts to the rest of the stream, and the memory's
job is the region that shifted. Both figures are printed so a regression shows in the test log.
"""

from __future__ import annotations

import asyncio
import functools

import numpy as np
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings, get_settings
from driftrec.harness import WorkerProcess, wait_for
from driftrec.models import metrics
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import ErrorSums, HiddenStandardizer, compensate
from driftrec.storage.client import mget
from driftrec.storage.error_memory import plan_buckets, sums_from_values
from driftrec.storage.served_memory import KeyViews
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot
from driftrec.streams.datasets import ml100k_events
from driftrec.streams.replay import publish

N_EVENTS, FLIP_AT, WINDOW = 16_000, 0.6, 400
EARLY = 2_000
SHIFT_LAMBDA = 0.5


def flipped_stream() -> tuple[list[Event], str, int]:
    events = ml100k_events(get_settings().data_cache, limit=N_EVENTS)
    genres = [e.category for e in events if e.category]
    genre = max(set(genres), key=genres.count)
    start = int(FLIP_AT * len(events))
    out = [
        e if i < start or e.category != genre or e.label is None else e.model_copy(update={"label": 1 - e.label})
        for i, e in enumerate(events)
    ]
    return out, genre, start


def learned(worker: WorkerProcess, n: int) -> bool:
    m = worker.metrics() or {}
    # the memory is written at ingest, the snapshot by the trainer: both must have taken the events in
    return (
        m.get('driftrec_learner_seen_total{learner="trainer"}', 0) >= n
        and m.get("driftrec_events_processed_total", 0) >= n
    )


async def served_predictions(settings: Settings, window: list[Event]) -> tuple[np.ndarray, np.ndarray]:
    """What serving would return for these events now: (base, base + compensation)."""
    redis = Redis.from_url(settings.redis_url)
    try:
        snapshot = await load_snapshot(redis, SnapshotKeys(settings.key_prefix, "dsl"))
        assert snapshot is not None, "the trainer must have published a snapshot"
        version, parts = snapshot
        scorer = SparseScorer.from_bytes(parts["model"])
        stats = parts.get("hidden_stats")
        standardizer = HiddenStandardizer.from_bytes(stats) if stats else None
        views = await KeyViews(redis, settings).resolve(version, parts, scorer, standardizer)
        assert views, "the snapshot's memory key must be loadable"
        xs = [e.to_interaction() for e in window]
        base, _ = scorer.predict_with_hidden(xs)
        m = settings.memory
        sums = []
        for view in views:  # every key snapshot serving reads, each hashed in its own space
            plan = plan_buckets(view.names, view.of_interactions(xs))
            sums.append(sums_from_values(await mget(redis, plan.names), plan, gamma=m.gamma, prior=m.prior))
        # the memory's content is under test, at the paper's scale of λ (the served weight is learned)
        e_hat = functools.reduce(ErrorSums.plus, sums).estimate(base)
        comp = compensate(base, e_hat, SHIFT_LAMBDA) - base
        return base, base + comp
    finally:
        await redis.aclose()


def test_error_memory_cuts_logloss_after_a_shift(isolated: Settings, tmp_path) -> None:
    settings = isolated.model_copy(deep=True)
    settings.tpp.enabled = False
    settings.dsl.snapshot_every_s = 1.0
    events, genre, start = flipped_stream()
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, events[:start], progress=False)
        wait_for(lambda: learned(worker, start), 240, "the pre-flip stream to be learned", worker, interval=1)
        labels, base, memory, in_genre = [], [], [], []
        for lo in range(start, len(events), WINDOW):
            window = events[lo : lo + WINDOW]
            p_base, p_memory = asyncio.run(served_predictions(settings, window))
            labels += [e.label for e in window]
            base += list(p_base)
            memory += list(p_memory)
            in_genre += [e.category == genre for e in window]
            publish(settings, window, progress=False)
            n = lo + len(window)
            wait_for(functools.partial(learned, worker, n), 120, "the window to be learned", worker)
    finally:
        worker.stop()
    y, pb, pm = (np.asarray(a, dtype=float) for a in (labels, base, memory))
    mask = np.asarray(in_genre)
    early = mask.copy()
    early[EARLY:] = False  # right after the flip, before the base model has learned it
    print(
        f"first {EARLY} post-flip events, flipped genre ({early.sum()}): log-loss base "
        f"{metrics.logloss(y[early], pb[early]):.4f} memory {metrics.logloss(y[early], pm[early]):.4f}"
    )
    print(
        f"flipped genre {genre} ({mask.sum()} events): log-loss base {metrics.logloss(y[mask], pb[mask]):.4f} "
        f"memory {metrics.logloss(y[mask], pm[mask]):.4f}; all post-flip: base {metrics.logloss(y, pb):.4f} "
        f"memory {metrics.logloss(y, pm):.4f}"
    )
    assert np.all((pm > 0) & (pm < 1)), "compensated predictions must stay probabilities"
    assert np.any(pm != pb), "the memory must have been written and read"
    assert mask.sum() > 500
    # the gain must stand out of its own noise (batching is timing-dependent, so snapshots differ
    # between runs): the per-event log-loss saving on the flipped genre, at two standard errors
    for part, name in ((mask, "flipped genre"), (early, f"flipped genre, first {EARLY} events")):
        saving = metrics.logloss_terms(y[part], pb[part]) - metrics.logloss_terms(y[part], pm[part])
        se = saving.std(ddof=1) / np.sqrt(saving.size)
        assert saving.mean() > 2 * se, (name, saving.mean(), se)
