"""The TPP term's weight, learned online (``models/fusion.py``), and served from the snapshot."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis

from driftrec.models.fusion import TPPWeight, tpp_log_ratios, tpp_terms
from driftrec.serving.scorer import Scorer
from driftrec.storage.event_state import StateKeys
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from tests.test_serving import TS, catalog, make_settings, prefix, redis, snapshot_parts, tpp_payload  # noqa: F401


def test_log_ratio_and_term_by_hand() -> None:
    payload = tpp_payload({"c1": 0.5, "c2": 0.0}, ts=TS - 3600)
    f = tpp_log_ratios(payload, ["c1", "c2", "zz", None], TS, tau_s=3600)
    decay = math.exp(-1)
    np.testing.assert_allclose(f, [decay * math.log(2.0), decay * math.log(4 * 1e-12), 0.0, 0.0])
    np.testing.assert_allclose(
        tpp_terms(payload, ["c1", "c2"], TS, weight=0.5, tau_s=3600, clip=2.0), [0.5 * decay * math.log(2.0), -2.0]
    )


def _stream(informative: bool, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base_logit = rng.normal(0.0, 1.0, n)
    f = rng.normal(0.0, 1.0, n)
    z = base_logit + (1.0 * f if informative else 0.0)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(float)
    return base_logit, f, y


def test_weight_moves_toward_what_the_feature_is_worth() -> None:
    for informative, lo, hi in ((True, 0.7, 1.3), (False, -0.2, 0.2)):
        model = TPPWeight(w=0.5)
        b, f, y = _stream(informative)
        for k in range(0, len(y), 64):
            model.update(b[k : k + 64], f[k : k + 64], y[k : k + 64])
        assert lo < model.w < hi, (informative, model.w)
    # zero features (no propensity) teach nothing
    model = TPPWeight(w=0.5)
    model.update(np.zeros(10), np.zeros(10), np.ones(10))
    assert model.w == 0.5 and model.n_seen == 0
    again = TPPWeight.from_bytes(TPPWeight(w=-0.3, n_seen=7).to_bytes())
    assert again.w == -0.3 and again.n_seen == 7


def test_weight_stays_bounded_and_term_stays_clipped() -> None:
    model = TPPWeight(w=0.5, lr=10.0, max_abs_w=2.0, clip=2.0)
    for _ in range(200):
        model.update(np.full(8, -5.0), np.full(8, 0.5), np.ones(8))
    assert abs(model.w) <= 2.0
    assert np.all(np.abs(model.term(np.array([1e9, -1e9, 3.0]))) <= 2.0)


async def test_scorer_serves_the_learned_weight(redis: Redis, prefix: str) -> None:  # noqa: F811
    s = make_settings(prefix)
    parts = {**snapshot_parts(), "fusion": TPPWeight(w=-0.25).to_bytes()}
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), parts)
    probs = {"c0": 0.7, "c1": 0.1, "c2": 0.1, "c3": 0.1}
    await redis.set(StateKeys(prefix).user_tpp("u3"), tpp_payload(probs, ts=TS))
    items = [f"i{j}" for j in range(8)]
    scorer = Scorer(s, redis)
    assert await scorer.refresh()
    res = await scorer.score("u3", items, TS)
    cat = catalog()
    expected = {i: -0.25 * math.log(4 * probs[cat[i]]) for i in items}
    np.testing.assert_allclose(res.tpp, [expected[i] for i in res.item_ids], atol=1e-12)
    # switched off: the configured weight is served instead
    s2 = make_settings(prefix)
    s2.serving = s2.serving.model_copy(update={"learn_tpp_weight": False})
    scorer2 = Scorer(s2, redis)
    assert await scorer2.refresh()
    res2 = await scorer2.score("u3", items, TS)
    np.testing.assert_allclose(res2.tpp, [-expected[i] * 2.0 for i in res2.item_ids], atol=1e-12)
    await scorer.close()
    await scorer2.close()
    assert orjson.loads(parts["fusion"])["tpp_weight"] == -0.25


# ---- the error memory's λ ------------------------------------------------------------------
def test_memory_lambda_gradient_matches_finite_differences() -> None:
    from driftrec.models.fusion import MemoryLambda

    rng = np.random.default_rng(0)
    base, e_hat = rng.uniform(0.2, 0.8, 64), rng.normal(0, 0.1, 64)
    y = (rng.random(64) < 0.5).astype(float)

    def loss(lam: float) -> float:
        q = np.clip(base + lam * e_hat, 1e-4, 1 - 1e-4)
        return float(np.mean(-(y * np.log(q) + (1 - y) * np.log(1 - q))))

    m = MemoryLambda(lam=0.4)
    grad, n = m.gradient(base, e_hat, y)
    assert n == 64
    assert grad == pytest.approx((loss(0.4 + 1e-6) - loss(0.4 - 1e-6)) / 2e-6, rel=1e-5)
    m.update(base, e_hat, y)
    assert (m.lam - 0.4) * grad < 0  # a step against the gradient


def test_memory_lambda_follows_what_the_memory_is_worth() -> None:
    """λ falls toward 0 where ê is noise and climbs toward 1 where ê points at the label."""
    from driftrec.models.fusion import MemoryLambda

    rng = np.random.default_rng(1)
    noise, useful = MemoryLambda(lam=0.5), MemoryLambda(lam=0.5)
    for _ in range(300):
        base = np.full(200, 0.5)
        y = (rng.random(200) < 0.5).astype(float)
        noise.update(base, rng.normal(0, 0.2, 200), y)
        useful.update(base, 0.3 * (y - 0.5), y)
    assert noise.lam < 0.15 and useful.lam > 0.95
    assert 0.0 <= noise.lam <= 1.0 and useful.lam <= 1.0
    again = MemoryLambda.from_dict(useful.to_dict())
    assert again is not None and again.lam == useful.lam and MemoryLambda.from_dict({"tpp_weight": 1.0}) is None


async def test_scorer_loads_the_learned_memory_lambda(redis: Redis, prefix: str) -> None:  # noqa: F811
    from driftrec.models.fusion import MemoryLambda

    parts = {
        **snapshot_parts(),
        "fusion": orjson.dumps({**TPPWeight(w=0.1).to_dict(), **MemoryLambda(lam=0.2).to_dict()}),
    }
    await publish_snapshot(redis, SnapshotKeys(prefix, "dsl"), parts)
    learned = Scorer(make_settings(prefix), redis)
    off = make_settings(prefix)
    off.memory = off.memory.model_copy(update={"learn_lambda": False})
    configured = Scorer(off, redis)
    assert await learned.refresh() and await configured.refresh()
    assert learned.current is not None and learned.current.memory_lambda == 0.2
    assert learned.current.tpp_weight == 0.1
    assert configured.current is not None and configured.current.memory_lambda is None
    await learned.close()
    await configured.close()
