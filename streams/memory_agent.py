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

import numpy as np
from redis.asyncio import Redis

from driftrec.settings import Settings
from models.error_memory import HiddenStandardizer, RandomProjectionLSH
from models.interaction import Interaction
from serving.compensation import (  # the scoring service's read path
    BucketNames,
    estimates_from_values,
    plan_session_buckets,
    read_estimates,
)
from streams.error_memory import MemoryKeys, write_errors, write_session_errors

log = logging.getLogger(__name__)


class ErrorMemoryWriter:
    """Writes ``(LSH(hidden), ts, y, ŷ)`` of the served snapshot's predictions for labelled interactions."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.cfg = settings.memory
        self.generation = settings.dsl.generation
        self.keys = MemoryKeys.from_settings(settings.key_prefix, self.generation, self.cfg.n_shards)
        self.lsh: RandomProjectionLSH | None = None
        self.names: BucketNames | None = None  # the read side's key table (estimate_and_write)

    def _keyed(self, hidden: np.ndarray, standardizer: HiddenStandardizer | None) -> np.ndarray:
        """The hidden vectors as the memory hashes them (building the LSH on first use)."""
        if self.lsh is None:
            self.lsh = RandomProjectionLSH(dim=hidden.shape[1], n_tables=self.cfg.n_tables, n_bits=self.cfg.n_bits,
                                           seed=self.cfg.seed, version=self.generation)
        return standardizer.transform(hidden) if standardizer is not None else hidden

    async def write(self, labelled: list[Interaction], probs: np.ndarray, hidden: np.ndarray,
                    standardizer: HiddenStandardizer | None) -> int:
        """Store the served ``probs``/``hidden`` of labelled interactions (the trainer's one forward pass)."""
        if not labelled:
            return 0
        await self._write(labelled, probs, self._keyed(hidden, standardizer))
        return len(labelled)

    async def estimate_and_write(self, labelled: list[Interaction], probs: np.ndarray, hidden: np.ndarray,
                                 standardizer: HiddenStandardizer | None) -> np.ndarray:
        """ê per sample as the scoring service would have read it before these samples, then write
        them (one hashing of the batch for both)."""
        if not labelled:
            return np.zeros(0)
        keyed = self._keyed(hidden, standardizer)
        if self.names is None:
            self.names = BucketNames(self.keys, self.lsh)  # type: ignore[arg-type]
        c = self.cfg
        e_hat, _ = await read_estimates(self.redis, self.keys, self.lsh, keyed, probs,  # type: ignore[arg-type]
                                        gamma=c.gamma, prior=c.prior, half_life_s=c.half_life_s,
                                        now=labelled[-1].ts, names=self.names)
        await self._write(labelled, probs, keyed)
        return e_hat

    async def session_estimate_and_write(self, labelled: list[Interaction], probs: np.ndarray) -> np.ndarray:
        """ĉ per sample from its ``(user, category)`` bucket as the scoring service would have read
        it before these samples, then write them (``models.session_memory``); zeros when off.

        Samples of one batch are estimated before any of them is written, as serving sees them."""
        c = self.cfg
        if not labelled or c.session_capacity <= 0:
            return np.zeros(len(labelled))
        plan = plan_session_buckets(self.keys, [(x.user_id, x.category) for x in labelled])
        e_hat, _ = estimates_from_values(await self.redis.mget(plan.names), plan, probs, gamma=c.session_gamma,
                                         prior=c.prior)
        await write_session_errors(self.redis, self.keys, labelled, probs, capacity=c.session_capacity,
                                   ttl_s=c.ttl_s)
        return e_hat

    async def _write(self, labelled: list[Interaction], probs: np.ndarray, keyed: np.ndarray) -> None:
        await write_errors(self.redis, self.keys, self.lsh, labelled, probs, keyed,  # type: ignore[arg-type]
                           capacity=self.cfg.bucket_capacity, ttl_s=self.cfg.ttl_s)
