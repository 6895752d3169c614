"""The TPP lineage's learner: PromptTPP learns live per-user event sequences in stream periods.

It is driven by ``streams.lineage.LineageRunner`` (one active trainer of the ``tpp`` lineage,
every event delivered once by offsets), which calls ``handle`` per micro-batch:

1. **Sequences.** A user's sequence is read from the ingest role's ``user_seq`` ZSET (shared by
   all workers) and united, by event id, with the batch's own events of that user: the trainer
   and ingest consume the same topic independently, so ingest may not have written this batch
   yet (``streams.propensity.user_sequences``). Category -> type id through the lineage's one
   ``TypeVocabulary`` (first-seen order, overflow id past ``n_types - 1`` categories).
2. **Learning.** Users with events in the batch have their window (newest ``max_seq_len``
   events) learned: one pass of minibatch Adam, at most ``train_seqs_per_batch`` windows per
   batch (users with the most new events first, then by id). Windows of a user overlap from
   batch to batch, i.e. recent history is re-scored as context the way a sliding-window trainer
   does; nothing older than a user's own window is ever kept, so there is no replay buffer of
   past periods. Users beyond the cap are learned the next time they get new events.
3. **Periods.** Every ``period_events`` events is one period of the PromptTPP protocol:
   ``end_period()`` (which, after the first one, freezes the query function) then
   ``start_period()``. No task id is needed at inference: retrieval is data-driven.
4. **Snapshots.** Model + vocabulary + counters are the parts of each ``tpp`` snapshot; one is
   due every ``snapshot_every_steps`` steps, every ``snapshot_every_s`` seconds and at each
   period boundary.

Per-user propensities are *not* written here: the ingest role, which owns the user's partition,
computes them from the newest ``tpp`` snapshot right after it applies the user's events
(``streams.propensity``), so every worker serves the one lineage's model.

Why the CPU work runs in a thread (``asyncio.to_thread``): learning is synchronous torch code;
off the event loop the process keeps heart-beating and renewing its lease while a batch is
learned, and the per-batch caps bound how long one batch takes (the handler is awaited, so
batches never overlap and the model is never touched by two threads).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict

import numpy as np
import orjson
import torch
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.prompt_tpp import PromptTPP, TypeVocabulary
from driftrec.models.tpp import EventSeq
from driftrec.storage.event_state import StateKeys
from driftrec.streams.propensity import encode_sequence, user_sequences

log = logging.getLogger(__name__)


class TPPLearner:
    """Stateful batch handler for the ``tpp`` agent (see the module docstring)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.cfg = settings.tpp
        self.state_keys = StateKeys(settings.key_prefix)
        self.model: PromptTPP | None = None
        self.vocab = TypeVocabulary(self.cfg.n_types)
        self.steps = 0  # Adam steps taken; the ``version`` written with every propensity
        self.period = 0  # periods completed
        self.events_in_period = 0
        self.events_learned = 0
        self.snapshot_version: int | None = None
        self.steps_since_publish = 0
        self.periods_since_publish = 0
        self.last_publish = time.monotonic()

    # -- model lifecycle ---------------------------------------------------------------------
    def _new_model(self) -> PromptTPP:
        c = self.cfg
        return PromptTPP(
            c.n_types,
            hidden=c.hidden,
            pool_size=c.pool_size,
            top_n=c.top_n,
            prompt_len=c.prompt_len,
            key_weight=c.key_weight,
            freeze=c.freeze,
            lr=c.lr,
            batch_size=c.batch_size,
            seed=c.seed,
        )

    def restore(self, parts: dict[str, bytes] | None) -> None:
        """Continue the lineage from a snapshot's parts, or start a fresh model (``None``)."""
        torch.set_num_threads(1)
        if parts is not None and "model" in parts:
            model = PromptTPP.from_bytes(parts["model"])
            assert isinstance(model, PromptTPP)
            self.model = model
            self.vocab = TypeVocabulary.from_bytes(parts["vocab"])
            meta = orjson.loads(parts.get("meta", b"{}"))
            self.steps = int(meta.get("steps", 0))
            self.period = int(meta.get("period", 0))
            self.events_in_period = int(meta.get("events_in_period", 0))
            self.events_learned = int(meta.get("events_learned", 0))
            log.info("tpp resumed (step %d, period %d)", self.steps, self.period)
        else:
            self.model = self._new_model()
            self.model.start_period()

    def ensure_model(self) -> PromptTPP:
        if self.model is None:
            self.restore(None)
        assert self.model is not None
        return self.model

    def due(self) -> bool:
        return bool(self.periods_since_publish) or (
            self.steps_since_publish >= self.cfg.snapshot_every_steps
            or time.monotonic() - self.last_publish >= self.cfg.snapshot_every_s
        )

    async def snapshot_parts(self) -> dict[str, bytes]:
        """Model + vocabulary + counters: the parts of the next ``tpp`` snapshot."""
        model = self.ensure_model()
        meta = {
            "steps": self.steps,
            "period": self.period,
            "events_in_period": self.events_in_period,
            "events_learned": self.events_learned,
            "n_categories": len(self.vocab),
        }
        blob = await asyncio.to_thread(model.to_bytes)
        return {"model": blob, "vocab": self.vocab.to_bytes(), "meta": orjson.dumps(meta)}

    def published(self, version: int) -> None:
        self.snapshot_version = version
        self.steps_since_publish = 0
        self.periods_since_publish = 0
        self.last_publish = time.monotonic()

    # -- stream side ------------------------------------------------------------------------
    def _learn(self, model: PromptTPP, seqs: list[EventSeq]) -> int:
        """One pass over ``seqs`` (already capped); returns the Adam steps taken."""
        trainable = [s for s in seqs if len(s[0]) >= 2]
        if not trainable:
            return 0
        if model.time_scale is None:
            # Fit the time unit here rather than in the model: a first batch of same-second events
            # (ratings imported in bulk) would otherwise make it ~0 and every later gap enormous.
            gaps = np.concatenate([np.diff(t) for t, _ in trainable])
            model.time_scale = max(float(gaps.mean()), self.cfg.min_time_scale_s)
        model.learn_many(trainable, epochs=1)
        return math.ceil(len(trainable) / model.batch_size)

    def _compute(self, model: PromptTPP, train: list[EventSeq], n_fresh: int) -> tuple[int, int]:
        """The CPU part of a batch (runs in a thread): learn, then advance periods."""
        steps = self._learn(model, train)
        ended = 0
        self.events_in_period += n_fresh
        while self.events_in_period >= self.cfg.period_events:
            model.end_period()
            model.start_period()
            self.events_in_period -= self.cfg.period_events
            ended += 1
        return steps, ended

    async def handle(self, events: list[Event]) -> int:
        """Learn a micro-batch (each event delivered once by the lineage runner); returns its size."""
        if not events:
            return 0
        model = self.ensure_model()
        fresh = list({e.event_id: e for e in events}.values())
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in fresh:
            by_user[e.user_id].append(e)
        seqs = await user_sequences(self.redis, self.state_keys, by_user, self.cfg.max_seq_len)
        fresh_count = {u: len(evs) for u, evs in by_user.items()}
        # ids are assigned in batch order, so the vocabulary is the same on every replay of the stream
        for e in fresh:
            self.vocab.add(e.category)
        learn_users = sorted(fresh_count, key=lambda u: (-fresh_count[u], u))[: self.cfg.train_seqs_per_batch]
        train = [encode_sequence(self.vocab, seqs[u]) for u in learn_users]
        steps, ended = await asyncio.to_thread(self._compute, model, train, len(fresh))
        self.steps += steps
        self.steps_since_publish += steps
        self.periods_since_publish += ended
        self.events_learned += len(fresh)
        self.period += ended
        return len(fresh)
