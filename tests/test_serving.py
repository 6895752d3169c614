"""The scoring core against real Redis (DB 4, a uuid prefix per test, keys deleted after).

Covers: the fusion rule on hand-worked numbers, bounds for extreme inputs, each contribution
switched off, cold start and unknown ids, sorting and de-duplication, hot reload without a
restart, and exactly one Redis round trip per request.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool

from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.dsl import DSLRecommender, SparseScorer
from driftrec.models.error_memory import RandomProjectionLSH
from driftrec.models.fusion import tpp_log_ratios
from driftrec.models.served import MEMORY_FEATURE, MODEL_FEATURE, SESSION_FEATURE, TPP_FEATURE, logit, sigmoid
from driftrec.models.wide import FTRLParams
from driftrec.serving.app import create_app
from driftrec.serving.scorer import Scorer
from driftrec.storage.error_memory import MemoryKeys, read_estimates, write_errors, write_session_errors
from driftrec.storage.event_state import StateKeys
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from driftrec.storage.wide import WideKeys, pack

REDIS_URL = "redis://127.0.0.1:6379/4"
N_ITEMS = 60
CATEGORIES = ["c0", "c1", "c2", "c3"]
TS = 1_700_000_000.0


def catalog() -> dict[str, str]:
    return {f"i{j}": CATEGORIES[j % len(CATEGORIES)] for j in range(N_ITEMS)}


@lru_cache(maxsize=2)
def model_blob(steps: int = 4) -> bytes:
    """A small trained DSL snapshot, built once per session (torch start-up dominates)."""
    model = DSLRecommender(n_rows=1024, dim=8, hidden=8, seed=0)
    rng = np.random.default_rng(0)
    cat = catalog()
    for _ in range(steps):
        batch = []
        for _ in range(200):
            u, i = int(rng.integers(20)), int(rng.integers(N_ITEMS))
            batch.append(Interaction(f"u{u}", f"i{i}", TS, label=int((u + i) % 3 == 0), category=cat[f"i{i}"]))
        model.learn_many(batch)
    return model.to_bytes()


def snapshot_parts(steps: int = 4) -> dict[str, bytes]:
    return {"model": model_blob(steps), "catalog": orjson.dumps(catalog())}


def make_settings(prefix: str, redis_url: str = REDIS_URL, **serving: object) -> Settings:
    s = Settings(redis_url=redis_url, key_prefix=prefix)
    s.serving = s.serving.model_copy(update={"reload_every_s": 0.0, **serving})
    return s


async def set_weights(
    redis: Redis, s: Settings, memory: float = 0.5, session: float = 0.5, tpp: float = 0.5, model: float = 0.0
) -> None:
    """Store the fusion layer's state so its term weights are these (all start at 0 and are
    learned at ingest), so every term shows in a score before any weight has been learned."""
    p = FTRLParams(**s.wide.ftrl_params())
    scale = p.beta / p.alpha + p.l2  # the FTRL denominator at n = 0: weight = -z / scale
    keys = WideKeys(s.key_prefix)
    for feature, w in (
        (MODEL_FEATURE, model),
        (MEMORY_FEATURE, memory),
        (SESSION_FEATURE, session),
        (TPP_FEATURE, tpp),
    ):
        await redis.set(keys.feature("", feature), pack(-w * scale, 0.0))


def tpp_terms(payload: bytes, cats: list[str | None], now: float, weight: float, tau_s: float, clip: float):
    """The TPP term as served: the clipped log ratio at its weight."""
    return weight * np.clip(tpp_log_ratios(payload, cats, now, tau_s=tau_s), -clip, clip)


def with_enabled(s: Settings, dsl: bool = True, memory: bool = True, tpp: bool = True) -> Settings:
    out = s.model_copy()
    out.dsl = s.dsl.model_copy(update={"enabled": dsl})
    out.memory = s.memory.model_copy(update={"enabled": memory})
    out.tpp = s.tpp.model_copy(update={"enabled": tpp})
    return out


def tpp_payload(probs: dict[str, float], ts: float = TS, n_types: int = 4) -> bytes:
    return orjson.dumps({"ts": ts, "version": 1, "probs": probs, "n_types": n_types})


async def write_memory(
    redis: Redis, s: Settings, user: str, items: list[str], labels: list[int], ids: str = "e"
) -> None:
    """Errors of (user, item) events as the worker would write them for the published model, into
    both memories (event ids ``<ids><k>``)."""
    scorer = SparseScorer.from_bytes(model_blob())
    cat = catalog()
    xs = [
        Interaction(user, i, TS - 10, label=y, category=cat.get(i), event_id=f"{ids}{k}")
        for k, (i, y) in enumerate(zip(items, labels))
    ]
    probs, hidden = scorer.predict_with_hidden(xs)
    keys, lsh = lsh_memory(s, scorer.hidden)
    await write_errors(redis, keys, lsh, xs, probs, hidden, capacity=s.memory.bucket_capacity)
    session_keys = MemoryKeys.from_settings(s.key_prefix, s.dsl.generation, s.memory.n_shards)
    await write_session_errors(redis, session_keys, xs, probs, capacity=s.memory.session_capacity)


def lsh_memory(s: Settings, dim: int, key_version: int = 1) -> tuple[MemoryKeys, RandomProjectionLSH]:
    """The LSH memory's keys and hashing under key snapshot ``key_version``: the first snapshot
    published under a fresh prefix names no key, so it is its own (``storage/served_memory.py``)."""
    m = s.memory
    lsh = RandomProjectionLSH(dim=dim, n_tables=m.n_tables, n_bits=m.n_bits, seed=m.seed, version=key_version)
    return MemoryKeys(s.key_prefix, key_version, m.n_shards, space="k"), lsh


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    await client.ping()
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    name = f"drtest-serve-{uuid.uuid4().hex}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await redis.unlink(*keys)


# ---- the fusion rule, by hand ---------------------------------------------------------------
def test_fusion_rule_hand_worked() -> None:
    # tpp: one tau of age → decay e^-1; K=4, p=0.5 → ln 2
    term = tpp_terms(
        tpp_payload({"c1": 0.5, "c2": 0.0}, ts=TS - 3600),
        ["c1", "c2", "zz", None],
        TS,
        weight=0.5,
        tau_s=3600.0,
        clip=2.0,
    )
    assert term[0] == pytest.approx(0.5 * math.exp(-1) * math.log(2.0), abs=1e-12)
    assert term[1] == -1.0  # p = 0: the clip bounds ln 0 (at unit weight), then the weight
    assert term[2] == 0.0 and term[3] == 0.0  # unknown / missing category
    # a request older than the user's last event is not "un-decayed" beyond 1
    assert tpp_terms(tpp_payload({"c1": 0.5}, ts=TS + 100), ["c1"], TS, weight=0.5, tau_s=3600, clip=2)[
        0
    ] == pytest.approx(0.5 * math.log(2.0))
    # a uniform propensity (K·p = 1) says nothing
    assert tpp_terms(tpp_payload({"c1": 0.25}), ["c1"], TS, weight=1.0, tau_s=3600, clip=2)[0] == 0.0


@hsettings(max_examples=200, deadline=None)
@given(base=st.floats(0, 1), comp=st.floats(-1e3, 1e3), tpp=st.floats(-1e6, 1e6), eps=st.sampled_from([1e-12, 1e-4]))
def test_score_is_always_a_probability(base: float, comp: float, tpp: float, eps: float) -> None:
    s = sigmoid(logit(np.array([base]), eps) + comp + tpp)[0]
    assert 0.0 <= s <= 1.0 and math.isfinite(s)


@hsettings(max_examples=100, deadline=None)
@given(
    p=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.text(max_size=3)),
    k=st.integers(1, 10**9),
    w=st.floats(-1e3, 1e3),
    age=st.floats(-1e9, 1e9),
)
@example(p=6.4789906289525375e302, k=277465, w=1.0, age=44708.0)  # k·p overflowed, decay underflowed: NaN
def test_tpp_term_is_bounded_for_any_payload(p: object, k: int, w: float, age: float) -> None:
    payload = (
        orjson.dumps({"ts": TS - age, "probs": {"c1": p}, "n_types": k}, option=orjson.OPT_SERIALIZE_NUMPY)
        if not (isinstance(p, float) and not math.isfinite(p))
        else orjson.dumps({"ts": TS, "probs": {"c1": None}})
    )
    term = tpp_terms(payload, ["c1"], TS, weight=w, tau_s=60.0, clip=2.0)
    assert np.isfinite(term).all() and (np.abs(term) <= 2.0 * abs(w)).all()


# ---- the scorer end to end against Redis ----------------------------------------------------
async def test_components_match_their_sources(redis: Redis, prefix: str) -> None:
    s = make_settings(prefix)
    s.memory = s.memory.model_copy(update={"session_capacity": 0})  # the LSH memory alone here
    await set_weights(redis, s, memory=0.7, tpp=0.5, model=0.2)
    version = await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    items = [f"i{j}" for j in range(20)]
    await write_memory(redis, s, "u3", items * 2, [1] * 20 + [1] * 20)
    await redis.set(
        StateKeys(prefix).user_tpp("u3"), tpp_payload({"c0": 0.7, "c1": 0.1, "c2": 0.1, "c3": 0.1}, ts=TS - 600)
    )
    scorer = Scorer(s, redis)
    assert await scorer.refresh()
    res = await scorer.score("u3", items, TS)
    assert res.model_version == version
    got = {i: k for k, i in enumerate(res.item_ids)}
    order = [got[i] for i in items]
    model = SparseScorer.from_bytes(model_blob())
    cats = [catalog()[i] for i in items]
    probs, hidden = model.score_candidates("u3", items, cats)
    eps = s.serving.eps
    np.testing.assert_allclose(res.base[order], probs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.wide[order], 0.2 * logit(probs, eps), rtol=0, atol=1e-9)  # no id weights yet
    decay = math.exp(-600 / s.serving.tpp_tau_s)
    lut = {c: 0.5 * decay * math.log(4 * p) for c, p in {"c0": 0.7, "c1": 0.1, "c2": 0.1, "c3": 0.1}.items()}
    np.testing.assert_allclose(res.tpp[order], [lut[c] for c in cats], rtol=0, atol=1e-9)
    # the memory corrects the score served before it (ReLoop2), at its learned weight
    pre = sigmoid(logit(probs, eps) + res.wide[order] + res.tpp[order])
    keys, lsh = lsh_memory(s, model.hidden, version)
    e_hat, _ = await read_estimates(redis, keys, lsh, hidden, pre, gamma=s.memory.gamma, prior=s.memory.prior)
    expected = 0.7 * (logit(pre + e_hat, eps) - logit(pre, eps))
    np.testing.assert_allclose(res.compensation[order], expected, rtol=0, atol=1e-9)
    assert (res.compensation > 0).all()  # every label was 1: the memory pushes up
    # the parts add up to the score
    np.testing.assert_allclose(
        res.score, sigmoid(logit(res.base, eps) + res.compensation + res.tpp + res.wide), atol=1e-12
    )
    assert list(res.score) == sorted(res.score, reverse=True)
    await scorer.close()


async def test_extreme_state_still_yields_probabilities(redis: Redis, prefix: str) -> None:
    s = make_settings(prefix, tpp_clip=50.0)
    await set_weights(redis, s, memory=1e6, session=-1e6, tpp=1e6, model=1e3)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    await redis.set(StateKeys(prefix).user_tpp("u1"), tpp_payload({"c0": 1.0, "c1": 0.0, "c2": 1e-300}, n_types=10**6))
    await redis.set(StateKeys(prefix).user_tpp("u2"), b"not json at all")
    await write_memory(redis, s, "u1", ["i0", "i1"] * 5, [1, 0] * 5)
    scorer = Scorer(s, redis)
    await scorer.refresh()
    for user in ("u1", "u2", "nobody"):
        res = await scorer.score(user, [f"i{j}" for j in range(N_ITEMS)] + ["never-seen"], TS)
        assert ((res.score >= 0) & (res.score <= 1)).all() and np.isfinite(res.score).all()
        assert np.isfinite(res.compensation).all() and np.isfinite(res.tpp).all() and np.isfinite(res.wide).all()
    assert scorer.stats.tpp_parse_errors == 1  # u2's garbage was counted, not raised
    await scorer.close()


@pytest.mark.parametrize(
    "dsl,memory,tpp",
    [(False, True, True), (True, False, True), (True, True, False), (False, False, False), (False, False, True)],
)
async def test_each_contribution_can_be_switched_off(
    redis: Redis, prefix: str, dsl: bool, memory: bool, tpp: bool
) -> None:
    s = with_enabled(make_settings(prefix), dsl, memory, tpp)
    await set_weights(redis, s)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    await write_memory(redis, s, "u1", [f"i{j}" for j in range(10)], [1] * 10)
    await redis.set(StateKeys(prefix).user_tpp("u1"), tpp_payload({"c0": 0.9, "c1": 0.05, "c2": 0.05}))
    scorer = Scorer(s, redis)
    await scorer.refresh()
    res = await scorer.score("u1", [f"i{j}" for j in range(10)], TS)
    assert (res.base == s.serving.cold_start_base).all() != dsl
    assert (res.compensation != 0).any() == memory
    assert (res.tpp != 0).any() == tpp
    assert len(res.item_ids) == 10 and ((res.score > 0) & (res.score < 1)).all()
    if tpp and not dsl and not memory:  # TPP alone still ranks: the favoured category comes first
        assert catalog()[res.item_ids[0]] == "c0"
    await scorer.close()


async def test_cold_start_unknown_ids_sorting_and_duplicates(redis: Redis, prefix: str) -> None:
    s = make_settings(prefix)
    scorer = Scorer(s, redis)
    assert not await scorer.refresh()  # nothing published yet
    res = await scorer.score("new-user", ["x", "y", "x"], None)
    assert res.model_version is None and res.item_ids == ["x", "y"]
    assert (res.base == s.serving.cold_start_base).all() and (res.score == 0.5).all()
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    await scorer.refresh()
    cands = ["never-seen", "i1", "i2", "i1", "other-unknown"] + [f"i{j}" for j in range(30)]
    res = await scorer.score("brand-new-user", cands, TS)
    assert sorted(res.item_ids) == sorted(dict.fromkeys(cands))
    assert list(res.score) == sorted(res.score, reverse=True)
    body = orjson.loads(res.to_json())
    assert [x["item_id"] for x in body["items"]] == res.item_ids
    assert set(body["items"][0]) == {"item_id", "score", "base", "compensation", "tpp", "wide"}
    await scorer.close()


async def _wait_until(predicate, what: str, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_hot_reload_without_restart(redis: Redis, prefix: str) -> None:
    s = make_settings(prefix, reload_every_s=0.05)
    keys = SnapshotKeys(prefix, "dsl")
    v1 = await publish_snapshot(redis, keys, snapshot_parts(4))
    app = create_app(s)  # the app owns its scorer: background reload runs in its lifespan
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client,
    ):
        body = {"user_id": "u1", "candidates": ["i1", "i2", "i3"], "ts": TS}
        first = (await client.post("/v1/score", json=body)).json()
        assert first["model_version"] == v1
        v2 = await publish_snapshot(redis, keys, snapshot_parts(6))

        async def reloaded() -> bool:
            return (await client.get("/healthz")).json()["model_version"] == v2

        await _wait_until(reloaded, "the v2 snapshot to be picked up")
        second = (await client.post("/v1/score", json=body)).json()
        assert second["model_version"] == v2
        assert [x["base"] for x in second["items"]] != [x["base"] for x in first["items"]]
        metrics = (await client.get("/metrics")).text
        assert f"driftrec_serving_snapshot_version {float(v2)}" in metrics
        assert "driftrec_serving_snapshot_reloads_total 2.0" in metrics


class CountingConnection(Connection):
    """A real connection that counts how often it writes to the socket (= round trips)."""

    sends = 0

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def test_one_redis_round_trip_per_request(redis: Redis, prefix: str) -> None:
    s = make_settings(prefix)
    await set_weights(redis, s)
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), snapshot_parts())
    await write_memory(redis, s, "u1", [f"i{j}" for j in range(N_ITEMS)], [1, 0] * (N_ITEMS // 2))
    await redis.set(StateKeys(prefix).user_tpp("u1"), tpp_payload({"c0": 0.9, "c1": 0.1}))
    counted = Redis(connection_pool=ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection))
    scorer = Scorer(s, counted)
    await scorer.refresh()
    await counted.ping()
    for n in (1, 100, N_ITEMS):
        before = CountingConnection.sends
        res = await scorer.score("u1", [f"i{j % N_ITEMS}" if j < N_ITEMS else f"new{j}" for j in range(n)], TS)
        assert CountingConnection.sends - before == 1, f"{n} candidates"
        assert (res.compensation != 0).any() and (res.tpp != 0).any()
    await scorer.close()
    await counted.aclose()
