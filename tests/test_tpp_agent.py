"""The TPP learner agent against real Redis, and once end to end through a real worker process.

Unit tests drive ``TPPLearner.handle`` directly with real Taobao click-stream events; the
``isolated`` fixture gives each test its own key prefix (cleaned up afterwards) on the real
Redis of the session's infrastructure.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import cast

import numpy as np
import orjson
import pytest
import redis as sync_redis
import torch
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.prompt_tpp import PromptTPP
from driftrec.models.tpp import collate
from driftrec.storage.event_state import EventState, StateKeys
from driftrec.storage.snapshots import SnapshotKeys, latest_version, load_snapshot
from driftrec.streams.datasets import taobao_sample_events
from driftrec.streams.replay import publish
from driftrec.streams.tpp_agent import TPPLearner
from tests.conftest import SHARED_DATA
from tests.infra import WorkerProcess, wait_for

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def taobao() -> list[Event]:
    return taobao_sample_events(SHARED_DATA)


def with_tpp(settings: Settings, **tpp: object) -> Settings:
    return settings.model_copy(update={"tpp": settings.tpp.model_copy(update=tpp)})


async def stored_propensities(client: Redis, settings: Settings, users: set[str]) -> dict[str, dict]:
    keys = StateKeys(settings.key_prefix)
    raw = await client.mget([keys.user_tpp(u) for u in sorted(users)])
    return {u: orjson.loads(v) for u, v in zip(sorted(users), raw) if v is not None}


async def test_redelivered_batch_changes_nothing(isolated: Settings, taobao: list[Event]) -> None:
    settings = with_tpp(isolated, period_events=100_000, max_seq_len=32)
    batch = taobao[:400]
    users = {e.user_id for e in batch}
    client = Redis.from_url(settings.redis_url)
    try:
        # The ingest agent's sequence already holds these events (it may run ahead of the learner):
        # the learner must unite it with the batch by event id, not append the batch twice.
        await EventState(client, settings.key_prefix, settings.user_seq_len, settings.dedup_ttl_s).apply(batch)
        learner = TPPLearner(client, settings)
        assert await learner.handle(batch) == len(batch)
        steps, vocab = learner.steps, learner.vocab.to_bytes()
        first = await stored_propensities(client, settings, users)
        assert set(first) == users
        assert steps > 0

        assert await learner.handle(batch) == 0
        assert await learner.handle(list(reversed(batch[:200]))) == 0
        assert learner.steps == steps and learner.events_learned == len(batch)
        assert learner.vocab.to_bytes() == vocab
        assert await stored_propensities(client, settings, users) == first

        per_user = Counter(e.user_id for e in batch)
        by_user: dict[str, list[Event]] = {}
        for e in batch:
            by_user.setdefault(e.user_id, []).append(e)
        seqs = await learner._sequences(by_user)
        for user, seq in seqs.items():
            assert len(seq.times) == min(per_user[user], settings.tpp.max_seq_len)
            assert seq.times == sorted(seq.times)
    finally:
        await client.aclose()


async def test_propensities_are_probabilities_and_move_with_learning(isolated: Settings, taobao: list[Event]) -> None:
    settings = with_tpp(isolated, period_events=100_000)
    first, later = taobao[:300], taobao[300:1500]
    client = Redis.from_url(settings.redis_url)
    try:
        learner = TPPLearner(client, settings)
        await learner.handle(first)
        users = {e.user_id for e in first}
        records = await stored_propensities(client, settings, users)
        assert set(records) == users
        categories = {e.category for e in first}
        last_ts = {u: max(e.ts for e in first if e.user_id == u) for u in users}
        for user, rec in records.items():
            assert rec["n_types"] == settings.tpp.n_types
            assert rec["version"] == learner.steps
            assert rec["ts"] == last_ts[user]
            probs = rec["probs"]
            assert probs and set(probs) <= categories and "<other>" not in probs
            assert all(0.0 <= p <= 1.0 for p in probs.values())
            assert sum(probs.values()) <= 1.0 + 1e-9
        # More categories than type slots: the overflow type takes real mass, outside ``probs``.
        assert len(categories) > settings.tpp.n_types - 1

        # The stored record is the model's own propensity at the user's last event.
        user = max(users, key=lambda u: sum(e.user_id == u for e in first))
        by_user = {user: [e for e in first if e.user_id == user]}
        seq = learner._encode((await learner._sequences(by_user))[user], assign=False)
        lam_single = learner.model.propensity(seq[0], seq[1], at_time=float(seq[0][-1]))
        before = learner.model.intensity_many([seq])[0]
        np.testing.assert_allclose(before, lam_single, rtol=1e-4)
        expected = learner.propensity_record((await learner._sequences(by_user))[user], before)["probs"]
        assert records[user]["probs"] == pytest.approx(expected, rel=1e-4)

        steps = learner.steps
        for s in range(0, len(later), 300):
            await learner.handle(later[s : s + 300])
        assert learner.steps > steps
        after = learner.model.intensity_many([seq])[0]
        assert not np.allclose(before / before.sum(), after / after.sum(), atol=1e-4)
    finally:
        await client.aclose()


async def test_period_boundaries_end_periods_and_snapshots_resume(isolated: Settings, taobao: list[Event]) -> None:
    settings = with_tpp(isolated, period_events=100, snapshot_every_steps=10_000, snapshot_every_s=1e9)
    events = taobao[:250]
    client = Redis.from_url(settings.redis_url)
    try:
        learner = TPPLearner(client, settings)
        await learner.handle(events[:60])
        model = learner.model
        assert learner.period == 0 and model.periods_done == 0
        assert await latest_version(client, SnapshotKeys(settings.key_prefix, "tpp")) is None
        await learner.handle(events[60:120])  # crosses 100
        assert learner.period == 1 and model.periods_done == 1
        assert not model.query_emb.weight.requires_grad  # the query function froze after period 1
        query_after_p1 = model.query_emb.weight.detach().clone()
        await learner.handle(events[120:250])  # crosses 200
        assert learner.period == 2 and model.periods_done == 2 and learner.events_in_period == 50
        assert torch.equal(model.query_emb.weight, query_after_p1)

        # Each boundary published a snapshot; a new learner (a restarted worker) resumes from it.
        found = await load_snapshot(client, SnapshotKeys(settings.key_prefix, "tpp"))
        assert found is not None
        version, parts = found
        assert version == 2 and {"model", "vocab", "meta"} <= set(parts)
        assert orjson.loads(parts["meta"])["period"] == 2
        resumed = TPPLearner(client, settings)
        again = await resumed.ensure_model()
        assert (resumed.steps, resumed.period, resumed.events_in_period) == (learner.steps, 2, 50)
        assert resumed.vocab.names() == learner.vocab.names()
        assert again.periods_done == 2
        user_events = [e for e in events if e.user_id == events[0].user_id]
        seq = learner._encode(
            (await learner._sequences({events[0].user_id: user_events}))[events[0].user_id], assign=False
        )
        np.testing.assert_allclose(again.intensity_many([seq]), model.intensity_many([seq]), rtol=1e-5)
        # Resumed learner does not relearn what the first one already marked.
        assert await resumed.handle(events[:250]) == 0
    finally:
        await client.aclose()


def test_freeze_none_keeps_a_live_query_after_the_first_period() -> None:
    """Regression (models/prompt_tpp.py): freeze="none" used to switch to the frozen query copy
    after period 1 and so behaved exactly like freeze="query"; it must keep the live embedding."""
    rng = np.random.default_rng(0)
    seqs = [(np.cumsum(rng.exponential(1.0, 12)), rng.integers(0, 4, 12)) for _ in range(8)]
    queries = {}
    for mode in ("query", "none"):
        model = PromptTPP(4, freeze=mode, seed=0)
        model.learn_many(seqs)
        model.end_period()
        model.learn_many(seqs)
        batch = collate(seqs[:2], model.time_scale or 1.0)
        live = model.net.type_emb(batch.types)[0, 0]
        assert torch.allclose(model.query(batch)[0][0, 0, :4], live[:4]) == (mode == "none")
        queries[mode] = model.query(batch)[0]
    assert not torch.equal(queries["query"], queries["none"])


@pytest.mark.integration
def test_worker_writes_propensities_and_publishes_tpp_snapshot(
    isolated: Settings, taobao: list[Event], tmp_path
) -> None:
    # Only ingest + TPP agents, so the test measures this agent and stays fast.
    settings = isolated.model_copy(
        update={
            "dsl": isolated.dsl.model_copy(update={"enabled": False}),
            "memory": isolated.memory.model_copy(update={"enabled": False}),
        }
    )
    users = {e.user_id for e in taobao}
    keys = StateKeys(settings.key_prefix)
    client = sync_redis.Redis.from_url(settings.redis_url)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, taobao, progress=False)

        def all_users_have_propensities() -> bool:
            return all(v is not None for v in client.mget([keys.user_tpp(u) for u in sorted(users)]))

        wait_for(all_users_have_propensities, 75, "user_tpp for every user", worker)
        wait_for(
            lambda: (m := worker.metrics()) and m.get('driftrec_learner_events_total{learner="tpp"}') == len(taobao),
            60,
            "the tpp agent to learn every event",
            worker,
        )
        snap = SnapshotKeys(settings.key_prefix, "tpp")
        wait_for(lambda: client.get(snap.latest) is not None, 30, "a tpp snapshot", worker)
        version = int(cast(bytes, client.get(snap.latest)))
        assert set(client.hkeys(snap.blob(version))) >= {b"model", b"vocab", b"meta"}
        rec = orjson.loads(cast(bytes, client.get(keys.user_tpp(taobao[-1].user_id))))
        assert rec["n_types"] == settings.tpp.n_types and rec["version"] > 0
        assert 0.0 < sum(rec["probs"].values()) <= 1.0 + 1e-9 and all(math.isfinite(p) for p in rec["probs"].values())
    finally:
        worker.stop()
        client.close()
