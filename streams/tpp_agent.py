"""The TPP learner agent: PromptTPP learns live per-user event sequences in stream periods.

What it does with each micro-batch (``TPPLearner.handle``):

1. **Dedup.** Each event id is marked once per user (``SET NX`` on
   ``<prefix>:{u:<user>}:tpp:seen:<event_id>``, the user's hash tag); only first deliveries
   are *fresh*. A redelivered event therefore never triggers a gradient step nor counts toward a
   period, and because sequences are sets keyed by event id it never appears twice in one.
2. **Sequences.** A user's sequence is read from the ingest agent's ``user_seq`` ZSET (so it
   survives restarts and is shared by all workers) and united, by event id, with the batch's
   own events of that user: the learner and ingest consume the same topic independently, so
   ingest may not have written this batch yet. Order is (ts, member bytes), Redis's own ZSET
   order, and only the newest ``max_seq_len`` events are kept. Category -> type id through a
   ``TypeVocabulary`` (first-seen order, overflow id past ``n_types - 1`` categories).
3. **Learning.** Users with fresh events have their window (newest ``max_seq_len`` events)
   learned: one pass of minibatch Adam, at most ``train_seqs_per_batch`` windows per batch
   (users with the most fresh events first, then by id). Windows of a user overlap from batch
   to batch, i.e. recent history is re-scored as context the way a sliding-window trainer does;
   nothing older than a user's own window is ever kept, so there is no replay buffer of past
   periods. Users beyond the cap are learned the next time they get fresh events.
4. **Periods.** Every ``period_events`` fresh events is one period of the PromptTPP protocol:
   ``end_period()`` (which, after the first one, freezes the query function) then
   ``start_period()``. No task id is needed at inference: retrieval is data-driven.
5. **Propensities.** For every user touched by the batch the agent writes, in one key the
   scoring service reads with one GET, ``StateKeys(prefix).user_tpp(user)``::

       {"ts": <time of the user's last event>, "version": <model steps>,
        "probs": {category: lambda_k(ts) / sum_j lambda_j(ts)}, "n_types": K}

   i.e. the probability that the user's next event is of category k, right after their last
   event. The overflow type is left out of ``probs`` (it is not a category), so they sum to
   <= 1. ``version`` is the number of Adam steps the model has taken (persisted in snapshots).
6. **Snapshots.** Model + vocabulary + counters are published with ``publish_snapshot`` under
   ``SnapshotKeys(prefix, "tpp")`` every ``snapshot_every_steps`` steps, every
   ``snapshot_every_s`` seconds and at each period boundary; a restarted worker resumes from
   the newest one (losing at most the steps since it, like the DSL trainer).

Why the CPU work runs in a thread (``asyncio.to_thread``): learning and the propensity forward
passes are synchronous torch code; off the event loop, Faust keeps heart-beating and the other
agents keep consuming while a batch is learned, and the per-batch caps bound how long one
batch takes (the handler is awaited, so batches of this agent never overlap and the model is
never touched by two threads).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import torch
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.prompt_tpp import PromptTPP, TypeVocabulary
from driftrec.models.tpp import EventSeq
from driftrec.storage.event_state import StateKeys, sequence_member
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot, publish_snapshot

log = logging.getLogger(__name__)


@dataclass
class UserSequence:
    """One user's recent events, oldest first: times (Unix s) and category names."""

    times: list[float]
    categories: list[str | None]

    @property
    def last_ts(self) -> float:
        return self.times[-1]


class TPPLearner:
    """Stateful batch handler for the ``tpp`` agent (see the module docstring)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.cfg = settings.tpp
        self.state_keys = StateKeys(settings.key_prefix)
        self.snap_keys = SnapshotKeys(settings.key_prefix, "tpp")
        self.model: PromptTPP | None = None
        self.vocab = TypeVocabulary(self.cfg.n_types)
        self.steps = 0  # Adam steps taken; the ``version`` written with every propensity
        self.period = 0  # periods completed
        self.events_in_period = 0
        self.events_learned = 0
        self.snapshot_version: int | None = None
        self.steps_since_publish = 0
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

    async def ensure_model(self) -> PromptTPP:
        """The model, resumed from the newest ``tpp`` snapshot on first use."""
        if self.model is None:
            torch.set_num_threads(1)
            snapshot = await load_snapshot(self.redis, self.snap_keys)
            if snapshot is not None and "model" in snapshot[1]:
                self.snapshot_version, parts = snapshot
                model = PromptTPP.from_bytes(parts["model"])
                assert isinstance(model, PromptTPP)
                self.model = model
                self.vocab = TypeVocabulary.from_bytes(parts["vocab"])
                meta = orjson.loads(parts.get("meta", b"{}"))
                self.steps = int(meta.get("steps", 0))
                self.period = int(meta.get("period", 0))
                self.events_in_period = int(meta.get("events_in_period", 0))
                self.events_learned = int(meta.get("events_learned", 0))
                log.info(
                    "tpp resumed from snapshot v%s (step %d, period %d)", self.snapshot_version, self.steps, self.period
                )
            else:
                self.model = self._new_model()
                self.model.start_period()
        return self.model

    async def publish(self) -> int:
        """Publish model + vocabulary + counters as the next ``tpp`` snapshot version."""
        model = await self.ensure_model()
        meta = {
            "steps": self.steps,
            "period": self.period,
            "events_in_period": self.events_in_period,
            "events_learned": self.events_learned,
            "n_categories": len(self.vocab),
        }
        blob = await asyncio.to_thread(model.to_bytes)
        parts = {"model": blob, "vocab": self.vocab.to_bytes(), "meta": orjson.dumps(meta)}
        self.snapshot_version = await publish_snapshot(self.redis, self.snap_keys, parts)
        self.steps_since_publish = 0
        self.last_publish = time.monotonic()
        return self.snapshot_version

    # -- stream side ------------------------------------------------------------------------
    def _seen_key(self, event: Event) -> str:
        return f"{self.settings.key_prefix}:{{u:{event.user_id}}}:tpp:seen:{event.event_id}"

    async def _fresh(self, events: Sequence[Event]) -> list[Event]:
        """Mark each event id once; only first deliveries are returned."""
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.set(self._seen_key(event), 1, nx=True, ex=self.settings.dedup_ttl_s)
        marked = await pipe.execute()
        return [e for e, fresh in zip(events, marked) if fresh]

    async def _sequences(self, by_user: dict[str, list[Event]]) -> dict[str, UserSequence]:
        """Each user's newest ``max_seq_len`` events: Redis ``user_seq`` united with the batch."""
        pipe = self.redis.pipeline(transaction=False)
        users = sorted(by_user)
        for user in users:
            pipe.zrange(self.state_keys.user_seq(user), 0, -1, withscores=True)
        rows = await pipe.execute()
        out: dict[str, UserSequence] = {}
        for user, stored in zip(users, rows):
            entries: dict[str, tuple[float, bytes, str | None]] = {}
            for member, ts in stored:
                category, _kind, event_id = orjson.loads(member)
                entries[event_id] = (float(ts), bytes(member), category or None)
            for e in by_user[user]:
                entries.setdefault(e.event_id, (e.ts, sequence_member(e), e.category))
            ordered = sorted(entries.values(), key=lambda r: (r[0], r[1]))[-self.cfg.max_seq_len :]
            out[user] = UserSequence([r[0] for r in ordered], [r[2] for r in ordered])
        return out

    def _encode(self, seq: UserSequence, assign: bool) -> EventSeq:
        ids = [self.vocab.add(c) if assign else self.vocab.lookup(c) for c in seq.categories]
        return np.asarray(seq.times, dtype=np.float64), np.asarray(ids, dtype=np.int64)

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

    def _compute(
        self, model: PromptTPP, train: list[EventSeq], score: list[EventSeq], n_fresh: int
    ) -> tuple[int, int, np.ndarray]:
        """The CPU part of a batch (runs in a thread): learn, advance periods, then score."""
        steps = self._learn(model, train)
        ended = 0
        self.events_in_period += n_fresh
        while self.events_in_period >= self.cfg.period_events:
            model.end_period()
            model.start_period()
            self.events_in_period -= self.cfg.period_events
            ended += 1
        return steps, ended, model.intensity_many(score)

    async def handle(self, events: list[Event]) -> int:
        """Learn a micro-batch and refresh the touched users' propensities; returns fresh events."""
        if not events:
            return 0
        model = await self.ensure_model()
        unique = list({e.event_id: e for e in events}.values())
        fresh = await self._fresh(unique)
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in unique:
            by_user[e.user_id].append(e)
        seqs = await self._sequences(by_user)

        fresh_count: dict[str, int] = defaultdict(int)
        for e in fresh:
            fresh_count[e.user_id] += 1
        # Ids are assigned for fresh events only, in batch order, so a redelivery cannot reorder
        # the vocabulary; everything else is looked up.
        for e in fresh:
            self.vocab.add(e.category)
        learn_users = sorted(fresh_count, key=lambda u: (-fresh_count[u], u))[: self.cfg.train_seqs_per_batch]
        train = [self._encode(seqs[u], assign=False) for u in learn_users]
        users = sorted(seqs)
        score = [self._encode(seqs[u], assign=False) for u in users]

        steps, ended, lam = await asyncio.to_thread(self._compute, model, train, score, len(fresh))
        self.steps += steps
        self.steps_since_publish += steps
        self.events_learned += len(fresh)
        self.period += ended
        await self._write_propensities(users, seqs, lam)
        if ended or (
            self.steps_since_publish
            and (
                self.steps_since_publish >= self.cfg.snapshot_every_steps
                or time.monotonic() - self.last_publish >= self.cfg.snapshot_every_s
            )
        ):
            await self.publish()
        return len(fresh)

    def propensity_record(
        self, seq: UserSequence, lam: np.ndarray, names: list[str] | None = None
    ) -> dict[str, object]:
        """The JSON object stored at ``user_tpp``: next-category probabilities at the last event."""
        total = float(lam.sum())
        names = names or self.vocab.names()
        probs = {names[k]: float(lam[k] / total) for k in range(len(self.vocab))} if total > 0 else {}
        return {"ts": seq.last_ts, "version": self.steps, "probs": probs, "n_types": self.vocab.n_types}

    async def _write_propensities(self, users: list[str], seqs: dict[str, UserSequence], lam: np.ndarray) -> None:
        pipe = self.redis.pipeline(transaction=False)
        names = self.vocab.names()
        for user, row in zip(users, lam):
            pipe.set(self.state_keys.user_tpp(user), orjson.dumps(self.propensity_record(seqs[user], row, names)))
        await pipe.execute()
