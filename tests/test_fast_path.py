"""The fast path against real processes: ingest alone writes each labelled event's served error.

No trainer runs here: the only writer of the memories is the ingest worker, which follows the
snapshot the test publishes (as the trainer would) and scores each labelled event with it.
"""

from __future__ import annotations

import asyncio

import numpy as np

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, wait_for
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import session_code
from driftrec.storage.client import connect, connect_sync
from driftrec.storage.error_memory import ENTRY_BYTES, MemoryKeys
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from driftrec.streams.replay import publish
from driftrec.streams.trainer import new_model

T0 = 1_700_000_000.0


async def _publish_model(settings: Settings, blob: bytes) -> int:
    redis = connect(settings)
    try:
        return await publish_snapshot(
            redis, SnapshotKeys(settings.key_prefix, "dsl"), {"model": blob, "catalog": b"{}"}
        )
    finally:
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
        publish(settings, events, progress=False)
        wait_for(lambda: len(_session_entries(settings, "u-fast")) == 5, 60, "5 session entries", worker)
        entries = _session_entries(settings, "u-fast")
        served, _ = SparseScorer.from_bytes(blob).predict_with_hidden([e.to_interaction() for e in events])
        np.testing.assert_allclose(entries[:, 0], [e.ts for e in events])  # event-time order
        np.testing.assert_allclose(entries[:, 1], [float(e.label or 0) for e in events])
        np.testing.assert_allclose(entries[:, 2], served, rtol=1e-6)  # the published snapshot's prediction
        publish(settings, events, progress=False)  # redelivered copies change nothing
        wait_for(
            lambda: (worker.metrics() or {}).get("driftrec_events_duplicate_total", 0) >= 5, 60, "duplicates", worker
        )
        assert len(_session_entries(settings, "u-fast")) == 5
    finally:
        worker.stop()
