"""The DSL trainer: learns from the stream in micro-batches; its snapshots are the ``dsl`` lineage.

It is driven by ``streams.lineage.LineageRunner``, which holds the model's lease, hands it every
event exactly once (by offsets recorded in each snapshot) and publishes what ``snapshot_parts``
returns when ``due`` says so (every ``snapshot_every_steps`` steps or ``snapshot_every_s``
seconds, whichever comes first) or when the stream goes idle. A trainer that takes over
``restore``s the newest snapshot, so a crash costs only re-learning the unpublished steps.

The gradient steps run in a thread (``asyncio.to_thread``): ingest shares the worker's event
loop, and a trainer batch must not hold the fast path up. The served score's weights and the
memories are learned at ingest, per event, from what was served (``streams.fusion_writer``); the
trainer is the slow loop alone. It also chooses which published snapshot keys the LSH error
memory and keeps it pinned (``storage/served_memory.py`` says why).

Implicit feedback: an event with a label trains on that label; an unlabelled event whose kind is
one of ``dsl.positive_kinds`` is a positive and gets ``dsl.negatives`` sampled items from the
recent item pool as negatives; any other unlabelled event (a bare ``impression``) teaches nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from dataclasses import replace

import numpy as np
import orjson
import torch
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.dsl import DSLRecommender, SparseScorer, sample_negatives
from driftrec.models.error_memory import HiddenStandardizer
from driftrec.storage.served_memory import KEY_PART, KeyRef, pin_ttl_s
from driftrec.storage.snapshots import SnapshotKeys, pin_snapshot

log = logging.getLogger(__name__)


def training_examples(
    events: Sequence[Event],
    rng: np.random.Generator,
    item_pool: Sequence[str],
    negatives: int,
    positive_kinds: Collection[str],
) -> list[Interaction]:
    """Turn contract events into labelled interactions (see the module docstring for the rule)."""
    out: list[Interaction] = []
    for event in events:
        x = event.to_interaction()
        if x.label is not None:
            out.append(x)
        elif x.kind in positive_kinds:
            out.append(replace(x, label=1))
            if item_pool:
                out.extend(sample_negatives(x, negatives, rng, item_pool, exclude={x.item_id}))
    return out


def new_model(settings: Settings) -> DSLRecommender:
    """A fresh DSL model with every knob from the settings."""
    c = settings.dsl
    return DSLRecommender(
        n_rows=c.n_rows,
        dim=c.dim,
        density=c.density,
        hidden=c.hidden,
        lr=c.lr,
        prune_every=c.prune_every,
        seed=c.seed,
        head_density=c.head_density,
        anneal_steps=c.anneal_steps,
        bias_lr=c.bias_lr,
    )


class DSLTrainer:
    """The ``dsl`` lineage's learner (``streams.lineage.LineageLearner``): the slow loop (the
    fusion layer and the memories are the fast one, learned at ingest)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.cfg = settings.dsl
        self.rng = np.random.default_rng(self.cfg.seed)
        self.model: DSLRecommender | None = None
        self.served: SparseScorer | None = None  # what the scoring service has loaded: the last publish
        self.standardizer: HiddenStandardizer | None = None  # the served snapshot's hidden statistics
        self.recent: deque[Interaction] = deque(maxlen=self.cfg.hidden_stats_sample)  # fits those at publish
        self.catalog: OrderedDict[str, str] = OrderedDict()  # least recently seen first
        self.item_pool: deque[str] = deque(maxlen=self.cfg.negative_pool)
        self.version: int | None = None
        self.steps_since_publish = 0
        self.last_publish = time.monotonic()
        self._next_served: SparseScorer | None = None
        self._next_standardizer: HiddenStandardizer | None = None
        self.memory_key: KeyRef | None = None  # the snapshot whose hidden space keys the LSH memory
        self.snap_keys = SnapshotKeys(settings.key_prefix, "dsl")

    def restore(self, parts: dict[str, bytes] | None) -> None:
        """Continue the lineage from a snapshot's parts, or start a fresh model (``None``)."""
        torch.set_num_threads(1)
        if parts is not None and "model" in parts:
            self.model = DSLRecommender.from_bytes(parts["model"])
            self.served = SparseScorer.from_bytes(parts["model"])
            if "hidden_stats" in parts:
                self.standardizer = HiddenStandardizer.from_bytes(parts["hidden_stats"])
            self.catalog = OrderedDict(orjson.loads(parts.get("catalog", b"{}")))
            try:
                self.memory_key = KeyRef.of_parts(parts, None)
            except ValueError as exc:
                log.warning("the snapshot's memory key is unreadable, a new one is chosen: %s", exc)
            log.info("trainer resumed (step %d)", self.model.step)
        else:
            self.model = new_model(self.settings)

    def _ensure_model(self) -> DSLRecommender:
        if self.model is None:
            self.restore(None)
        assert self.model is not None
        return self.model

    async def handle(self, events: list[Event]) -> int:
        if not events:
            return 0
        model = self._ensure_model()
        for e in events:  # the lineage runner delivers each message once
            if e.category:
                self.catalog[e.item_id] = e.category
                self.catalog.move_to_end(e.item_id)
        while len(self.catalog) > self.cfg.catalog_size:
            self.catalog.popitem(last=False)
        c = self.cfg
        examples = training_examples(events, self.rng, list(self.item_pool), c.negatives, c.positive_kinds)
        self.item_pool.extend(e.item_id for e in events)
        self.recent.extend(x for x in examples if x.label is not None)
        self.steps_since_publish += await asyncio.to_thread(self._learn, model, examples)
        return len(events)

    def _learn(self, model: DSLRecommender, examples: list[Interaction]) -> int:
        """The gradient steps (in a thread: ingest shares the event loop); returns how many."""
        steps = 0
        for start in range(0, len(examples), self.cfg.batch_size):
            model.learn_many(examples[start : start + self.cfg.batch_size])
            steps += 1
        return steps

    def due(self) -> bool:
        c = self.cfg
        return self.steps_since_publish >= c.snapshot_every_steps or (
            time.monotonic() - self.last_publish >= c.snapshot_every_s
        )

    async def snapshot_parts(self) -> dict[str, bytes]:
        parts = await asyncio.to_thread(self._snapshot_parts, self._ensure_model(), list(self.recent))
        key = self.memory_key
        if key is not None and self.settings.memory.enabled:
            # renew the pins before naming them: a reader of this snapshot must find both
            ttl = pin_ttl_s(self.settings)
            pinned = [await pin_snapshot(self.redis, self.snap_keys, v, ttl) for v in (key.version, key.previous) if v]
            if pinned and pinned[0]:
                if key.previous and not pinned[1]:  # the previous key is gone: stop naming it
                    key = self.memory_key = KeyRef(key.version, None, key.at)
                parts[KEY_PART] = key.to_bytes()
            else:
                log.warning("key snapshot %d is gone; the next publish becomes the memory's key", key.version)
                self.memory_key = None
        return parts

    def _snapshot_parts(self, model: DSLRecommender, recent: list[Interaction]) -> dict[str, bytes]:
        blob = model.to_bytes()
        self._next_served = SparseScorer.from_bytes(blob)
        parts = {"model": blob, "catalog": orjson.dumps(self.catalog)}
        self._next_standardizer = None
        if recent:
            self._next_standardizer = HiddenStandardizer.fit(self._next_served.predict_with_hidden(recent)[1])
            parts["hidden_stats"] = self._next_standardizer.to_bytes()
        return parts

    def published(self, version: int) -> None:
        """From now on the batch errors are those of the snapshot just published: the one serving loads."""
        self.version = version
        self.served, self.standardizer = self._next_served, self._next_standardizer
        now = time.time()
        key = self.memory_key
        if key is None or now - key.at >= self.settings.memory.key_every_s:
            self.memory_key = KeyRef(version, None, now) if key is None else key.renewed(version, now)
        self.steps_since_publish = 0
        self.last_publish = time.monotonic()
        model = self._ensure_model()
        log.info("published DSL snapshot v%d (step %d, %d active params)", version, model.step, model.n_active_params)
