"""Session error memory: the served model's recent errors on this user *in this category*.

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
offline (window of 250, λ learned by :class:`models.fusion.MemoryLambda` from 0.5), AUC /
log-loss, base 0.7125 / 0.6109:

* key (user, category) vs user alone: 0.7153 / 0.6085 vs 0.7133 / 0.6103 (capacity 8);
* γ = 0 (the neighbours' own served errors) vs γ = 1 (their labels vs the current prediction):
  0.7153 vs 0.7124 -- a user's last few errors are recent enough not to go stale (the reason the
  LSH memory uses γ = 1), while "this user's recent labels minus the current prediction"
  double-counts the leniency the base already learned;
* capacity 4 / 8 / 16: 0.7145 / 0.7153 / 0.7149.

Nothing here does I/O: ``streams.error_memory`` stores the buckets in Redis and
``serving.compensation`` reads them; :class:`SessionMemory` is the in-process reference both are
tested against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from models.error_memory import estimate_from_sums, fifo_keep
from models.interaction import stable_hash

DEFAULT_SESSION_CAPACITY = 8
DEFAULT_SESSION_GAMMA = 0.0


def session_code(user_id: str, category: str | None) -> int:
    """The bucket of ``(user, category)``: a 62-bit stable hash (no collisions in practice)."""
    return stable_hash(f"{user_id}\x1f{category or ''}", 1 << 62, salt="session")


class SessionMemory:
    """In-process reference: ``learn_one`` stores a served error, ``estimate_many`` reads ĉ.

    Entries are deduplicated by event id (redelivery is harmless) and kept newest-first by
    ``(ts, event_id)``, as the Redis buckets are.
    """

    def __init__(self, capacity: int = DEFAULT_SESSION_CAPACITY, gamma: float = DEFAULT_SESSION_GAMMA,
                 prior: float = 1.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity, self.gamma, self.prior = capacity, gamma, prior
        self._buckets: dict[int, dict[str, tuple[float, float, float]]] = defaultdict(dict)

    def learn_one(self, user_id: str, category: str | None, y: int, y_hat: float, ts: float, event_id: str) -> None:
        code = session_code(user_id, category)
        bucket = self._buckets[code]
        if event_id not in bucket:
            bucket[event_id] = (float(ts), float(y), float(y_hat))
            self._buckets[code] = fifo_keep(bucket, self.capacity)

    def estimate_many(self, user_id: str, categories: Sequence[str | None], base_probs: np.ndarray) -> np.ndarray:
        """ĉ per candidate (its category's bucket); 0 where the bucket is empty."""
        n = len(categories)
        w, wy, wp = np.zeros(n), np.zeros(n), np.zeros(n)
        for i, cat in enumerate(categories):
            entries = self._buckets.get(session_code(user_id, cat))
            if entries:
                vals = np.array(list(entries.values()))
                w[i], wy[i], wp[i] = len(vals), vals[:, 1].sum(), vals[:, 2].sum()
        return estimate_from_sums(w, wy, wp, np.asarray(base_probs, dtype=np.float64),
                                  gamma=self.gamma, prior=self.prior)

