"""Metric math for the prequential evaluation (pure numpy, no I/O).

Conventions, chosen so that a model that cannot tell items apart gets exactly chance level:

* ``auc`` is the Mann-Whitney statistic with *average ranks* for ties: a tied (positive,
  negative) pair counts one half. ``nan`` when the labels hold a single class.
* ``logloss`` clips probabilities to ``[eps, 1 - eps]`` (default ``1e-7``) so one confident miss
  costs a finite amount; mean over events.
* Ranking is "one positive among sampled negatives": the positive's rank is summarised by
  ``greater`` (negatives scored strictly higher) and ``ties`` (negatives scored equal). Ties are
  broken uniformly at random *in expectation*: the positive is equally likely to sit at any rank
  ``greater + 1 … greater + ties + 1``, and Recall@K / NDCG@K are the exact expectations over
  that. So a constant scorer with 49 negatives gets Recall@20 = 20/50, not 1 (optimistic ties) or
  0 (pessimistic ties).
* Sliding windows are over the event order: window ``w`` covers events ``[start, start + size)``
  with ``start`` stepping by ``step``; each window reports the index of its last event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray
LOGLOSS_EPS = 1e-7


def _arrays(
    labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    return y, s


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (like scipy's ``rankdata``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    n = values.size
    ranks = np.empty(n, dtype=np.float64)
    if n == 0:
        return ranks
    # boundaries of runs of equal values
    boundaries = np.flatnonzero(np.diff(sorted_vals) != 0) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [n]))
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 … end
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC with ties counted one half; ``nan`` if only one class is present."""
    y, s = _arrays(labels, scores)
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss_terms(
    labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, eps: float = LOGLOSS_EPS
) -> np.ndarray:
    """Per-event binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]`` (a paired
    comparison of two predictors needs the terms, not only their mean)."""
    y, p = _arrays(labels, probs)
    p = np.clip(p, eps, 1.0 - eps)
    return np.asarray(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)), dtype=np.float64)


def logloss(
    labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, eps: float = LOGLOSS_EPS
) -> float:
    """Mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]``; nan if empty."""
    terms = logloss_terms(labels, probs, eps)
    return float(terms.mean()) if terms.size else float("nan")


def rank_counts(pos_score: float, neg_scores: Sequence[float] | np.ndarray) -> tuple[int, int]:
    """``(greater, ties)``: how many negatives score above / equal to the positive."""
    neg = np.asarray(neg_scores, dtype=np.float64)
    return int((neg > pos_score).sum()), int((neg == pos_score).sum())


def recall_at_k(greater: int, ties: int, k: int) -> float:
    """Expected hit (positive within the top ``k``) under uniform tie-breaking."""
    lo = greater + 1  # best possible rank
    hits = max(0, min(k, greater + ties + 1) - lo + 1)
    return hits / (ties + 1)


def ndcg_at_k(greater: int, ties: int, k: int) -> float:
    """Expected NDCG@k of one relevant item (ideal DCG = 1) under uniform tie-breaking."""
    lo, hi = greater + 1, min(k, greater + ties + 1)
    if lo > hi:
        return 0.0
    return sum(1.0 / math.log2(r + 1) for r in range(lo, hi + 1)) / (ties + 1)


def ranking(greater: Sequence[int] | np.ndarray, ties: Sequence[int] | np.ndarray, k: int = 20) -> tuple[float, float]:
    """Mean ``(Recall@k, NDCG@k)`` over positive events; ``(nan, nan)`` when there are none."""
    g = np.asarray(greater, dtype=np.int64).ravel()
    t = np.asarray(ties, dtype=np.int64).ravel()
    if g.size == 0:
        return float("nan"), float("nan")
    rec = [recall_at_k(int(a), int(b), k) for a, b in zip(g, t)]
    ndcg = [ndcg_at_k(int(a), int(b), k) for a, b in zip(g, t)]
    return float(np.mean(rec)), float(np.mean(ndcg))


def window_bounds(n: int, size: int, step: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end), …]`` of sliding windows over ``n`` events; one short window if ``n < size``."""
    if n <= 0:
        return []
    size = max(1, min(size, n))
    step = max(1, step or size)
    out = [(s, s + size) for s in range(0, n - size + 1, step)]
    if out[-1][1] < n:  # the tail is always reported
        out.append((n - size, n))
    return out


def sliding(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    size: int,
    step: int | None = None,
) -> list[tuple[int, float]]:
    """``[(index of the window's last event, metric over the window), …]``."""
    y, s = _arrays(labels, scores)
    return [(end - 1, metric(y[start:end], s[start:end])) for start, end in window_bounds(y.size, size, step)]


def sliding_auc(labels: ArrayLike, scores: ArrayLike, size: int, step: int | None = None) -> list[tuple[int, float]]:
    return sliding(auc, labels, scores, size, step)


def sliding_logloss(
    labels: ArrayLike, scores: ArrayLike, size: int, step: int | None = None
) -> list[tuple[int, float]]:
    return sliding(logloss, labels, scores, size, step)


def sliding_ranking(
    is_ranked: Sequence[bool] | np.ndarray,
    greater: Sequence[int] | np.ndarray,
    ties: Sequence[int] | np.ndarray,
    size: int,
    step: int | None = None,
    k: int = 20,
) -> list[tuple[int, float, float]]:
    """Per window over *all* events: ``(last index, Recall@k, NDCG@k)`` of the ranked events in it."""
    mask = np.asarray(is_ranked, dtype=bool).ravel()
    g = np.asarray(greater).ravel()
    t = np.asarray(ties).ravel()
    out = []
    for start, end in window_bounds(mask.size, size, step):
        m = mask[start:end]
        rec, nd = ranking(g[start:end][m], t[start:end][m], k)
        out.append((end - 1, rec, nd))
    return out
