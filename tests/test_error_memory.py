"""Unit math of the ReLoop2 error memory (no Redis): hashing, estimate, compensation, FIFO."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from driftrec.models.error_memory import (
    ErrorMemory,
    RandomProjectionLSH,
    ServedSample,
    compensate,
    compensation_delta,
    errors,
    estimate_error,
    fifo_keep,
    recency_weights,
)

REPO = Path(__file__).resolve().parents[1]


def served(h: np.ndarray, y: int | None, p: float, ts: float = 0.0, event_id: str = "") -> ServedSample:
    return ServedSample(hidden=h, served=p, label=y, ts=ts, event_id=event_id)


@pytest.mark.integration  # a second process
def test_codes_are_identical_across_instances_and_processes() -> None:
    rng = np.random.default_rng(1)
    h = rng.standard_normal((20, 12)).astype(np.float32)
    a = RandomProjectionLSH(12, 4, 10, seed=7).codes(h)
    b = RandomProjectionLSH(12, 4, 10, seed=7).codes(h)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (20, 4)
    assert a.min() >= 0 and a.max() < 1 << 10
    script = (
        "import json, numpy as np; from driftrec.models.error_memory import RandomProjectionLSH;"
        f"h = np.array(json.loads({json.dumps(json.dumps(h.tolist()))}), dtype=np.float32);"
        "print(json.dumps(RandomProjectionLSH(12, 4, 10, seed=7).codes(h).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    np.testing.assert_array_equal(np.array(json.loads(out.stdout)), a)
    assert not np.array_equal(RandomProjectionLSH(12, 4, 10, seed=8).codes(h), a)


def test_similar_vectors_collide_more_than_dissimilar_ones() -> None:
    rng = np.random.default_rng(2)
    lsh = RandomProjectionLSH(16, 8, 8, seed=0)
    base = rng.standard_normal((300, 16))
    near = base + 0.1 * rng.standard_normal((300, 16))
    far = rng.standard_normal((300, 16))
    c_base, c_near, c_far = lsh.codes(base), lsh.codes(near), lsh.codes(far)
    near_rate = (c_base == c_near).mean()
    far_rate = (c_base == c_far).mean()
    assert near_rate > 3 * far_rate
    assert near_rate > 0.5


def test_error_and_estimate_on_hand_worked_cases() -> None:
    np.testing.assert_allclose(errors([1, 0], np.array([0.8, 0.3])), [0.2, -0.3])
    y, served, ts = np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.1, 0.8]), np.zeros(3)
    # gamma 0, the neighbours' own errors, prior 1: (0.5 - 0.1 + 0.2) / (3 + 1) = 0.15
    e_hat, weight = estimate_error(y, served, ts, 0.4, gamma=0.0, prior=1.0)
    assert e_hat == pytest.approx(0.15) and weight == 3.0
    # gamma 1, their labels against the query's prediction 0.4: (2 - 3 * 0.4) / 4 = 0.2
    assert estimate_error(y, served, ts, 0.4, gamma=1.0, prior=1.0)[0] == pytest.approx(0.2)
    # gamma 0.5 mixes both: (2 - 0.5 * 1.2 - 0.5 * 1.4) / 4 = 0.175
    assert estimate_error(y, served, ts, 0.4, gamma=0.5, prior=1.0)[0] == pytest.approx(0.175)
    assert estimate_error(np.array([]), np.array([]), np.array([]), 0.4) == (0.0, 0.0)
    # an entry found in two tables counts twice: gamma 0 (0.4 + 0.4 - 0.2) / 3, gamma 1 (2 - 1.5) / 3
    y2, p2 = np.array([1.0, 1.0, 0.0]), np.array([0.6, 0.6, 0.2])
    assert estimate_error(y2, p2, np.zeros(3), 0.5, gamma=0.0, prior=0.0)[0] == pytest.approx(0.2)
    assert estimate_error(y2, p2, np.zeros(3), 0.5, gamma=1.0, prior=0.0)[0] == pytest.approx(1 / 6)
    # recency: one half-life old → weight 1/2
    w = recency_weights(np.array([100.0, 90.0]), now=100.0, half_life_s=10.0)
    np.testing.assert_allclose(w, [1.0, 0.5])
    y3, p3, ts3 = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([100.0, 90.0])
    # gamma 0: (1 * 1 + 0.5 * (-1)) / 1.5 = 1/3; gamma 1, query 0.5: (0.5 - 0.5 * 0.5) / 1.5 = 1/6
    kw = dict(prior=0.0, now=100.0, half_life_s=10.0)
    assert estimate_error(y3, p3, ts3, 0.5, gamma=0.0, **kw)[0] == pytest.approx(1 / 3)
    assert estimate_error(y3, p3, ts3, 0.5, gamma=1.0, **kw)[0] == pytest.approx(1 / 6)


def test_gamma_one_does_not_correct_what_the_model_has_learned() -> None:
    """Stored errors of an older model go stale; gamma = 1 compares labels with today's prediction."""
    mem0, h = _one_bucket_memory(capacity=8, gamma=0.0)
    mem1, _ = _one_bucket_memory(capacity=8, gamma=1.0)
    for i in range(4):  # served 0.2 while the truth was 1: errors of +0.8
        for mem in (mem0, mem1):
            mem.learn_one(served(h, 1, 0.2, ts=float(i), event_id=f"e{i}"))
    # the model has since learned: it now predicts 0.9 for this region
    assert mem0.predict_one(served(h, None, 0.9)) == pytest.approx(min(0.9 + 0.5 * 0.8, 1 - 1e-4))  # corrected twice
    assert mem1.predict_one(served(h, None, 0.9)) == pytest.approx(0.9 + 0.5 * 0.1)  # only what is still missing


def test_compensation_formula_and_bounds() -> None:
    np.testing.assert_allclose(compensate(np.array([0.3]), np.array([0.2]), lam=0.5), [0.4])
    np.testing.assert_allclose(compensate(np.array([0.6]), np.array([-0.4]), lam=0.5), [0.4])
    out = compensate(np.array([0.99, 0.01]), np.array([1.0, -1.0]), lam=1.0, eps=1e-4)
    np.testing.assert_allclose(out, [1 - 1e-4, 1e-4])
    assert ((out > 0) & (out < 1)).all()
    base = np.array([0.2, 0.9])
    delta = compensation_delta(base, np.array([0.5, 0.5]), lam=0.5)
    np.testing.assert_allclose(base + delta, compensate(base, np.array([0.5, 0.5]), lam=0.5))


def _one_bucket_memory(capacity: int, gamma: float = 1.0) -> tuple[ErrorMemory, np.ndarray]:
    lsh = RandomProjectionLSH(4, 1, 1, seed=0)
    return ErrorMemory(lsh, capacity=capacity, lam=0.5, prior=0.0, gamma=gamma), np.ones(4)


def test_fifo_capacity_keeps_the_newest_events() -> None:
    mem, h = _one_bucket_memory(capacity=2)
    for i, (y, p) in enumerate([(1, 0.0), (0, 0.5), (1, 0.5)]):
        mem.learn_one(served(h, y, p, ts=float(i), event_id=f"e{i}"))
    assert len(mem) == 2
    # e0 (label 1) left; e1 (label 0) and e2 (label 1) remain → against a query at 0.5, ê = 0
    e_hat, weight = mem.estimate_many(h[None, :], np.array([0.5]))
    assert e_hat[0] == pytest.approx(0.0) and weight[0] == 2.0
    # ties on ts break on event_id bytes, as in a Redis ZSET
    kept = fifo_keep({"b": (1.0, 1.0, 0.1), "a": (1.0, 0.0, 0.2), "c": (0.0, 1.0, 0.3)}, 2)
    assert set(kept) == {"a", "b"}
    kept = fifo_keep({"b": (1.0, 1.0, 0.1), "a": (1.0, 0.0, 0.2), "c": (2.0, 1.0, 0.3)}, 2)
    assert set(kept) == {"b", "c"}


def test_relearning_the_same_event_changes_nothing() -> None:
    mem, h = _one_bucket_memory(capacity=8)
    mem.learn_one(served(h, 1, 0.2, ts=1.0, event_id="x"))
    assert mem.predict_one(served(h, None, 0.1)) == pytest.approx(0.1 + 0.5 * 0.9)
    mem.learn_many([served(h, 0, 0.9, ts=2.0, event_id="x")])
    assert mem.last_added == 0
    assert len(mem) == 1
    assert mem.predict_one(served(h, None, 0.1)) == pytest.approx(0.1 + 0.5 * 0.9)


def test_a_new_version_never_reads_the_old_versions_errors() -> None:
    rng = np.random.default_rng(3)
    h = rng.standard_normal((50, 8))
    old = ErrorMemory(RandomProjectionLSH(8, 4, 6, seed=0, version=1))
    old.learn_many([served(h[i], 1, 0.2, ts=float(i)) for i in range(50)])
    new = ErrorMemory(RandomProjectionLSH(8, 4, 6, seed=0, version=2), buckets=old.buckets)
    e_old, _ = old.estimate_many(h, np.full(50, 0.2))
    e_new, w_new = new.estimate_many(h, np.full(50, 0.2))
    assert (e_old > 0.5).all()
    assert (e_new == 0).all() and (w_new == 0).all()
    np.testing.assert_allclose(new.compensate_many(h, np.full(50, 0.2)), 0.2)
