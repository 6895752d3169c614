"""The same storage, worker and scoring service on a real local 3-master Redis Cluster.

Keys read or written together share a hash tag, multi-key reads go per slot, Lua scripts are
loaded on whichever node lacks them: the run must give exactly the single-server results.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from redis.crc import key_slot

from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, delete_prefix, wait_for
from driftrec.models.error_memory import ErrorMemory, RandomProjectionLSH, ServedSample
from driftrec.serving.app import create_app
from driftrec.storage.client import connect, connect_sync, is_cluster
from driftrec.storage.error_memory import MemoryKeys, read_estimates, write_errors, write_session_errors
from driftrec.storage.event_state import EventState, StateKeys
from driftrec.storage.snapshots import SnapshotKeys, StaleEpoch, acquire_lease, load_snapshot, publish_snapshot
from driftrec.streams.datasets import taobao_sample_events
from driftrec.streams.propensity import PropensityWriter
from driftrec.streams.replay import publish
from driftrec.streams.tpp_agent import TPPLearner
from tests.conftest import SHARED_DATA
from tests.state_model import expected_state, redis_state


@pytest.fixture
def on_cluster(isolated: Settings, cluster: str) -> Iterator[Settings]:
    settings = isolated.model_copy(update={"redis_url": cluster, "redis_cluster": True})
    yield settings
    delete_prefix(settings)


async def test_storage_answers_like_the_reference_across_slots(on_cluster: Settings) -> None:
    client: Any = connect(on_cluster)  # the storage functions take either client
    assert is_cluster(client) and type(client).__name__ == "RedisCluster"
    try:
        rng = np.random.default_rng(0)
        lsh = RandomProjectionLSH(8, 4, 6, seed=0, version=1)
        keys = MemoryKeys(on_cluster.key_prefix, 1, n_shards=16)
        ref = ErrorMemory(lsh, capacity=5, prior=1.0)
        xs = [
            Interaction(
                f"u{i % 9}", f"i{i}", 1000.0 + i, label=int(rng.integers(2)), category=f"c{i % 3}", event_id=f"e{i}"
            )
            for i in range(300)
        ]
        probs, hidden = rng.uniform(0.05, 0.95, 300), rng.standard_normal((300, 8)).astype(np.float32)
        added = await write_errors(client, keys, lsh, xs, probs, hidden, capacity=5)
        ref.learn_many([ServedSample(h, float(p), x.label, x.ts, x.event_id) for x, p, h in zip(xs, probs, hidden)])
        assert added == ref.last_added > 0
        assert await write_errors(client, keys, lsh, xs, probs, hidden, capacity=5) == 0  # redelivery
        assert await write_session_errors(client, keys, xs, probs, capacity=4) > 0
        e_cluster, w_cluster = await read_estimates(client, keys, lsh, hidden, probs)
        e_ref, w_ref = ref.estimate_many(hidden, probs)
        np.testing.assert_allclose(e_cluster, e_ref, atol=1e-12)
        np.testing.assert_array_equal(w_cluster, w_ref)
        slots = {key_slot(k) async for k in client.scan_iter(match=f"{on_cluster.key_prefix}:*")}
        assert len(slots) > 20  # the memory really is spread over the cluster

        snaps = SnapshotKeys(on_cluster.key_prefix, "dsl")
        epoch = await acquire_lease(client, snaps, "trainer-a", ttl_ms=5_000)
        assert epoch == 1 and await publish_snapshot(client, snaps, {"model": b"x"}, epoch=epoch) == 1
        with pytest.raises(StaleEpoch):
            await publish_snapshot(client, snaps, {"model": b"y"}, epoch=epoch + 1)
        found = await load_snapshot(client, snaps)
        assert found is not None and found[0] == 1

        # the TPP learner's reads and writes (per-user keys, one hash tag each) on the cluster
        settings = on_cluster.model_copy(deep=True)
        settings.tpp.period_events = 150
        events = taobao_sample_events(SHARED_DATA)[:300]
        await EventState(client, settings.key_prefix, settings.user_seq_len, settings.dedup_ttl_s).apply(events)
        learner = TPPLearner(client, settings)
        assert await learner.handle(events) == len(events)
        assert learner.due()  # a period boundary asks for a snapshot
        tpp_keys = SnapshotKeys(settings.key_prefix, "tpp")
        learner.published(await publish_snapshot(client, tpp_keys, await learner.snapshot_parts()))
        settings.serving.reload_every_s = 0.0
        assert await PropensityWriter(client, settings).write(events) > 0  # the ingest role's TPP side
        state = StateKeys(settings.key_prefix)
        stored = await client.get(state.user_tpp(events[-1].user_id))
        assert stored is not None and orjson.loads(stored)["probs"]
    finally:
        await client.aclose()


def test_worker_trainer_and_scoring_service_end_to_end(on_cluster: Settings, tmp_path) -> None:
    settings = on_cluster.model_copy(deep=True)
    settings.tpp.enabled = False  # the TPP path is covered by its own tests; keep this run short
    events = taobao_sample_events(SHARED_DATA)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, events, progress=False)
        wait_for(
            lambda: (
                (m := worker.metrics())
                and m["driftrec_events_processed_total"] == len(events)
                and m.get('driftrec_learner_seen_total{learner="trainer"}', 0) >= len(events)
            ),
            180,
            "every event applied and learned on the cluster",
            worker,
        )
        # ingest state is exactly the single-server state, spread over the cluster's slots
        assert redis_state(settings) == expected_state(events, settings.key_prefix, settings.user_seq_len)
        # the wide layer learned every labelled event across the slots (its writer's failures
        # are only logged, so the markers are what prove its scripts ran on the cluster)
        labelled = {e.event_id for e in events if e.label is not None}
        client = connect_sync(settings)
        pattern = f"{settings.key_prefix}:{{u:*}}:wseen:*"
        wait_for(
            lambda: sum(1 for _ in client.scan_iter(match=pattern, count=2000)) == len(labelled),
            60,
            "the wide layer to learn every labelled event on the cluster",
            worker,
        )
        wait_for(lambda: asyncio.run(_latest(settings)) is not None, 60, "a DSL snapshot", worker)
    finally:
        worker.stop()
    asyncio.run(_score(settings, events[-1].user_id, [e.item_id for e in events[-40:]]))


async def _latest(settings: Settings) -> int | None:
    client = connect(settings)
    try:
        found = await load_snapshot(client, SnapshotKeys(settings.key_prefix, "dsl"))
        return None if found is None else found[0]
    finally:
        await client.aclose()


async def _score(settings: Settings, user: str, items: list[str]) -> None:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as http,
    ):
        body = {"user_id": user, "candidates": list(dict.fromkeys(items)) + [f"never-seen-{uuid.uuid4().hex}"]}
        resp = await http.post("/v1/score", json=body)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert doc["model_version"] is not None  # the trainer's snapshot, read from the cluster
        bases = [x["base"] for x in doc["items"]]
        assert len(set(bases)) > 1  # the model scores, not a flat cold-start constant
        assert app.state.scorer.stats.redis_errors == 0  # every read went through, slot by slot
        health = (await http.get("/healthz")).json()
        assert health["model_version"] == doc["model_version"]
