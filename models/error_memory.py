"""ReLoop2 error memory and the session memory: the pure math (hashing, estimates, compensation).

No I/O here: ``driftrec.storage.error_memory`` keeps both memories in Redis (write and read) and
is tested against the in-process references below (``ErrorMemory``, ``SessionMemory``).

ReLoop2 (Zhu et al., KDD 2023, arXiv:2306.08808) pairs a *slow* learner (the CTR model,
gradient steps with a small learning rate) with a *fast*, non-parametric error memory: for every
labelled sample served, store ``e = y - ŷ`` keyed by the model's last hidden layer ``h(x)``;
at serving time estimate ``ê(x)`` from the errors of similar samples and output ``ŷ + λ·ê``.
The memory is indexed by locality-sensitive hashing so writes and reads cost O(1) in the memory
size and the footprint is constant.

What was verified against the paper, and what was not
------------------------------------------------------
A full-text copy of the KDD'23 camera-ready paper was read (its equations did not survive the
conversion, its wording did). Verified from the text:

* the memory is a *sketch* of ``K`` repeated arrays, each indexed by ``L`` SimHash (signed random
  projection) bits, so a bucket is found in O(1) and the footprint is ``2^L × K`` buckets; the
  only ``L`` the text gives is an example (16); the ablation's best ``K`` is 180 (AmazonElectronics)
  and 70 (MicroVideo) for DCNv2;
* a bucket stores *sums* ``(Σx, Σy, Σŷ_base)`` of the samples hashed there, read back by averaging,
  reset regularly or when the base model is updated;
* the key is a hidden representation of the base model (e.g. the last hidden layer);
* the readouts of the ``K`` arrays are combined by a softmax attention over their similarity to the
  query, temperature τ (e.g. 0.1);
* the error estimate mixes "label of the neighbours minus the query's prediction" (γ = 1, used in
  the paper's experiments) and "label minus the neighbours' prediction" (γ = 0);
* compensation is in **probability** space, ``ŷ' = ŷ + λ·ê``, clamped to [0, 1]; the best λ was
  0.9 (AmazonElectronics) and 0.4 (MicroVideo);
* the paper reports gAUC and AUC only (no log-loss), on AmazonElectronics, MicroVideo and
  KuaiVideo, +ReLoop2 on five base models: e.g. DCNv2 AUC 88.12 → 88.99 and 73.44 → 74.25, DIEN
  88.88 → 89.62 and 73.21 → 73.60 (Table 2; copied in ``benchmarks/error_memory.py``).

Where we deviate, and why: see the mapping below. In short, we keep raw ``(event_id, ts, y, ŷ)``
entries instead of sums (so a redelivered event cannot be counted twice), and we weight neighbours
by their collision count over the tables (the SimHash kernel) instead of a softmax over stored
vectors (we store no vectors). γ, λ and the clamp follow the paper.

How this implementation maps onto the paper
-------------------------------------------
* **Hashing**: signed random projections (SimHash), ``n_tables`` independent tables of ``n_bits``
  hyperplanes each. Defaults 8 tables × 10 bits (our choice: the paper leaves ``L`` open).
* **Bucket content — raw samples vs. sketch**: the paper keeps per-bucket *sums*
  ``(Σx, Σy, Σŷ_base)``. We keep the raw ``(event_id, ts, y, ŷ_served)`` entries of a bucket,
  bounded by a FIFO capacity. Reason: the stream is at-least-once (Kafka redelivery), and an
  aggregated sum cannot be made idempotent per event, while a set keyed by ``event_id`` can; the
  bounded FIFO also gives the paper's "refresh with the newest samples, fixed capacity" directly.
  The *estimate* is the sketch estimator over the same buckets: summing the entries of x's bucket
  in every table gives each stored sample a weight equal to its number of collisions with x,
  ``c_i``, whose expectation is ``L·(1 − θ(h, h_i)/π)^bits`` — the SimHash collision kernel in the
  angle θ. With ``W = Σ_i c_i·w_i``:
  ``ê(x) = Σ_i c_i·w_i·(y_i − γ·ŷ(x) − (1 − γ)·ŷ_i) / (W + prior)``.
* **γ** (the paper's mixing weight, default 1 as in its experiments): γ = 1 compares the
  neighbours' labels with the *current* prediction for x; γ = 0 averages the neighbours' own
  served errors ``y_i − ŷ_i``. Measured here (``benchmarks/error_memory.py``): γ = 0 goes stale
  under an online base model — errors the model has since learned away are corrected again —
  which γ = 1 avoids.
* **Similarity weighting**: the collision count above (the LSH kernel). No explicit vector is
  stored per entry (memory stays O(1) per entry).
* **Recency weighting** (optional, off by default, our addition): ``w_i = 0.5^((now−ts_i)/half_life)``.
  The FIFO capacity already forgets; the decay only matters for sparse buckets.
* **Shrinkage** ``prior`` (our addition, default 1): pulls the estimate toward 0 where a query
  found few neighbours, so one stray error cannot swing a prediction.
* **Compensation space**: probability space, ``ŷ' = clip(ŷ + λ·ê, eps, 1 − eps)`` as the brief and
  the paper state it; ``eps = 1e-4`` keeps log-loss finite. This module's in-process reference
  takes a fixed λ (default 0.5, between the paper's 0.4 and 0.9); the served score applies the
  correction to the score served before it, as a logit delta whose weight the fusion layer learns
  (``models/served.py``: at weight 1 it is exactly ``clip(ŷ + ê)``).
* **Versioning**: a bucket is identified by ``(key version, table, code)``; entries hashed in one
  hidden space must never be read by a query hashed in another. In the product the key is a
  published snapshot the trainer holds for minutes, not whichever snapshot is newest
  (``storage/served_memory.py`` measures why and says how).


Session memory
--------------
Session error memory: the served model's recent errors on this user *in this category*.

Why a second memory beside ReLoop2's LSH memory. The LSH memory retrieves errors of samples that
are near in the model's hidden space; on ML-100K those are mostly other users' ratings of similar
items, and once the online base model learns every window (Adagrad first-order weights) they carry
nothing it lacks: the learned λ falls to ~0. What the base cannot absorb within a window is a
user's *current* drift (a rating session that runs harsher or kinder than the user's average,
genre by genre). Measured on the validation segment (ML-100K events 25,000-50,000, served base
scores of ``driftrec evaluate --limit 50000``), a logistic fit of the label on the served base
logit plus the mean served error of the same user's last events gains +0.003 AUC; the same user's
last errors *in the candidate's category* carry the most (the fit's largest coefficient).

So the session memory keys a bucket by the exact pair ``(user, category)`` -- the degenerate LSH
where "similar" means "same user, same genre" -- and keeps its ``capacity`` newest
``(ts, y, ŷ_served)`` entries in a FIFO. The estimate is ReLoop2's (``estimate_from_sums``) with
its own γ and λ. Choices made on that validation segment by replaying the pipeline's timing
offline (window of 250, λ learned by the fusion weights of 0.5.x, since removed, from 0.5), AUC /
log-loss, base 0.7125 / 0.6109:

* key (user, category) vs user alone: 0.7153 / 0.6085 vs 0.7133 / 0.6103 (capacity 8);
* γ = 0 (the neighbours' own served errors) vs γ = 1 (their labels vs the current prediction):
  0.7153 vs 0.7124 -- a user's last few errors are recent enough not to go stale (the reason the
  LSH memory uses γ = 1), while "this user's recent labels minus the current prediction"
  double-counts the leniency the base already learned;
* capacity 4 / 8 / 16: 0.7145 / 0.7153 / 0.7149.

``driftrec.storage.error_memory`` stores and reads the buckets in Redis; :class:`SessionMemory`
is the in-process reference it is tested against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from driftrec.contract.interaction import Interaction, stable_hash

DEFAULT_LAMBDA = 0.5
DEFAULT_PRIOR = 1.0
DEFAULT_GAMMA = 1.0
DEFAULT_EPS = 1e-4


@runtime_checkable
class HiddenPredictor(Protocol):
    """What the memory needs from the served model: its probability *and* the last hidden layer
    for the same forward pass (the DSL model and the stand-in both provide it)."""

    def predict_with_hidden(self, interactions: Sequence[Interaction]) -> tuple[np.ndarray, np.ndarray]:
        """``(probs (n,) float64, hidden (n, H) float32)``."""
        ...


class HiddenStandardizer:
    """Centre and scale hidden vectors per unit before hashing.

    Why: sign random projections cut through the origin, but a trained ReLU layer's outputs sit
    in a thin shell far from it (per-unit means ~0.1–0.2, spreads ~0.005 on ML-100K), so every
    vector fell on the same side of nearly every hyperplane and the whole memory collapsed into
    one or two buckets per table. Standardising with the served snapshot's own statistics
    restores the angular neighbourhoods LSH relies on. Writer and readers must apply the same
    statistics, so the trainer publishes them with the snapshot (part ``hidden_stats``).
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.maximum(np.asarray(scale, dtype=np.float32), 1e-6)

    @classmethod
    def fit(cls, hidden: np.ndarray) -> HiddenStandardizer:
        h = np.asarray(hidden, dtype=np.float32)
        return cls(h.mean(axis=0), h.std(axis=0))

    def transform(self, hidden: np.ndarray) -> np.ndarray:
        return (np.asarray(hidden, dtype=np.float32) - self.mean) / self.scale

    def to_bytes(self) -> bytes:
        return np.stack([self.mean, self.scale]).astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> HiddenStandardizer:
        mean, scale = np.frombuffer(data, dtype="<f4").reshape(2, -1)
        return cls(mean, scale)


class RandomProjectionLSH:
    """SimHash over hidden vectors; identical codes in every process for the same arguments.

    Projections come from ``numpy.random.default_rng(seed)`` (PCG64, platform independent), so the
    worker that writes and the scoring replica that reads agree without exchanging state.
    """

    def __init__(self, dim: int, n_tables: int, n_bits: int, seed: int = 0, version: int = 0) -> None:
        if not 1 <= n_bits <= 62:
            raise ValueError("n_bits must lie in [1, 62] so a code fits an int64")
        if dim < 1 or n_tables < 1:
            raise ValueError("dim and n_tables must be positive")
        self.dim = dim
        self.n_tables = n_tables
        self.n_bits = n_bits
        self.seed = seed
        self.version = version
        rng = np.random.default_rng(seed)
        # (dim, n_tables * n_bits): one matmul hashes a whole batch into every table
        self._planes = rng.standard_normal((dim, n_tables * n_bits)).astype(np.float64)
        self._weights = (np.int64(1) << np.arange(n_bits, dtype=np.int64)).astype(np.int64)

    def codes(self, hidden: np.ndarray) -> np.ndarray:
        """(n, dim) → (n, n_tables) int64 bucket codes in ``[0, 2**n_bits)``."""
        h = np.asarray(hidden, dtype=np.float64)
        if h.ndim == 1:
            h = h[None, :]
        if h.shape[1] != self.dim:
            raise ValueError(f"hidden has {h.shape[1]} columns, the LSH expects {self.dim}")
        bits = (h @ self._planes > 0.0).reshape(h.shape[0] * self.n_tables, self.n_bits)
        # one integer matvec per (row, table) instead of a broadcast product and a sum
        return np.asarray(bits.astype(np.int64) @ self._weights, dtype=np.int64).reshape(h.shape[0], self.n_tables)


def errors(labels: np.ndarray | Sequence[int], probs: np.ndarray) -> np.ndarray:
    """``e = y − ŷ`` in probability space: positive where the model under-predicted."""
    return np.asarray(labels, dtype=np.float64) - np.asarray(probs, dtype=np.float64)


def recency_weights(ts: np.ndarray, now: float | None, half_life_s: float) -> np.ndarray:
    """Halve an entry's weight every ``half_life_s`` seconds of age; all ones when disabled."""
    ts = np.asarray(ts, dtype=np.float64)
    if half_life_s <= 0 or now is None:
        return np.ones_like(ts)
    age = np.maximum(now - ts, 0.0)
    return np.power(0.5, age / half_life_s)


def estimate_from_sums(
    weight: np.ndarray,
    weighted_labels: np.ndarray,
    weighted_served: np.ndarray,
    query_probs: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
) -> np.ndarray:
    """ê per query from its neighbours' weighted sums ``Σw``, ``Σw·y``, ``Σw·ŷ_served``.

    ``ê = Σ w_i·(y_i − γ·ŷ(x) − (1 − γ)·ŷ_i) / (Σ w_i + prior)``: with γ = 1 (the paper's setting)
    the neighbours' labels are compared with the *current* prediction for the query, so an error
    the model has since learned away is not corrected twice; with γ = 0 it is the neighbours' own
    served errors. ``prior`` shrinks toward 0 where few neighbours were found; 0 where none were.
    """
    w = np.asarray(weight, dtype=np.float64)
    q = np.asarray(query_probs, dtype=np.float64)
    num = (
        np.asarray(weighted_labels, dtype=np.float64)
        - gamma * q * w
        - (1.0 - gamma) * np.asarray(weighted_served, dtype=np.float64)
    )
    out = np.zeros_like(w)
    found = w > 0
    out[found] = num[found] / (w[found] + prior)
    return out


@dataclass(frozen=True)
class ErrorSums:
    """What a memory holds for each query: the neighbours' weighted sums ``Σw``, ``Σw·y``,
    ``Σw·ŷ_served``. ``estimate`` turns them into ``ê`` for the query's served score, which is
    only known once the other terms are fused (``models/served.py``)."""

    weight: np.ndarray
    labels: np.ndarray
    served: np.ndarray
    gamma: float = DEFAULT_GAMMA
    prior: float = DEFAULT_PRIOR

    def estimate(self, query_probs: np.ndarray) -> np.ndarray:
        return estimate_from_sums(
            self.weight, self.labels, self.served, query_probs, gamma=self.gamma, prior=self.prior
        )

    def plus(self, other: ErrorSums) -> ErrorSums:
        """The sums over both neighbour sets (e.g. two key snapshots' buckets, which share no entry)."""
        return ErrorSums(
            self.weight + other.weight, self.labels + other.labels, self.served + other.served, self.gamma, self.prior
        )

    def take(self, index: np.ndarray | list[int]) -> ErrorSums:
        """The sums of a subset of the queries."""
        return ErrorSums(self.weight[index], self.labels[index], self.served[index], self.gamma, self.prior)


def estimate_error(
    entry_labels: np.ndarray,
    entry_served: np.ndarray,
    entry_ts: np.ndarray,
    query_prob: float,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    now: float | None = None,
    half_life_s: float = 0.0,
) -> tuple[float, float]:
    """ê for one query from the entries gathered over all of its buckets (an entry found in k
    tables appears k times, which *is* the LSH similarity weight). Returns ``(ê, total weight)``."""
    y = np.asarray(entry_labels, dtype=np.float64)
    if y.size == 0:
        return 0.0, 0.0
    w = recency_weights(entry_ts, now, half_life_s)
    total = float(w.sum())
    e_hat = estimate_from_sums(
        np.array([total]),
        np.array([(w * y).sum()]),
        np.array([(w * np.asarray(entry_served, dtype=np.float64)).sum()]),
        np.array([query_prob]),
        gamma=gamma,
        prior=prior,
    )
    return float(e_hat[0]), total


def compensate(
    base_probs: np.ndarray, e_hat: np.ndarray, lam: float = DEFAULT_LAMBDA, eps: float = DEFAULT_EPS
) -> np.ndarray:
    """ŷ' = clip(ŷ + λ·ê, eps, 1 − eps): strictly inside (0, 1) so log-loss stays finite."""
    out = np.asarray(base_probs, dtype=np.float64) + lam * np.asarray(e_hat, dtype=np.float64)
    return np.clip(out, eps, 1.0 - eps)


def compensation_delta(
    base_probs: np.ndarray, e_hat: np.ndarray, lam: float = DEFAULT_LAMBDA, eps: float = DEFAULT_EPS
) -> np.ndarray:
    """The additive correction in probability space, so that ``base + delta`` is the served score
    exactly (clipping included) — what the scoring API reports as ``compensation``."""
    base = np.asarray(base_probs, dtype=np.float64)
    return compensate(base, e_hat, lam, eps) - base


Entry = tuple[float, float, float]  # (event ts, label y, served prediction ŷ)


def fifo_keep(entries: dict[str, Entry], capacity: int) -> dict[str, Entry]:
    """Keep the ``capacity`` newest entries by ``(ts, event_id)`` — Redis ZSET order, so the
    in-process reference evicts exactly what ``ZREMRANGEBYRANK`` evicts."""
    if len(entries) <= capacity:
        return entries
    ordered = sorted(entries.items(), key=lambda kv: (kv[1][0], kv[0].encode()))
    return dict(ordered[len(ordered) - capacity :])


@dataclass(frozen=True, slots=True)
class ServedSample:
    """One event as the served model saw it: the sample both error memories learn from.

    ``hidden`` is the served snapshot's last hidden layer *as hashed* (standardised, see
    ``HiddenStandardizer``), ``served`` its probability. The LSH memory keys by ``hidden``, the
    session memory by ``(user_id, category)``; both are idempotent per ``event_id``.
    """

    hidden: np.ndarray
    served: float
    label: int | None
    ts: float
    event_id: str = ""
    user_id: str = ""
    category: str | None = None


@dataclass
class ErrorMemory:
    """In-process reference estimator (River style). The Redis store must answer the same.

    Buckets map ``event_id → (ts, y, ŷ_served)``; the first write of an event wins, so a
    redelivered event changes nothing. ``predict_*`` return the compensated probability of a
    sample's ``served`` prediction, estimated at the sample's own time.
    """

    lsh: RandomProjectionLSH
    capacity: int = 32
    lam: float = DEFAULT_LAMBDA
    prior: float = DEFAULT_PRIOR
    gamma: float = DEFAULT_GAMMA
    half_life_s: float = 0.0
    eps: float = DEFAULT_EPS
    buckets: dict[tuple[int, int, int], dict[str, Entry]] = field(default_factory=dict)
    last_added: int = 0  # entries the last ``learn_many`` added that survived the FIFO trim
    _auto_id: int = 0

    def _bucket(self, table: int, code: int) -> tuple[int, int, int]:
        return (self.lsh.version, table, int(code))

    def learn_one(self, sample: ServedSample) -> None:
        self.learn_many([sample])

    def learn_many(self, samples: Sequence[ServedSample]) -> None:
        """Store one entry per labelled sample per table (unlabelled samples teach nothing)."""
        labelled = [x for x in samples if x.label is not None]
        if not labelled:
            self.last_added = 0
            return
        ids = []
        for x in labelled:
            if x.event_id:
                ids.append(x.event_id)
            else:
                ids.append(f"_auto{self._auto_id}")
                self._auto_id += 1
        codes = self.lsh.codes(np.stack([np.asarray(x.hidden) for x in labelled]))
        fresh: dict[tuple[int, int, int], set[str]] = {}
        for i, (x, eid) in enumerate(zip(labelled, ids)):
            entry = (float(x.ts), float(x.label), float(x.served))  # type: ignore[arg-type]  # labelled above
            for t in range(self.lsh.n_tables):
                key = self._bucket(t, codes[i, t])
                bucket = self.buckets.setdefault(key, {})
                if eid not in bucket:
                    bucket[eid] = entry
                    fresh.setdefault(key, set()).add(eid)
        added = 0
        for key, new_ids in fresh.items():
            self.buckets[key] = fifo_keep(self.buckets[key], self.capacity)
            added += len(new_ids & self.buckets[key].keys())
        self.last_added = added

    def estimate_many(
        self, hidden: np.ndarray, base_probs: np.ndarray, now: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ê and the total neighbour weight for each row of ``hidden`` (served ``base_probs``)."""
        codes = self.lsh.codes(hidden)
        base = np.asarray(base_probs, dtype=np.float64)
        e_hat = np.zeros(codes.shape[0])
        support = np.zeros(codes.shape[0])
        for i in range(codes.shape[0]):
            entries = [
                entry
                for t in range(self.lsh.n_tables)
                for entry in self.buckets.get(self._bucket(t, codes[i, t]), {}).values()
            ]
            ts_i, y_i, p_i = (np.array(col) for col in zip(*entries)) if entries else (np.array([]),) * 3
            e_hat[i], support[i] = estimate_error(
                y_i,
                p_i,
                ts_i,
                float(base[i]),
                gamma=self.gamma,
                prior=self.prior,
                now=now,
                half_life_s=self.half_life_s,
            )
        return e_hat, support

    def compensate_many(self, hidden: np.ndarray, base_probs: np.ndarray, now: float | None = None) -> np.ndarray:
        """``clip(ŷ + λ·ê)`` for rows of ``hidden`` served ``base_probs``, all at time ``now``."""
        e_hat, _ = self.estimate_many(hidden, base_probs, now)
        return compensate(base_probs, e_hat, self.lam, self.eps)

    def predict_one(self, sample: ServedSample) -> float:
        return float(self.predict_many([sample])[0])

    def predict_many(self, samples: Sequence[ServedSample]) -> np.ndarray:
        out = np.empty(len(samples))
        for i, x in enumerate(samples):  # each sample is estimated at its own time
            out[i] = self.compensate_many(np.asarray(x.hidden)[None, :], np.array([x.served]), x.ts)[0]
        return out

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())


# ---- session memory ------------------------------------------------------------------------------
DEFAULT_SESSION_CAPACITY = 8
DEFAULT_SESSION_GAMMA = 0.0


def session_code(user_id: str, category: str | None) -> int:
    """The bucket of ``(user, category)``: a 62-bit stable hash (no collisions in practice)."""
    return stable_hash(f"{user_id}\x1f{category or ''}", 1 << 62, salt="session")


class SessionMemory:
    """In-process reference of the session memory (see the module docstring).

    ``learn_*`` store served errors in their ``(user, category)`` bucket, deduplicated by event id
    and kept newest-first by ``(ts, event_id)`` as the Redis buckets are; ``estimate_many`` reads
    ĉ for a user's candidates; ``predict_*`` return ``clip(ŷ + λ·ĉ)`` of a sample's ``served``.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_SESSION_CAPACITY,
        gamma: float = DEFAULT_SESSION_GAMMA,
        prior: float = DEFAULT_PRIOR,
        lam: float = DEFAULT_LAMBDA,
        eps: float = DEFAULT_EPS,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity, self.gamma, self.prior, self.lam, self.eps = capacity, gamma, prior, lam, eps
        self._buckets: dict[int, dict[str, Entry]] = defaultdict(dict)

    def learn_one(self, sample: ServedSample) -> None:
        if sample.label is None:
            return
        code = session_code(sample.user_id, sample.category)
        bucket = self._buckets[code]
        if sample.event_id not in bucket:
            bucket[sample.event_id] = (float(sample.ts), float(sample.label), float(sample.served))
            self._buckets[code] = fifo_keep(bucket, self.capacity)

    def learn_many(self, samples: Sequence[ServedSample]) -> None:
        for sample in samples:
            self.learn_one(sample)

    def estimate_many(self, user_id: str, categories: Sequence[str | None], base_probs: np.ndarray) -> np.ndarray:
        """ĉ per candidate (its category's bucket); 0 where the bucket is empty."""
        n = len(categories)
        w, wy, wp = np.zeros(n), np.zeros(n), np.zeros(n)
        for i, cat in enumerate(categories):
            entries = self._buckets.get(session_code(user_id, cat))
            if entries:
                vals = np.array(list(entries.values()))
                w[i], wy[i], wp[i] = len(vals), vals[:, 1].sum(), vals[:, 2].sum()
        return estimate_from_sums(
            w, wy, wp, np.asarray(base_probs, dtype=np.float64), gamma=self.gamma, prior=self.prior
        )

    def predict_one(self, sample: ServedSample) -> float:
        c_hat = self.estimate_many(sample.user_id, [sample.category], np.array([sample.served]))
        return float(compensate(np.array([sample.served]), c_hat, self.lam, self.eps)[0])

    def predict_many(self, samples: Sequence[ServedSample]) -> np.ndarray:
        return np.array([self.predict_one(x) for x in samples], dtype=np.float64)
