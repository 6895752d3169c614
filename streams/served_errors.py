"""The fast path: each labelled event's served error, written into the memories at ingest.

ReLoop2's split is a slow loop (the model's gradient steps) and a fast loop (the error memory),
and the fast loop is only fast if it does not wait for the slow one. So the memories are written
here, by the ingest worker that owns the user's partition, within the batch that applies the event
to the user's state — not by the trainer once per micro-batch. An event's error is visible to
``/v1/score`` as soon as ingest has taken it in (``benchmarks/freshness.py`` measures how soon).

Which prediction: the error a user's request saw is the one of the snapshot serving had loaded,
so ingest follows the newest published ``dsl`` snapshot (its ``latest`` pointer is read on every
batch, one GET; the model is reloaded only when it moves) and scores the batch's labelled events
with it before writing ``(ts, y, ŷ)``. The trainer no longer writes the memories; it reads them
*as of* each event (``ServedErrorMemories.estimates_before``: entries of strictly earlier events
only) to learn the fusion weights, so it does not matter whether ingest got there first.

Writes are idempotent per event id (a redelivered batch changes nothing). Until the first
snapshot is published nothing is written: there is no served prediction to take an error from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import HiddenStandardizer
from driftrec.storage.error_memory import ServedErrorMemories
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot

log = logging.getLogger(__name__)


class FollowsServedModel:
    """Holds the newest published ``dsl`` snapshot's model and hidden statistics, as serving does."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.snap_keys = SnapshotKeys(settings.key_prefix, "dsl")
        self.model: SparseScorer | None = None
        self.standardizer: HiddenStandardizer | None = None
        self.version: int | None = None

    async def refresh(self) -> None:
        """Load the newest ``dsl`` snapshot if ``latest`` moved since the last batch."""
        # one GET of ``latest`` while it has not moved; the blob only when it has
        found = await load_snapshot(self.redis, self.snap_keys, newer_than=self.version)
        if found is None or "model" not in found[1]:
            return
        version, parts = found
        self.model = await asyncio.to_thread(SparseScorer.from_bytes, parts["model"])
        stats = parts.get("hidden_stats")
        self.standardizer = HiddenStandardizer.from_bytes(stats) if stats else None
        self.version = version


class ServedErrorWriter(FollowsServedModel):
    """Follows the served ``dsl`` snapshot and records the served errors of applied events."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        super().__init__(redis, settings)
        self.memories = ServedErrorMemories(redis, settings)
        # the last batch's predictions by event id (the wide layer's writer reuses them)
        self.last: dict[str, tuple[float, np.ndarray]] = {}

    async def write(self, events: Sequence[Event]) -> int:
        """Write the served errors of the labelled ``events`` (call once ingest applied them);
        returns how many were scored (0 before the first snapshot)."""
        labelled = [e.to_interaction() for e in events if e.label is not None]
        if not labelled:
            return 0
        await self.refresh()
        if self.model is None:
            return 0
        probs, hidden = self.model.predict_with_hidden(labelled)
        self.last = {x.event_id: (float(p), h) for x, p, h in zip(labelled, probs, hidden) if x.event_id}
        await self.memories.write(labelled, probs, hidden, self.standardizer)
        return len(labelled)
