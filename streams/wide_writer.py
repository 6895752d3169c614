"""The wide part's learning at ingest: each labelled event steps the per-event FTRL once.

Why at ingest: the ingest worker that owns the user's partition sees the user's events in order
and within ~0.1-0.4 s (``benchmarks/freshness.py``), so the next request of the same session is
scored by a state that has learned the previous event, which the micro-batched DSL cannot offer.

Per batch: read ``(z, n)`` of every feature the batch's labelled events touch and which of them
this user's slot already learned (one round trip), step the FTRL event by event in event order on
that local view (a later event of the batch sees the earlier ones), then add each event's deltas
(one round trip; ``storage/wide.py`` adds them once per event). The offset is the DSL logit of the
newest published snapshot, as serving computes it (``serving.cold_start_base`` before the first
snapshot or with the DSL off), so what ingest learns on top of is what serving adds to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.wide import MODEL_FEATURE, FTRLParams, WideFTRL, features, offset_logit
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot
from driftrec.storage.wide import WideStore, WideUpdate


class WideWriter:
    """Follows the served ``dsl`` snapshot (for the offset) and learns applied labelled events."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self.settings = settings
        self.store = WideStore(redis, settings.key_prefix, settings.dedup_ttl_s, settings.state_ttl_s)
        self.params = FTRLParams(**settings.wide.ftrl_params())
        self.redis = redis
        self.snap_keys = SnapshotKeys(settings.key_prefix, "dsl")
        self.model: SparseScorer | None = None
        self.version: int | None = None

    async def refresh(self) -> None:
        """Load the newest ``dsl`` snapshot if ``latest`` moved (one GET while it has not)."""
        if not self.settings.dsl.enabled:
            return
        found = await load_snapshot(self.redis, self.snap_keys, newer_than=self.version)
        if found is None or "model" not in found[1]:
            return
        version, parts = found
        self.model = await asyncio.to_thread(SparseScorer.from_bytes, parts["model"])
        self.version = version

    async def write(self, events: Sequence[Event]) -> int:
        """Learn the labelled ``events`` not learned before; returns how many were new."""
        labelled = sorted((e for e in events if e.label is not None), key=lambda e: e.ts)
        if not labelled:
            return 0
        feats = {e.event_id: [*features(e.user_id, e.item_id, e.category), MODEL_FEATURE] for e in labelled}
        learned = await self.store.applied([(e.event_id, e.user_id, feats[e.event_id]) for e in labelled])
        todo = [e for e in labelled if e.event_id not in learned]
        if not todo:
            return 0
        await self.refresh()
        eps = self.settings.serving.eps
        if self.model is not None:
            probs, _ = self.model.predict_with_hidden([e.to_interaction() for e in todo])
            offsets = offset_logit(probs, eps)
        else:
            offsets = np.full(len(todo), float(offset_logit(np.array([self.settings.serving.cold_start_base]), eps)[0]))
        wanted = [(e.user_id, f) for e in todo for f in feats[e.event_id]]
        stored = await self.store.read(wanted)
        # one local view per user: the shared features are the same across users, the per-user
        # ones are keyed by the user inside the feature name, so a flat dict holds both
        ftrl = WideFTRL(self.params, {f: zn for (_, f), zn in stored.items()})
        updates = []
        for e, off in zip(todo, offsets):
            step = ftrl.learn_one(e.user_id, e.item_id, e.category, int(e.label or 0), float(off))
            updates.append(WideUpdate(e.event_id, e.user_id, step.deltas, feats[e.event_id]))
        return await self.store.add(updates)
