"""The fusion layer: FTRL math by hand, its Redis state under redelivery and a crash between
slots, the ingest writer's inputs against serving's, and the wide term in the served score (real
Redis, DB 4, uuid prefix)."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import session_code
from driftrec.models.served import MEMORY_FEATURE, MODEL_FEATURE, TPP_FEATURE, logit, sigmoid
from driftrec.models.wide import FTRLParams, WideFTRL, features, id_logits, layer_weights, offset_logit
from driftrec.serving.scorer import Scorer
from driftrec.storage.error_memory import ENTRY_BYTES, MemoryKeys
from driftrec.storage.event_state import StateKeys
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from driftrec.storage.wide import WideKeys, WideStore, WideUpdate, pack, unpack
from driftrec.streams.fusion_writer import FusionWriter
from tests.test_serving import TS, catalog, make_settings, prefix, redis, set_weights, snapshot_parts  # noqa: F401


# ---- the model, by hand ---------------------------------------------------------------------
def test_one_ftrl_step_by_hand() -> None:
    ftrl = WideFTRL(FTRLParams(alpha=0.5, beta=1.0, l1=0.0, l2=1.0))
    step = ftrl.learn_one("u", "i", "c", label=1, offset=0.0)
    assert step.prediction == 0.5  # no weights, offset 0
    # g = 0.5 - 1 = -0.5 on each one-hot feature; w was 0, so Δz = g and Δn = g²; the model
    # feature's value is the offset, 0 here, so it gets no step
    assert set(step.deltas) == set(features("u", "i", "c"))
    for dz, dn in step.deltas.values():
        assert (dz, dn) == (-0.5, 0.25)
    # w = -z / ((β + √n)/α + L2) = 0.5 / ((1 + 0.5)/0.5 + 1) = 0.125 per feature, 5 features
    assert ftrl.weight("u:u") == pytest.approx(0.125)
    assert ftrl.logit_one("u", "i", "c") == pytest.approx(5 * 0.125)
    # a second step: σ = (√(n + g²) − √n)/α enters Δz
    p = 1 / (1 + math.exp(-0.625))
    step2 = ftrl.learn_one("u", "i", "c", label=0, offset=0.0)
    assert step2.prediction == pytest.approx(p)
    sigma = (math.sqrt(0.25 + p * p) - 0.5) / 0.5
    assert step2.deltas["u:u"] == pytest.approx((p - sigma * 0.125, p * p))


def test_l1_zeroes_small_weights_and_vector_weights_agree() -> None:
    params = FTRLParams(alpha=0.3, beta=1.0, l1=1.0, l2=0.5)
    z = np.array([-3.0, -0.5, 0.0, 0.9, 2.5])
    n = np.array([4.0, 1.0, 0.0, 9.0, 0.25])
    vec = params.weights(z, n)
    assert vec[1] == vec[2] == vec[3] == 0.0  # |z| ≤ L1
    np.testing.assert_allclose(vec, [params.weight(a, b) for a, b in zip(z, n)], atol=1e-15)


def test_the_model_weight_learns_how_far_to_trust_the_offset() -> None:
    """An over-confident offset (logit 3 on events that are positive half of the time) drives the
    model feature's weight negative: the wide part learns to shrink the DSL logit."""
    ftrl = WideFTRL()
    for k in range(400):
        ftrl.learn_one(f"u{k}", f"i{k}", None, label=k % 2, dsl_logit=3.0)
    assert ftrl.weight(MODEL_FEATURE) < -0.3


def test_term_weights_learn_what_each_term_is_worth_on_top_of_the_offset() -> None:
    """Labels follow the memory's input and not the TPP's: the memory's weight grows, the TPP's
    stays near 0; an offset that already holds the memory at full weight leaves less to learn."""
    rng = np.random.default_rng(1)
    alone, on_fused = WideFTRL(), WideFTRL()
    for k in range(3000):
        e, t = float(rng.normal()), float(rng.normal())
        y = int(rng.random() < 1 / (1 + math.exp(-2 * e)))
        terms = {MEMORY_FEATURE: e, TPP_FEATURE: t}
        alone.learn_one(f"u{k}", f"i{k}", None, y, 0.0, terms)
        on_fused.learn_one(f"u{k}", f"i{k}", None, y, 0.0, terms, offset=2 * e)
    assert alone.weight(MEMORY_FEATURE) > 1.0 and abs(alone.weight(TPP_FEATURE)) < 0.2
    assert abs(on_fused.weight(MEMORY_FEATURE)) < 0.3


def test_served_terms_equal_the_models_logit_beyond_the_offset() -> None:
    rng = np.random.default_rng(0)
    ftrl = WideFTRL()
    for k in range(300):
        ftrl.learn_one(f"u{k % 5}", f"i{k % 11}", f"c{k % 3}", int(rng.integers(2)), float(rng.normal()))
    items, cats = [f"i{j}" for j in range(12)], [f"c{j % 3}" if j % 4 else None for j in range(12)]
    offsets = rng.normal(size=12)
    weight = layer_weights(ftrl.params, ftrl.state)
    got = weight[MODEL_FEATURE] * offsets + id_logits(weight, "u2", items, cats)
    want = [ftrl.logit_one("u2", i, c, float(o)) - float(o) for i, c, o in zip(items, cats, offsets)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_packed_state_round_trips_and_refuses_other_lengths() -> None:
    assert unpack(pack(-1.25, 3.5)) == (-1.25, 3.5)
    assert unpack(None) == (0.0, 0.0)
    with pytest.raises(ValueError, match="16 bytes"):
        unpack(b"12345")


# ---- in Redis --------------------------------------------------------------------------------
def _events(n: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    cat = catalog()
    out = []
    for k in range(n):
        item = f"i{int(rng.integers(20))}"
        out.append(
            Event(
                event_id=f"w{seed}-{k}",
                user_id=f"u{int(rng.integers(3))}",
                item_id=item,
                category=cat[item],
                kind="rating",
                label=1 if rng.integers(2) else 0,
                ts=TS + k,
            )
        )
    return out


async def _state(client: Redis, key_prefix: str) -> dict[bytes, tuple[float, float]]:
    keys = [k async for k in client.scan_iter(match=f"{key_prefix}:*:wide:*", count=1000)]
    values = await client.mget(keys) if keys else []
    return {k: unpack(cast(bytes, v)) for k, v in zip(keys, values)}


async def test_ingest_learns_like_the_model_in_process_and_redelivery_changes_nothing(
    redis: Redis,  # noqa: F811
    prefix: str,  # noqa: F811
) -> None:
    s = make_settings(prefix)  # the DSL and the ids alone: the term inputs are 0 and learn nothing
    s.memory = s.memory.model_copy(update={"enabled": False})
    s.tpp = s.tpp.model_copy(update={"enabled": False})
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    writer = FusionWriter(redis, s)
    events = _events(40)
    assert await writer.write(events[:25]) == 25
    assert await writer.write(events[25:]) == 15
    first = await _state(redis, prefix)
    # the same events in process: one FTRL over the same offsets, in the same order
    model = SparseScorer.from_bytes(snapshot_parts()["model"])
    probs, _ = model.predict_with_hidden([e.to_interaction() for e in events])
    ftrl = WideFTRL(writer.params)
    for e, off in zip(events, offset_logit(probs, s.serving.eps)):
        ftrl.learn_one(e.user_id, e.item_id, e.category, int(e.label or 0), float(off))
    keys = WideKeys(prefix)
    want = {
        keys.feature(e.user_id, f).encode(): ftrl.state[f]
        for e in events
        for f in features(e.user_id, e.item_id, e.category) + [MODEL_FEATURE]
    }
    assert set(first) == set(want)
    for k, zn in want.items():  # the DSL's float32 sums differ with the batch's shape (~1e-8)
        assert first[k] == pytest.approx(zn, rel=1e-7, abs=1e-9)
    # redelivered batches (whole, and mixed with one new event) learn only what is new
    assert await writer.write(events) == 0
    extra = _events(1, seed=7)
    assert await writer.write(events[:10] + extra) == 1
    after = await _state(redis, prefix)
    ftrl.learn_one(
        extra[0].user_id,
        extra[0].item_id,
        extra[0].category,
        int(extra[0].label or 0),
        float(offset_logit(model.predict_with_hidden([extra[0].to_interaction()])[0], s.serving.eps)[0]),
    )
    for k, zn in after.items():
        f = k.decode().split(":wide:", 1)[1]
        assert zn == pytest.approx(ftrl.state[f], rel=1e-7, abs=1e-9)


async def test_an_event_that_reached_only_its_user_slot_is_completed_once(
    redis: Redis,  # noqa: F811
    prefix: str,  # noqa: F811
) -> None:
    """A crash between the slots of one event: the redelivery adds it where it is missing only."""
    s = make_settings(prefix)
    store = WideStore(redis, prefix, 3600)
    e = _events(1, seed=3)[0]
    feats = [*features(e.user_id, e.item_id, e.category), MODEL_FEATURE]
    user_feats = [f for f in feats if f.startswith(("u:", "uc:"))]
    partial = WideUpdate(e.event_id, e.user_id, {f: (-0.5, 0.25) for f in user_feats}, user_feats)
    assert await store.add([partial]) == 1
    assert await store.applied([(e.event_id, e.user_id, feats)]) == set()  # not every slot has it
    writer = FusionWriter(redis, s)
    assert await writer.write([e]) == 0  # new nowhere that counts: its user slot had it
    state = await _state(redis, prefix)
    keys = WideKeys(prefix)
    assert state[keys.feature(e.user_id, f"u:{e.user_id}").encode()] == (-0.5, 0.25)  # not added twice
    assert state[keys.feature(e.user_id, f"i:{e.item_id}").encode()][1] > 0  # completed
    assert await store.applied([(e.event_id, e.user_id, feats)]) == {e.event_id}
    again = dict(state)
    await writer.write([e])
    assert await _state(redis, prefix) == again


async def test_the_served_score_adds_the_wide_term(redis: Redis, prefix: str) -> None:  # noqa: F811
    s = make_settings(prefix)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    events = _events(60)
    await FusionWriter(redis, s).write(events)
    scorer = Scorer(s, redis)
    await scorer.refresh()
    items = [f"i{j}" for j in range(20)] + ["never-seen"]
    res = await scorer.score("u1", items, ts=TS + 100)
    order = [items.index(i) for i in res.item_ids]
    stored = await _state(redis, prefix)
    values = {k.decode().split(":wide:", 1)[1]: zn for k, zn in stored.items() if b"{u:u1}" in k or b"{is:" in k}
    cats = [catalog().get(i) for i in items]
    weight = layer_weights(scorer.wide_params, values)
    want = weight[MODEL_FEATURE] * offset_logit(res.base[np.argsort(order)], 1e-4) + id_logits(
        weight, "u1", items, cats
    )
    np.testing.assert_allclose(res.wide, np.asarray(want)[order], atol=1e-12)
    assert (res.wide != 0).all()  # the bias and the model weight reach even an unseen item
    eps = s.serving.eps
    np.testing.assert_allclose(
        res.score, sigmoid(logit(res.base, eps) + res.compensation + res.tpp + res.wide), atol=1e-15
    )
    off = make_settings(prefix)
    off.wide = off.wide.model_copy(update={"enabled": False})
    res_off = await Scorer(off, redis).score("u1", items, ts=TS + 100)
    np.testing.assert_allclose(  # the ids are not read: the weight on the DSL logit alone
        res_off.wide, weight[MODEL_FEATURE] * offset_logit(res_off.base, 1e-4), atol=1e-12
    )


async def test_ingest_sees_the_score_serving_served(redis: Redis, prefix: str) -> None:  # noqa: F811
    """What ingest takes as served for an event -- the score before the memories' correction, the
    error it writes into the memories -- is what the scorer served for the same user, item and
    time (DSL, ids, TPP and both memories at their learned weights), so the memory corrects what
    was served and the layer learns from it."""
    from tests.test_serving import tpp_payload, write_memory

    s = make_settings(prefix)
    await set_weights(redis, s, memory=0.6, session=0.4, tpp=0.5, model=0.3)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    items = [f"i{j}" for j in range(12)]
    await write_memory(redis, s, "u3", items * 2, [1, 0, 1] * 8)
    await redis.set(StateKeys(prefix).user_tpp("u3"), tpp_payload({"c0": 0.7, "c1": 0.1, "c2": 0.1, "c3": 0.1}))
    await FusionWriter(redis, s).write(_events(30, seed=4))  # the ids learn something first
    scorer = Scorer(s, redis)
    await scorer.refresh()
    item, cat = "i4", catalog()["i4"]
    at = TS + 500
    res = await scorer.score("u3", [item], at)
    assert res.compensation[0] != 0 and res.tpp[0] != 0 and res.wide[0] != 0  # every term takes part
    eps = s.serving.eps
    served_pre = sigmoid(logit(res.base, eps) + res.wide + res.tpp)[0]
    event = Event(event_id="probe", user_id="u3", item_id=item, category=cat, kind="rating", label=1, ts=at)
    before = await _state(redis, prefix)
    assert await FusionWriter(redis, s).write([event]) == 1
    keys = MemoryKeys.from_settings(prefix, s.dsl.generation, s.memory.n_shards)
    raw = cast(bytes, await redis.get(keys.session_bucket(session_code("u3", cat))[1]))
    entries = np.frombuffer(raw, dtype="<f8").reshape(-1, 3)
    assert len(raw) % ENTRY_BYTES == 0
    (row,) = entries[entries[:, 0] == at]
    assert row[1] == 1.0
    # serving folds the user into the first layer, ingest scores a batch: float32 sums in another order
    assert row[2] == pytest.approx(served_pre, abs=1e-6)
    after = await _state(redis, prefix)
    memory_key = WideKeys(prefix).feature("", MEMORY_FEATURE).encode()
    assert after[memory_key] != before[memory_key]  # the layer stepped its memory weight on this event


async def test_the_layer_serves_the_dsl_until_it_learns(redis: Redis, prefix: str) -> None:  # noqa: F811
    """Nothing learned: every weight is 0, so the score is ``base`` and no term is made up."""
    from tests.test_serving import tpp_payload, write_memory

    s = make_settings(prefix)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    items = [f"i{j}" for j in range(12)]
    await write_memory(redis, s, "u3", items, [1] * 12)
    await redis.set(StateKeys(prefix).user_tpp("u3"), tpp_payload({"c0": 0.7, "c1": 0.1, "c2": 0.1, "c3": 0.1}))
    scorer = Scorer(s, redis)
    await scorer.refresh()
    res = await scorer.score("u3", items, TS)
    assert (res.compensation == 0).all() and (res.tpp == 0).all() and (res.wide == 0).all()
    np.testing.assert_allclose(res.score, np.clip(res.base, s.serving.eps, 1 - s.serving.eps), atol=1e-12)


def test_term_weights_learn_at_their_own_rate_and_every_reader_agrees() -> None:
    slow, fast = WideFTRL(FTRLParams(term_alpha=0.05)), WideFTRL(FTRLParams())
    for k in range(200):
        for model in (slow, fast):
            model.learn_one(f"u{k}", "i", "c", label=k % 3 == 0, dsl_logit=0.5, terms={MEMORY_FEATURE: 1.0})
    assert 0 < abs(slow.weight(MEMORY_FEATURE)) < abs(fast.weight(MEMORY_FEATURE))
    weight = layer_weights(slow.params, slow.state)
    for f in slow.state:
        assert weight[f] == pytest.approx(slow.weight(f), abs=1e-15)


def test_a_stored_state_no_step_could_make_weighs_nothing() -> None:
    values = {MEMORY_FEATURE: (float("nan"), 1.0), "i:x": (-2.0, -4.0), "i:y": (float("inf"), 0.0), "b": (-1.0, 0.0)}
    weight = layer_weights(FTRLParams(), values)
    assert weight[MEMORY_FEATURE] == 0.0 and weight["i:x"] == 0.0 and weight["i:y"] == 0.0
    assert weight["b"] == pytest.approx(1.0 / 3.0)
