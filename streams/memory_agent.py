"""The error-memory agent: records the *served* model's errors on labelled events (ReLoop2).

Why the served snapshot and not the trainer's live model: the memory must hold the errors users
actually saw, so the agent scores each batch with the newest published snapshot (the one the
scoring service has loaded) and writes ``y − ŷ`` keyed by LSH codes of its hidden vector.
Until a first snapshot exists nothing is served, so nothing is written. Writes are idempotent
per event id (see ``streams.error_memory``).
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from driftrec.settings import Settings
from models.dsl import SparseScorer
from models.error_memory import RandomProjectionLSH
from streams.error_memory import MemoryKeys, write_errors
from streams.events import Event
from streams.snapshots import SnapshotKeys, latest_version, load_snapshot

log = logging.getLogger(__name__)


class ErrorMemoryWriter:
    """Stateful batch handler for the ``error_memory`` agent."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.snapshot_keys = SnapshotKeys(settings.key_prefix, "dsl")
        m = settings.memory
        self.keys = MemoryKeys.from_settings(settings.key_prefix, settings.dsl.generation, m.n_shards)
        self.scorer: SparseScorer | None = None
        self.lsh: RandomProjectionLSH | None = None
        self.version: int | None = None

    async def _refresh(self) -> None:
        newest = await latest_version(self.redis, self.snapshot_keys)
        if newest is None or newest == self.version:
            return
        snapshot = await load_snapshot(self.redis, self.snapshot_keys)
        if snapshot is None:
            return
        self.version, parts = snapshot
        self.scorer = SparseScorer.from_snapshot(parts["model"])
        if self.lsh is None:
            m = self.settings.memory
            self.lsh = RandomProjectionLSH(dim=self.scorer.hidden, n_tables=m.n_tables, n_bits=m.n_bits,
                                           seed=m.seed, version=self.settings.dsl.generation)

    async def handle(self, events: list[Event]) -> int:
        labelled = [e.to_interaction() for e in events if e.label is not None]
        if not labelled:
            return 0
        await self._refresh()
        if self.scorer is None or self.lsh is None:
            return 0
        probs, hidden = self.scorer.predict_with_hidden(labelled)
        m = self.settings.memory
        await write_errors(self.redis, self.keys, self.lsh, labelled, probs, hidden,
                           capacity=m.bucket_capacity, ttl_s=m.ttl_s)
        return len(labelled)
