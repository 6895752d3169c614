"""The wide layer's learning at ingest: each labelled event steps the per-event FTRL once.

Why at ingest: the ingest worker that owns the user's partition sees the user's events in order
and within ~0.1-0.4 s (``benchmarks/freshness.py``), so the next request of the same session is
scored by a state that has learned the previous event, which the micro-batched DSL cannot offer.

Per batch: compute each labelled event's inputs as serving computed them when it was served (the
DSL logit of the newest published snapshot; the memories' estimates from entries of strictly
earlier events, ``ServedErrorMemories.estimates_before``; the user's stored TPP propensity, which
the propensity writer refreshes only after this one), read ``(z, n)`` of every feature the batch
touches and which events every slot already learned, step the FTRL event by event in event order
on that local view (a later event of the batch sees the earlier ones), then add each event's
deltas (``storage/wide.py`` adds them once per event and slot). Before the first snapshot (or
with the DSL off) the offset is ``serving.cold_start_base`` and the memories and TPP say nothing,
as in serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from driftrec.contract.events import Event
from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.fusion import tpp_log_ratios
from driftrec.models.wide import REAL_FEATURES, FTRLParams, WideFTRL, features, offset_logit, term_inputs
from driftrec.storage.client import mget
from driftrec.storage.error_memory import ServedErrorMemories
from driftrec.storage.event_state import StateKeys
from driftrec.storage.wide import WideStore, WideUpdate
from driftrec.streams.served_errors import FollowsServedModel, ServedErrorWriter


class WideWriter(FollowsServedModel):
    """Follows the served ``dsl`` snapshot and learns applied labelled events."""

    def __init__(self, redis: Any, settings: Settings, served: ServedErrorWriter | None = None) -> None:
        super().__init__(redis, settings)
        self.settings = settings
        self.served = served  # the batch's served-error writer, whose predictions are reused
        self.store = WideStore(redis, settings.key_prefix, settings.dedup_ttl_s, settings.state_ttl_s)
        self.params = FTRLParams(**settings.wide.ftrl_params())
        self.memories = ServedErrorMemories(redis, settings) if settings.memory.enabled else None
        self.state_keys = StateKeys(settings.key_prefix)

    async def inputs(
        self, events: Sequence[Event], tpp_payloads: dict[str, bytes | None] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per event, as served: the DSL logit (the layer's offset) and the other terms' inputs
        at unit weight (``tpp_payloads``: the users' stored propensities, if already read)."""
        s = self.settings
        n, eps = len(events), s.serving.eps
        zeros = np.zeros(n)
        interactions: list[Interaction] = [e.to_interaction() for e in events]
        shared = self.served
        if shared is not None and shared.model is not None and all(e.event_id in shared.last for e in events):
            # the served-error writer scored these events with the newest snapshot a moment ago
            self.model, self.standardizer, self.version = shared.model, shared.standardizer, shared.version
            probs = np.array([shared.last[e.event_id][0] for e in events])
            hidden = np.stack([shared.last[e.event_id][1] for e in events])
        else:
            await self.refresh()
            if self.model is None:  # nothing served but the cold-start constant; no memory, no category
                base = np.full(n, s.serving.cold_start_base)
                return offset_logit(base, eps), term_inputs(base, zeros, zeros, zeros, eps)
            probs, hidden = self.model.predict_with_hidden(interactions)
        base = probs if s.dsl.enabled else np.full(n, s.serving.cold_start_base)
        e_hat, c_hat = zeros, zeros
        if not s.wide.term_inputs:  # the layer does not use the other terms: nothing to read
            return offset_logit(base, eps), {}
        if self.memories is not None:
            est = await self.memories.estimates_before(interactions, base, hidden, self.standardizer)
            e_hat, c_hat = est.lsh, est.session
        ratios = zeros
        if s.tpp.enabled:
            payloads = tpp_payloads
            if payloads is None:
                users = list(dict.fromkeys(e.user_id for e in events))
                payloads = dict(zip(users, await mget(self.redis, [self.state_keys.user_tpp(u) for u in users])))
            ratios = np.array([self._ratio(payloads.get(e.user_id), e) for e in events])
        return offset_logit(base, eps), term_inputs(base, e_hat, c_hat, ratios, eps)

    def _ratio(self, payload: bytes | None, event: Event) -> float:
        """The TPP log ratio at unit weight, clipped as serving clips the term."""
        s = self.settings.serving
        try:
            f = tpp_log_ratios(payload, [event.category], event.ts, tau_s=s.tpp_tau_s)
        except (ValueError, TypeError):
            return 0.0  # an unreadable propensity is no propensity (serving counts it)
        return float(np.clip(f[0], -s.tpp_clip, s.tpp_clip))

    async def write(self, events: Sequence[Event]) -> int:
        """Learn the labelled ``events`` not learned before; returns how many were new."""
        labelled = sorted((e for e in events if e.label is not None), key=lambda e: e.ts)
        if not labelled:
            return 0
        feats = {e.event_id: [*features(e.user_id, e.item_id, e.category), *REAL_FEATURES] for e in labelled}
        s = self.settings
        users = list(dict.fromkeys(e.user_id for e in labelled)) if s.tpp.enabled and s.wide.term_inputs else []
        learned, stored, raw = await self.store.lookup(
            [(e.event_id, e.user_id, feats[e.event_id]) for e in labelled], [self.state_keys.user_tpp(u) for u in users]
        )
        todo = [e for e in labelled if e.event_id not in learned]
        if not todo:
            return 0
        dsl_logits, terms = await self.inputs(todo, dict(zip(users, raw)) if users else None)
        # one local view: the per-user features carry the user in their name, so a flat dict holds
        # all (read for the whole batch: an event already learned shares its features or adds none)
        ftrl = WideFTRL(self.params, {f: zn for (_, f), zn in stored.items()})
        updates = []
        for k, e in enumerate(todo):
            row = {f: float(column[k]) for f, column in terms.items()}
            step = ftrl.learn_one(e.user_id, e.item_id, e.category, int(e.label or 0), float(dsl_logits[k]), row)
            updates.append(WideUpdate(e.event_id, e.user_id, step.deltas, feats[e.event_id]))
        return await self.store.add(updates)
