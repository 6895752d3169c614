"""Read side of the ReLoop2 error memory: the scoring service's correction for a candidate list.

The correction is returned in **probability space** and already includes the clip, i.e.
``score = base + compensation`` exactly, with ``score`` strictly inside (0, 1). All candidates ×
tables are fetched in **one round trip**: a single ``MGET`` of the distinct buckets' snapshot keys
(on a Redis Cluster client, ``mget_nonatomic``, which sends one MGET per slot in one pipeline).
The estimate is the same function the in-process reference ``models.error_memory.ErrorMemory``
uses, so both give the same answers.

The read is split in two plain steps — :func:`plan_buckets` (which keys) and
:func:`estimates_from_values` (what they say) — so the scoring service can put the ``MGET`` into
the same pipeline as its other reads (one round trip per request in total).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from redis.asyncio import Redis

from models.error_memory import (
    DEFAULT_EPS,
    DEFAULT_GAMMA,
    DEFAULT_LAMBDA,
    DEFAULT_PRIOR,
    RandomProjectionLSH,
    compensation_delta,
    estimate_from_sums,
    recency_weights,
)
from models.session_memory import session_code
from streams.error_memory import ENTRY_BYTES, MemoryKeys

_ENTRY = np.dtype("<f8")


class BucketNames:
    """Every bucket's snapshot key name of one (keys, lsh), built once.

    Why: formatting ``n_candidates × n_tables`` key strings per request is the slowest part of a
    naive read; with ``2**n_bits`` codes per table the whole name table is small (8 × 1024 by
    default), so a request only indexes into it.
    """

    def __init__(self, keys: MemoryKeys, lsh: RandomProjectionLSH) -> None:
        if keys.version != lsh.version:
            raise ValueError(f"keys are for model version {keys.version}, the LSH for {lsh.version}")
        self.keys, self.lsh = keys, lsh
        self.n_codes = 1 << lsh.n_bits
        names = [keys.bucket(t, c)[1].encode() for t in range(lsh.n_tables) for c in range(self.n_codes)]
        self.names = np.array(names, dtype=object)
        self._offsets = (np.arange(lsh.n_tables, dtype=np.int64) * self.n_codes)[None, :]

    def flat_ids(self, codes: np.ndarray) -> np.ndarray:
        """(n, n_tables) codes → (n, n_tables) indices into ``names``."""
        return codes + self._offsets


@dataclass(frozen=True)
class BucketPlan:
    """Which keys to fetch (``names``, distinct) and which of them each candidate reads (``rows``)."""

    names: list[bytes]
    rows: np.ndarray  # (n, n_tables) positions into names


def plan_buckets(names: BucketNames, hidden: np.ndarray) -> BucketPlan:
    codes = names.lsh.codes(hidden)
    if codes.shape[0] == 0:
        return BucketPlan([], np.zeros((0, names.lsh.n_tables), dtype=np.int64))
    flat = names.flat_ids(codes)
    # the id space is small (n_tables · 2**n_bits): a presence table beats sorting for unique()
    present = np.zeros(names.names.size, dtype=bool)
    present[flat] = True
    distinct = np.flatnonzero(present)
    position = np.cumsum(present) - 1
    return BucketPlan(names.names[distinct].tolist(), position[flat])


def plan_session_buckets(keys: MemoryKeys, pairs: Sequence[tuple[str, str | None]]) -> BucketPlan:
    """The session memory's keys for ``(user, category)`` pairs (a candidate list, or a trainer
    batch): one bucket each, every distinct pair fetched once (``models.session_memory``)."""
    names: list[bytes] = []
    where: dict[tuple[str, str | None], int] = {}
    rows = np.zeros((len(pairs), 1), dtype=np.int64)
    for i, pair in enumerate(pairs):
        pos = where.get(pair)
        if pos is None:
            pos = where[pair] = len(names)
            names.append(keys.session_bucket(session_code(*pair))[1].encode())
        rows[i, 0] = pos
    return BucketPlan(names, rows)


def estimates_from_values(
    values: list[bytes | None],
    plan: BucketPlan,
    base_probs: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ê, neighbour weight)`` per candidate (served ``base_probs``) from the MGET reply of
    ``plan.names``.

    A value whose length is not a whole number of entries (e.g. a bucket written in an older
    format) is read as empty rather than misparsed.
    """
    n = plan.rows.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros(0)
    counts = np.fromiter((len(v) // ENTRY_BYTES if v and len(v) % ENTRY_BYTES == 0 else 0 for v in values),
                         dtype=np.int64, count=len(values))
    if not counts.any():
        return np.zeros(n), np.zeros(n)
    blob = b"".join(v for v, c in zip(values, counts) if c)
    entries = np.frombuffer(blob, dtype=_ENTRY).reshape(-1, 3)  # columns: ts, y, ŷ_served
    owner = np.repeat(np.arange(len(values)), counts)
    if half_life_s > 0 and now is not None:
        w = recency_weights(entries[:, 0], now, half_life_s)
        bucket_w = np.bincount(owner, weights=w, minlength=len(values))
    else:
        w = np.ones(entries.shape[0])
        bucket_w = counts.astype(np.float64)
    bucket_wy = np.bincount(owner, weights=w * entries[:, 1], minlength=len(values))
    bucket_wp = np.bincount(owner, weights=w * entries[:, 2], minlength=len(values))
    # a candidate's sums are the sums of its buckets' sums: the same quantities ErrorMemory
    # computes entry by entry (an entry found in k of its buckets counts k times)
    support = bucket_w[plan.rows].sum(axis=1)
    e_hat = estimate_from_sums(support, bucket_wy[plan.rows].sum(axis=1), bucket_wp[plan.rows].sum(axis=1),
                               base_probs, gamma=gamma, prior=prior)
    return e_hat, support


async def read_estimates(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    hidden: np.ndarray,
    base_probs: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
    names: BucketNames | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ê, neighbour weight)`` per row of ``hidden`` (served ``base_probs``); zero where the
    memory knows nothing.

    Pass a long-lived ``names`` to skip building the key table on every call."""
    if names is None:
        names = BucketNames(keys, lsh)
    elif names.keys != keys or names.lsh is not lsh:
        raise ValueError("names were built for other keys or another LSH")
    plan = plan_buckets(names, hidden)
    if not plan.names:
        return np.zeros(0), np.zeros(0)
    mget = getattr(redis, "mget_nonatomic", None)  # RedisCluster: split per slot, one pipeline
    raw = await (mget(plan.names) if mget is not None else redis.mget(plan.names))
    return estimates_from_values(raw, plan, base_probs, gamma=gamma, prior=prior, half_life_s=half_life_s, now=now)


async def read_compensation(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    hidden: np.ndarray,
    base_probs: np.ndarray,
    *,
    lam: float = DEFAULT_LAMBDA,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
    eps: float = DEFAULT_EPS,
    names: BucketNames | None = None,
) -> np.ndarray:
    """Additive correction per candidate, probability space: ``clip(ŷ + λ·ê) − ŷ``."""
    e_hat, _ = await read_estimates(redis, keys, lsh, hidden, base_probs, gamma=gamma, prior=prior,
                                    half_life_s=half_life_s, now=now, names=names)
    return compensation_delta(base_probs, e_hat, lam, eps)
