"""Recording the *served* model's errors on labelled events (ReLoop2's memory write).

Why this runs inside the trainer agent, before the gradient step, rather than as a separate
agent: the memory must hold the errors users actually saw, i.e. those of the snapshot serving
had loaded *before* the model learned these events. A separate agent racing the trainer would
sometimes score with a snapshot that already learned the batch and store errors that were never
made (we measured compensation turning harmful that way). The trainer knows exactly which
snapshot is being served — the one it last published — so it scores the batch with it and hands
those predictions here first.
Writes are idempotent per event id (see ``streams.error_memory``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from redis.asyncio import Redis

from driftrec.settings import Settings
from models.error_memory import HiddenStandardizer, RandomProjectionLSH
from models.interaction import Interaction
from streams.error_memory import MemoryKeys, write_errors

if TYPE_CHECKING:
    from serving.compensation import BucketNames

log = logging.getLogger(__name__)


class ErrorMemoryWriter:
    """Writes ``(LSH(hidden), ts, y, ŷ)`` of the served snapshot's predictions for labelled interactions."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.cfg = settings.memory
        self.generation = settings.dsl.generation
        self.keys = MemoryKeys.from_settings(settings.key_prefix, self.generation, self.cfg.n_shards)
        self.lsh: RandomProjectionLSH | None = None
        self.names: BucketNames | None = None  # the read side's key table, built on the first estimate

    async def estimate(self, probs: np.ndarray, hidden: np.ndarray, standardizer: HiddenStandardizer | None,
                       now: float | None = None) -> np.ndarray:
        """ê per sample as the scoring service would read it now (zeros before anything was written)."""
        from serving.compensation import read_estimates  # the read path the scoring service uses

        if self.lsh is None or len(probs) == 0:
            return np.zeros(len(probs))
        keyed = standardizer.transform(hidden) if standardizer is not None else hidden
        if self.names is None:
            from serving.compensation import BucketNames

            self.names = BucketNames(self.keys, self.lsh)
        c = self.cfg
        e_hat, _ = await read_estimates(self.redis, self.keys, self.lsh, keyed, probs, gamma=c.gamma, prior=c.prior,
                                        half_life_s=c.half_life_s, now=now, names=self.names)
        return e_hat

    async def write(self, labelled: list[Interaction], probs: np.ndarray, hidden: np.ndarray,
                    standardizer: HiddenStandardizer | None) -> int:
        """Store the served ``probs``/``hidden`` of labelled interactions (the trainer's one forward pass)."""
        if not labelled:
            return 0
        if self.lsh is None:
            self.lsh = RandomProjectionLSH(dim=hidden.shape[1], n_tables=self.cfg.n_tables, n_bits=self.cfg.n_bits,
                                           seed=self.cfg.seed, version=self.generation)
        if standardizer is not None:
            hidden = standardizer.transform(hidden)
        await write_errors(self.redis, self.keys, self.lsh, labelled, probs, hidden,
                           capacity=self.cfg.bucket_capacity, ttl_s=self.cfg.ttl_s)
        return len(labelled)
