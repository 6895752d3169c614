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
from driftrec.harness import WorkerProcess, wait_for
from driftrec.models.prompt_tpp import PromptTPP
from driftrec.models.tpp import collate
from driftrec.storage.event_state import EventState, StateKeys
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot, publish_snapshot
from driftrec.streams.datasets import taobao_sample_events
from driftrec.streams.propensity import PropensityWriter, encode_sequence, propensity_record, user_sequences
from driftrec.streams.replay import publish
from driftrec.streams.tpp_agent import TPPLearner
from tests.conftest import SHARED_DATA

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


async def publish_learner(client: Redis, settings: Settings, learner: TPPLearner) -> int:
    """What the lineage runner does at a publish (without its lease: these tests own the prefix)."""
    version = await publish_snapshot(client, SnapshotKeys(settings.key_prefix, "tpp"), await learner.snapshot_parts())
    learner.published(version)
    return version


async def test_sequences_unite_ingest_state_with_the_batch(isolated: Settings, taobao: list[Event]) -> None:
    settings = with_tpp(isolated, period_events=100_000, max_seq_len=32)
    batch = taobao[:400]
    client = Redis.from_url(settings.redis_url)
    try:
        # The ingest role's sequence already holds half of these events (it may run ahead of the
        # trainer): the learner must unite it with the batch by event id, not count them twice.
        await EventState(client, settings.key_prefix, settings.user_seq_len, settings.dedup_ttl_s).apply(batch[:200])
        learner = TPPLearner(client, settings)
        assert await learner.handle(batch) == len(batch)
        assert learner.steps > 0 and learner.events_learned == len(batch)
        per_user = Counter(e.user_id for e in batch)
        by_user: dict[str, list[Event]] = {}
        for e in batch:
            by_user.setdefault(e.user_id, []).append(e)
        seqs = await user_sequences(client, StateKeys(settings.key_prefix), by_user, settings.tpp.max_seq_len)
        for user, seq in seqs.items():
            assert len(seq.times) == min(per_user[user], settings.tpp.max_seq_len)
            assert seq.times == sorted(seq.times)
        # the vocabulary follows stream order only: a second lineage fed the same stream agrees
        again = TPPLearner(client, settings)
        await again.handle(batch)
        assert again.vocab.to_bytes() == learner.vocab.to_bytes()
    finally:
        await client.aclose()


async def test_ingest_writes_the_snapshots_propensities(isolated: Settings, taobao: list[Event]) -> None:
    settings = with_tpp(isolated, period_events=100_000)
    settings.serving.reload_every_s = 0.0
    first, later = taobao[:300], taobao[300:1500]
    client = Redis.from_url(settings.redis_url)
    state = EventState(client, settings.key_prefix, settings.user_seq_len, settings.dedup_ttl_s)
    try:
        learner = TPPLearner(client, settings)
        writer = PropensityWriter(client, settings)
        await state.apply(first)
        await learner.handle(first)
        assert await writer.write(first) == 0  # nothing before the lineage's first snapshot
        version = await publish_learner(client, settings, learner)
        users = {e.user_id for e in first}
        assert await writer.write(first) == len(users)
        records = await stored_propensities(client, settings, users)
        assert set(records) == users
        categories = {e.category for e in first}
        last_ts = {u: max(e.ts for e in first if e.user_id == u) for u in users}
        for user, rec in records.items():
            assert rec["n_types"] == settings.tpp.n_types
            assert rec["version"] == learner.steps and rec["snapshot"] == version
            assert rec["ts"] == last_ts[user]
            probs = rec["probs"]
            assert probs and set(probs) <= categories and "<other>" not in probs
            assert all(0.0 <= p <= 1.0 for p in probs.values())
            assert sum(probs.values()) <= 1.0 + 1e-9
        # More categories than type slots: the overflow type takes real mass, outside ``probs``.
        assert len(categories) > settings.tpp.n_types - 1

        # The stored record is the published model's own propensity at the user's last event.
        user = max(users, key=lambda u: sum(e.user_id == u for e in first))
        by_user = {user: [e for e in first if e.user_id == user]}
        user_seq = (await user_sequences(client, StateKeys(settings.key_prefix), by_user, 64))[user]
        seq = encode_sequence(learner.vocab, user_seq)
        model = learner.ensure_model()
        lam_single = model.propensity(seq[0], seq[1], at_time=float(seq[0][-1]))
        before = model.intensity_many([seq])[0]
        np.testing.assert_allclose(before, lam_single, rtol=1e-4)
        expected = propensity_record(user_seq, before, learner.vocab, learner.steps)["probs"]
        assert records[user]["probs"] == pytest.approx(expected, rel=1e-4)

        steps = learner.steps
        for s in range(0, len(later), 300):
            await learner.handle(later[s : s + 300])
        assert learner.steps > steps
        after = model.intensity_many([seq])[0]
        assert not np.allclose(before / before.sum(), after / after.sum(), atol=1e-4)
        # the writer serves the newest snapshot once it is published
        await publish_learner(client, settings, learner)
        await writer.write(by_user[user])
        rec = (await stored_propensities(client, settings, {user}))[user]
        assert rec["version"] == learner.steps and rec["probs"] != records[user]["probs"]
    finally:
        await client.aclose()


async def test_period_boundaries_end_periods_and_snapshots_resume(isolated: Settings, taobao: list[Event]) -> None:
    settings = with_tpp(isolated, period_events=100, snapshot_every_steps=10_000, snapshot_every_s=1e9)
    events = taobao[:250]
    client = Redis.from_url(settings.redis_url)
    try:
        learner = TPPLearner(client, settings)
        await learner.handle(events[:60])
        model = learner.ensure_model()
        assert learner.period == 0 and model.periods_done == 0 and not learner.due()
        await learner.handle(events[60:120])  # crosses 100
        assert learner.period == 1 and model.periods_done == 1
        assert learner.due()  # a period boundary asks for a snapshot
        assert not model.query_emb.weight.requires_grad  # the query function froze after period 1
        query_after_p1 = model.query_emb.weight.detach().clone()
        await learner.handle(events[120:250])  # crosses 200
        assert learner.period == 2 and model.periods_done == 2 and learner.events_in_period == 50
        assert torch.equal(model.query_emb.weight, query_after_p1)
        version = await publish_learner(client, settings, learner)
        assert not learner.due()

        # A new learner (a standby taking over) resumes from the snapshot.
        found = await load_snapshot(client, SnapshotKeys(settings.key_prefix, "tpp"))
        assert found is not None
        assert found[0] == version and {"model", "vocab", "meta"} <= set(found[1])
        assert orjson.loads(found[1]["meta"])["period"] == 2
        resumed = TPPLearner(client, settings)
        resumed.restore(found[1])
        again = resumed.ensure_model()
        assert (resumed.steps, resumed.period, resumed.events_in_period) == (learner.steps, 2, 50)
        assert resumed.vocab.names() == learner.vocab.names()
        assert again.periods_done == 2
        user_events = [e for e in events if e.user_id == events[0].user_id]
        user_seq = (await user_sequences(client, StateKeys(settings.key_prefix), {events[0].user_id: user_events}, 64))[
            events[0].user_id
        ]
        seq = encode_sequence(learner.vocab, user_seq)
        np.testing.assert_allclose(again.intensity_many([seq]), model.intensity_many([seq]), rtol=1e-5)
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
    # Only ingest + the TPP lineage, so the test measures these and stays fast.
    settings = isolated.model_copy(
        update={
            "dsl": isolated.dsl.model_copy(update={"enabled": False}),
            "memory": isolated.memory.model_copy(update={"enabled": False}),
        }
    )
    half = len(taobao) // 2
    users = {e.user_id for e in taobao[half:]}
    keys = StateKeys(settings.key_prefix)
    snap = SnapshotKeys(settings.key_prefix, "tpp")
    client = sync_redis.Redis.from_url(settings.redis_url)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, taobao[:half], progress=False)
        wait_for(lambda: client.get(snap.latest) is not None, 90, "a tpp snapshot", worker)
        # from the lineage's first snapshot on, ingest writes the propensity of every user it sees
        publish(settings, taobao[half:], progress=False)

        def all_users_have_propensities() -> bool:
            return all(v is not None for v in client.mget([keys.user_tpp(u) for u in sorted(users)]))

        wait_for(all_users_have_propensities, 75, "user_tpp for every user of the second half", worker)
        wait_for(
            lambda: (m := worker.metrics()) and m.get('driftrec_learner_events_total{learner="tpp"}') == len(taobao),
            60,
            "the tpp lineage to learn every event",
            worker,
        )
        wait_for(
            lambda: (
                orjson.loads(client.hget(snap.blob(int(cast(bytes, client.get(snap.latest)))), "offsets") or b"{}").get(
                    "events"
                )
                == len(taobao)
            ),
            30,
            "a tpp snapshot holding every event (idle publish)",
            worker,
        )
        version = int(cast(bytes, client.get(snap.latest)))
        assert set(client.hkeys(snap.blob(version))) >= {b"model", b"vocab", b"meta", b"offsets"}
        rec = orjson.loads(cast(bytes, client.get(keys.user_tpp(taobao[-1].user_id))))
        assert rec["n_types"] == settings.tpp.n_types and rec["version"] > 0 and rec["snapshot"] >= 1
        assert 0.0 < sum(rec["probs"].values()) <= 1.0 + 1e-9 and all(math.isfinite(p) for p in rec["probs"].values())
    finally:
        worker.stop()
        client.close()
