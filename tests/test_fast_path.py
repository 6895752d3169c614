"""The fast path against real processes: ingest alone writes each labelled event's served error.

No trainer runs here: the only writer of the memories is the ingest worker, which follows the
snapshot the test publishes (as the trainer would) and stores, for each labelled event, the score
the scoring service served for it before the memories' correction (``models/served.py``).
"""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
import orjson

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, wait_for
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import session_code
from driftrec.models.served import logit, sigmoid
from driftrec.serving.scorer import Scorer
from driftrec.storage.client import connect, connect_sync
from driftrec.storage.error_memory import ENTRY_BYTES, MemoryKeys
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from driftrec.streams.replay import publish
from driftrec.streams.trainer import new_model

T0 = 1_700_000_000.0


CATALOG = {f"item{j}": "drama" for j in range(7)}


async def _publish_model(settings: Settings, blob: bytes) -> int:
    redis = connect(settings)
    try:
        return await publish_snapshot(
            redis, SnapshotKeys(settings.key_prefix, "dsl"), {"model": blob, "catalog": orjson.dumps(CATALOG)}
        )
    finally:
        await redis.aclose()


async def _served_before_memory(settings: Settings, e: Event) -> float:
    """What the scoring service serves for the event's user, item and time, before the memories'
    correction: ``sigmoid(logit(base) + wide + tpp)``."""
    redis = connect(settings)
    scorer = Scorer(settings, redis)
    try:
        await scorer.refresh()
        res = await scorer.score(e.user_id, [e.item_id], e.ts)
        return float(sigmoid(logit(res.base, settings.serving.eps) + res.wide + res.tpp)[0])
    finally:
        await scorer.close()
        await redis.aclose()


def _events(user: str, n: int, start: int) -> list[Event]:
    return [
        Event(
            event_id=f"{user}-{start + k}",
            user_id=user,
            item_id=f"item{(start + k) % 7}",
            ts=T0 + start + k,
            kind="rating",
            label=1 if (start + k) % 2 else 0,
            category="drama",
        )
        for k in range(n)
    ]


def _session_entries(settings: Settings, user: str) -> np.ndarray:
    keys = MemoryKeys.from_settings(settings.key_prefix, settings.dsl.generation, settings.memory.n_shards)
    raw = connect_sync(settings).get(keys.session_bucket(session_code(user, "drama"))[1]) or b""
    return np.frombuffer(raw, dtype="<f8").reshape(-1, 3) if len(raw) % ENTRY_BYTES == 0 else np.zeros((0, 3))


def _has_entries(settings: Settings, user: str, n: int) -> bool:
    return len(_session_entries(settings, user)) == n


def test_ingest_alone_writes_the_served_error_of_each_labelled_event(isolated: Settings, tmp_path) -> None:
    settings = isolated.model_copy(deep=True)
    settings.worker_roles = frozenset({"ingest"})
    settings.tpp.enabled = False
    settings.serving.kafka_agent = False
    settings.memory = settings.memory.model_copy(update={"session_capacity": 16})
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        before = _events("u-before", 3, 0)  # no snapshot yet: no served prediction, nothing written
        publish(settings, before, progress=False)
        wait_for(lambda: (worker.metrics() or {}).get("driftrec_events_processed_total") == 3, 60, "ingest", worker)
        assert len(_session_entries(settings, "u-before")) == 0
        blob = new_model(settings).to_bytes()
        asyncio.run(_publish_model(settings, blob))
        events = _events("u-fast", 5, 10)
        served = []
        for k, e in enumerate(events):  # one at a time: each is served by the state its batch reads
            served.append(asyncio.run(_served_before_memory(settings, e)))
            publish(settings, [e], progress=False)
            wait_for(partial(_has_entries, settings, "u-fast", k + 1), 60, "a session entry", worker)
        entries = _session_entries(settings, "u-fast")
        base, _ = SparseScorer.from_bytes(blob).predict_with_hidden([e.to_interaction() for e in events])
        np.testing.assert_allclose(entries[:, 0], [e.ts for e in events])  # event-time order
        np.testing.assert_allclose(entries[:, 1], [float(e.label or 0) for e in events])
        # the score served before the memories' correction: the published snapshot's prediction
        # and the fusion layer as it stood (serving folds the user into the first layer: ~1e-8)
        np.testing.assert_allclose(entries[:, 2], served, rtol=1e-6)
        assert np.abs(entries[:, 2] - base).max() > 1e-4  # the fusion layer had learned something
        publish(settings, events, progress=False)  # redelivered copies change nothing
        wait_for(
            lambda: (worker.metrics() or {}).get("driftrec_events_duplicate_total", 0) >= 5, 60, "duplicates", worker
        )
        assert len(_session_entries(settings, "u-fast")) == 5
    finally:
        worker.stop()
