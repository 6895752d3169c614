"""The fast path's learning at ingest: each labelled event, as it was served, steps the fusion
layer once and leaves its served error in the memories.

Why at ingest: the worker that owns the user's partition sees her events in order and within
~0.1-0.4 s (``benchmarks/freshness.py``), so the next request of the same session is scored by a
state that has learned the previous event -- which the micro-batched DSL cannot offer -- and
ReLoop2's fast loop does not wait for the slow one.

Per batch, for the labelled events not learned before (in event order):

1. follow the newest published ``dsl`` snapshot (one GET of ``latest`` per batch; the blob only
   when it moved) and score the events with it: the DSL probability and hidden vector that
   served them (the trainer publishes a snapshot only after learning what it holds);
2. one round trip: which events the layer already learned, the ``(z, n)`` of every feature the
   batch touches, and the users' stored TPP propensities (the propensity writer refreshes them
   only after this writer); a second: what both memories held for each event *before* it
   (``ServedErrorMemories.sums_before``: entries of strictly earlier events, the LSH memory's
   hashed by each key snapshot serving reads, ``storage/served_memory.py``);
3. event by event, on a local view of the layer (a later event of the batch sees the earlier
   ones): the served terms by ``models.served.assemble`` -- the one rule the scorer uses -- and
   one FTRL step on them;
4. write each event's served error ``(ts, y, pre)`` into the memories (the LSH one under the
   current key snapshot), where ``pre`` is the score
   served before the memories' correction, then add the layer's deltas (``storage/wide.py``,
   once per event and slot). Both writes are idempotent per event id, and the memories go first,
   so a crash between them re-learns the event and rewrites nothing.

Before the first snapshot (or with the DSL off) ``base`` is ``serving.cold_start_base`` and there
is no hidden vector, so the memories are neither read nor written, as in serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from driftrec.contract.events import Event
from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import HiddenStandardizer
from driftrec.models.fusion import tpp_log_ratios
from driftrec.models.served import REAL_FEATURES, TERM_FEATURES, TermWeights, assemble
from driftrec.models.wide import FTRLParams, WideFTRL, features
from driftrec.storage.event_state import StateKeys
from driftrec.storage.served_memory import Keyed, KeyView, KeyViews, MemorySums, ServedErrorMemories
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot
from driftrec.storage.wide import WideStore, WideUpdate

log = logging.getLogger(__name__)


class FollowsServedModel:
    """Holds the newest published ``dsl`` snapshot's model, hidden statistics and the memory's key
    views (``storage/served_memory.py``), as serving does."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.snap_keys = SnapshotKeys(settings.key_prefix, "dsl")
        self.model: SparseScorer | None = None
        self.standardizer: HiddenStandardizer | None = None
        self.version: int | None = None
        self.key_views: tuple[KeyView, ...] = ()
        self._views = KeyViews(redis, settings)

    async def refresh(self) -> None:
        """Load the newest ``dsl`` snapshot if ``latest`` moved since the last batch."""
        found = await load_snapshot(self.redis, self.snap_keys, newer_than=self.version)
        if found is None or "model" not in found[1]:
            return
        version, parts = found
        self.model = await asyncio.to_thread(SparseScorer.from_bytes, parts["model"])
        stats = parts.get("hidden_stats")
        self.standardizer = HiddenStandardizer.from_bytes(stats) if stats else None
        self.key_views = await self._views.resolve(version, parts, self.model, self.standardizer)
        self.version = version

    def keyed(self, interactions: Sequence[Interaction], hidden: np.ndarray) -> list[Keyed]:
        """The samples hashed in each key view's space (the served model's ``hidden`` reused
        where the served snapshot is the key itself)."""
        return [
            (view, view.keyed(hidden) if view.version == self.version else view.of_interactions(interactions))
            for view in self.key_views
        ]


class FusionWriter(FollowsServedModel):
    """Learns the fusion layer from applied labelled events and writes their served errors."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        super().__init__(redis, settings)
        self.settings = settings
        self.store = WideStore(redis, settings.key_prefix, settings.dedup_ttl_s, settings.state_ttl_s)
        self.params = FTRLParams(**settings.wide.ftrl_params())
        self.memories = ServedErrorMemories(redis, settings) if settings.memory.enabled else None
        self.state_keys = StateKeys(settings.key_prefix)

    def _features(self, e: Event) -> list[str]:
        ids = features(e.user_id, e.item_id, e.category) if self.settings.wide.enabled else []
        return [*ids, *REAL_FEATURES]

    def _ratio(self, payload: bytes | None, event: Event) -> float | None:
        """The TPP log ratio at unit weight, clipped as serving clips it (None: no propensity)."""
        if payload is None or not event.category:
            return None
        s = self.settings.serving
        try:
            f = tpp_log_ratios(payload, [event.category], event.ts, tau_s=s.tpp_tau_s)
        except (ValueError, TypeError):
            return None  # an unreadable propensity is no propensity (serving counts it)
        return float(np.clip(f[0], -s.tpp_clip, s.tpp_clip))

    async def write(self, events: Sequence[Event]) -> int:
        """Learn the labelled ``events`` not learned before; returns how many were new."""
        labelled = sorted((e for e in events if e.label is not None), key=lambda e: e.ts)
        if not labelled:
            return 0
        s = self.settings
        feats = {e.event_id: self._features(e) for e in labelled}
        users = list(dict.fromkeys(e.user_id for e in labelled)) if s.tpp.enabled else []
        learned, stored, raw = await self.store.lookup(
            [(e.event_id, e.user_id, feats[e.event_id]) for e in labelled], [self.state_keys.user_tpp(u) for u in users]
        )
        todo = [e for e in labelled if e.event_id not in learned]
        if not todo:
            return 0
        payloads = dict(zip(users, raw))
        await self.refresh()
        n, eps = len(todo), s.serving.eps
        interactions = [e.to_interaction() for e in todo]
        hidden: np.ndarray | None = None
        base = np.full(n, s.serving.cold_start_base)
        if self.model is not None and (s.dsl.enabled or self.memories is not None):
            probs, hidden = self.model.predict_with_hidden(interactions)
            if s.dsl.enabled:
                base = np.asarray(probs, dtype=np.float64)
        sums: MemorySums | None = None
        keyed: list[Keyed] = []
        if self.memories is not None and hidden is not None:
            keyed = self.keyed(interactions, hidden)
            sums = await self.memories.sums_before(interactions, keyed)
        # one local view: the per-user features carry the user in their name, so a flat dict holds all
        ftrl = WideFTRL(self.params, {f: zn for (_, f), zn in stored.items()}, ids=s.wide.enabled)
        pre = np.empty(n)
        updates = []
        for k, e in enumerate(todo):
            weight = {f: ftrl.weight(f) for f in feats[e.event_id]}
            ids = sum(w for f, w in weight.items() if f not in REAL_FEATURES)
            ratio = self._ratio(payloads.get(e.user_id), e) if s.tpp.enabled else None
            terms = assemble(
                base[k : k + 1],
                np.array([ids]),
                TermWeights.of(weight),
                eps,
                tpp_ratio=None if ratio is None else np.array([ratio]),
                memory=sums.lsh.take([k]).estimate if sums is not None and sums.lsh is not None else None,
                session=sums.session.take([k]).estimate if sums is not None and sums.session is not None else None,
            )
            pre[k] = terms.pre[0]
            row = {f: float(terms.inputs[f][0]) for f in TERM_FEATURES}
            dsl_logit = float(terms.inputs[REAL_FEATURES[0]][0])
            # the served score is the layer's own prediction for these inputs: not summed again
            served = float(terms.score[0])
            step = ftrl.learn_one(
                e.user_id, e.item_id, e.category, int(e.label or 0), dsl_logit, row, prediction=served
            )
            updates.append(WideUpdate(e.event_id, e.user_id, step.deltas, feats[e.event_id]))
        if self.memories is not None and hidden is not None:
            await self.memories.write(interactions, pre, keyed[0] if keyed else None)
        return await self.store.add(updates)
