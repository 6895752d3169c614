"""The DSL trainer: learns from the stream in micro-batches and publishes versioned snapshots.

Why resume from the newest snapshot: a restarted worker continues the model it served instead
of starting over, so a crash costs at most the steps since the last snapshot (every
``snapshot_every_steps`` steps or ``snapshot_every_s`` seconds, whichever comes first).
Redelivered events are not learned twice: each event id is marked once (SET NX) before its
gradient step. With the error memory on, the errors of the *served* snapshot on each fresh batch
are written before the step (see ``streams.memory_agent`` for why here), after the memory's
estimate for them has taught the memory's λ (``models.fusion.MemoryLambda``); the session
memory's ``(user, category)`` buckets are read, taught μ, and written the same way.

Implicit feedback: an event with a label trains on that label; an unlabelled ``click`` /
``purchase`` / ``cart`` / ``fav`` is a positive and gets ``negatives`` sampled items from the
recent item pool as negatives; a bare ``impression`` without a label teaches nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import orjson
import torch
from redis.asyncio import Redis

from driftrec.settings import Settings
from models.dsl import DSLRecommender, SparseScorer, sample_negatives
from models.error_memory import HiddenStandardizer
from models.fusion import MemoryLambda, TPPWeight, read_fusion, tpp_log_ratios
from models.interaction import Interaction
from streams.events import Event
from streams.memory_agent import ErrorMemoryWriter
from streams.snapshots import SnapshotKeys, load_snapshot, publish_snapshot
from streams.state import StateKeys

log = logging.getLogger(__name__)
POSITIVE_KINDS = {"click", "purchase", "cart", "fav", "buy"}
DEDUP_TTL_S = 7 * 24 * 3600


def training_examples(events: Sequence[Event], rng: np.random.Generator, item_pool: Sequence[str],
                      negatives: int) -> list[Interaction]:
    """Turn contract events into labelled interactions (see the module docstring for the rule)."""
    out: list[Interaction] = []
    for event in events:
        x = event.to_interaction()
        if x.label is not None:
            out.append(x)
        elif x.kind in POSITIVE_KINDS:
            out.append(replace(x, label=1))
            if item_pool:
                out.extend(sample_negatives(x, negatives, rng, item_pool, exclude={x.item_id}))
    return out


class DSLTrainer:
    """Stateful batch handler for the ``trainer`` agent."""

    def __init__(self, redis: Redis, settings: Settings, negatives: int = 4) -> None:
        self.redis = redis
        self.settings = settings
        self.cfg = settings.dsl
        self.keys = SnapshotKeys(settings.key_prefix, "dsl")
        self.seen_prefix = f"{settings.key_prefix}:dsl:g{self.cfg.generation}:seen:"
        self.negatives = negatives
        self.rng = np.random.default_rng(self.cfg.seed)
        self.model: DSLRecommender | None = None
        self.served: SparseScorer | None = None  # what the scoring service has loaded: the last publish
        self.standardizer: HiddenStandardizer | None = None  # the served snapshot's hidden statistics
        self.recent: deque[Interaction] = deque(maxlen=2000)  # to fit those statistics at publish
        self.memory = ErrorMemoryWriter(redis, settings) if settings.memory.enabled else None
        sv, mem = settings.serving, settings.memory
        self.fusion = TPPWeight(w=sv.tpp_weight, clip=sv.tpp_clip) if sv.learn_tpp_weight and settings.tpp.enabled \
            else None
        self.memory_lambda = MemoryLambda(lam=mem.lambda_, eps=sv.eps) if mem.enabled and mem.learn_lambda else None
        self.session_lambda = MemoryLambda(lam=mem.session_lambda, eps=sv.eps, key="session") \
            if mem.enabled and mem.learn_lambda and mem.session_capacity > 0 else None
        self.state_keys = StateKeys(settings.key_prefix)
        self.catalog: dict[str, str] = {}
        self.item_pool: deque[str] = deque(maxlen=5000)
        self.version: int | None = None
        self.steps_since_publish = 0
        self.last_publish = time.monotonic()

    async def _ensure_model(self) -> DSLRecommender:
        if self.model is None:
            torch.set_num_threads(1)
            snapshot = await load_snapshot(self.redis, self.keys)
            if snapshot is not None and "model" in snapshot[1]:
                self.version, parts = snapshot
                self.model = DSLRecommender.from_snapshot(parts["model"])
                self.served = SparseScorer.from_snapshot(parts["model"])
                if "hidden_stats" in parts:
                    self.standardizer = HiddenStandardizer.from_bytes(parts["hidden_stats"])
                fusion = read_fusion(parts.get("fusion"))
                if self.fusion is not None:
                    self.fusion = TPPWeight.from_dict(fusion, clip=self.fusion.clip) or self.fusion
                if self.memory_lambda is not None:
                    learned = MemoryLambda.from_dict(fusion, eps=self.memory_lambda.eps)
                    self.memory_lambda = learned or self.memory_lambda
                if self.session_lambda is not None:
                    learned = MemoryLambda.from_dict(fusion, key="session", eps=self.session_lambda.eps)
                    self.session_lambda = learned or self.session_lambda
                self.catalog = orjson.loads(parts.get("catalog", b"{}"))
                log.info("trainer resumed from snapshot v%s (step %d)", self.version, self.model.step)
            else:
                c = self.cfg
                self.model = DSLRecommender(n_rows=c.n_rows, dim=c.dim, density=c.density, lr=c.lr, seed=c.seed)
        return self.model

    async def _new_events(self, events: Sequence[Event]) -> list[Event]:
        """Mark each event id once; only first deliveries are learned."""
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.set(self.seen_prefix + event.event_id, 1, nx=True, ex=DEDUP_TTL_S)
        marked = await pipe.execute()
        return [e for e, fresh in zip(events, marked) if fresh]

    async def handle(self, events: list[Event]) -> int:
        if not events:
            return 0
        model = await self._ensure_model()
        fresh = await self._new_events(events)
        for e in fresh:
            if e.category:
                self.catalog[e.item_id] = e.category
        labelled = [e for e in fresh if e.label is not None]
        if self.served is not None and labelled and (self.memory is not None or self.fusion is not None):
            # test-then-train: what the served snapshot predicted, before the model learns the batch
            # (one forward pass feeds both the error memory and the TPP weight)
            interactions = [e.to_interaction() for e in labelled]
            probs, hidden = self.served.predict_with_hidden(interactions)
            labels = np.array([e.label for e in labelled], dtype=np.float64)
            if self.memory is not None and self.memory_lambda is not None:
                # what the memory said before it hears of these events teaches λ
                e_hat = await self.memory.estimate_and_write(interactions, probs, hidden, self.standardizer)
                self.memory_lambda.learn_many(probs, e_hat, labels)
            elif self.memory is not None:
                await self.memory.write(interactions, probs, hidden, self.standardizer)
            if self.memory is not None:
                c_hat = await self.memory.session_estimate_and_write(interactions, probs)
                if self.session_lambda is not None:
                    self.session_lambda.learn_many(probs, c_hat, labels)
            if self.fusion is not None:
                await self._learn_tpp_weight(labelled, probs)
        examples = training_examples(fresh, self.rng, list(self.item_pool), self.negatives)
        self.item_pool.extend(e.item_id for e in fresh)
        self.recent.extend(x for x in examples if x.label is not None)
        batch = self.cfg.batch_size
        for start in range(0, len(examples), batch):
            model.learn_many(examples[start:start + batch])
            self.steps_since_publish += 1
        if self.steps_since_publish and (self.steps_since_publish >= self.cfg.snapshot_every_steps
                                         or time.monotonic() - self.last_publish >= self.cfg.snapshot_every_s):
            await self.publish()
        return len(fresh)

    async def _learn_tpp_weight(self, labelled: Sequence[Event], probs: np.ndarray) -> None:
        """One step of the TPP term's weight on the served predictions ``probs`` (test-then-train).

        A user's stored propensity is used only if it was computed before the event (its ``ts``
        is earlier): the TPP agent runs beside this one and may already have learned the batch.
        """
        if self.fusion is None:
            return
        users = list(dict.fromkeys(e.user_id for e in labelled if e.category))
        if not users:
            return
        pipe = self.redis.pipeline(transaction=False)
        for u in users:
            pipe.get(self.state_keys.user_tpp(u))
        stored: dict[str, tuple[bytes, float]] = {}  # user -> (payload, the propensity's ts)
        for u, raw in zip(users, await pipe.execute()):
            try:
                ts = orjson.loads(raw).get("ts") if raw else None
            except (AttributeError, orjson.JSONDecodeError):
                continue  # an unreadable propensity teaches nothing (serving treats it as absent)
            if isinstance(ts, (int, float)):
                stored[u] = (raw, float(ts))
        tau = self.settings.serving.tpp_tau_s
        feature = np.zeros(len(labelled))
        for j, e in enumerate(labelled):
            raw_ts = stored.get(e.user_id)
            if e.category and raw_ts is not None and raw_ts[1] < e.ts:
                try:
                    feature[j] = tpp_log_ratios(raw_ts[0], [e.category], e.ts, tau_s=tau)[0]
                except (ValueError, TypeError):
                    continue
        if not feature.any():
            return
        eps = self.settings.serving.eps
        p = np.clip(probs, eps, 1 - eps)
        self.fusion.learn_many(np.log(p) - np.log1p(-p), feature,
                               np.array([e.label for e in labelled], dtype=np.float64))

    async def publish(self) -> int:
        model = await self._ensure_model()
        blob = model.to_snapshot()
        served = SparseScorer.from_snapshot(blob)
        parts = {"model": blob, "catalog": orjson.dumps(self.catalog)}
        fusion = {**(self.fusion.to_dict() if self.fusion is not None else {}),
                  **(self.memory_lambda.to_dict() if self.memory_lambda is not None else {}),
                  **(self.session_lambda.to_dict() if self.session_lambda is not None else {})}
        if fusion:
            parts["fusion"] = orjson.dumps(fusion)
        if self.recent:
            standardizer = HiddenStandardizer.fit(served.predict_with_hidden(list(self.recent))[1])
            parts["hidden_stats"] = standardizer.to_bytes()
        self.version = await publish_snapshot(self.redis, self.keys, parts)
        self.served = served
        self.standardizer = HiddenStandardizer.from_bytes(parts["hidden_stats"]) if "hidden_stats" in parts else None
        self.steps_since_publish = 0
        self.last_publish = time.monotonic()
        log.info("published DSL snapshot v%d (step %d, %d active params)", self.version, model.step,
                 model.n_active_params)
        return self.version
