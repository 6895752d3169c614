"""The memories as the served system uses them: which hidden space keys the LSH memory (the *key
snapshot*), the one read plan of both memories (``MemoryRead``: the scorer's for a user's
candidates, the ingest writer's as of each event), and the writer's write.

Why a key snapshot. ReLoop2 keys the memory by the base model's last hidden layer, and an entry
is only a neighbour of a query if both were hashed in the same space. Our DSL publishes a snapshot
every ~5 s, each with its own weights and its own standardiser, and hashing every write and read
with the newest one mixed spaces: on ML-100K (events 20,000-30,000, snapshots 250 events apart,
8 tables × 10 bits) a sample keeps the same code in 73 % of the tables from one snapshot to the
next, 38 % four snapshots later, 14 % after twelve and 5 % after twenty-four (about two minutes at
the pipeline's pace), where chance is 0.1 %. So a bucket's FIFO held entries written under many
unrelated spaces, and the memory mostly returned noise: its learned weight stayed near 0.

The design. The trainer names one published snapshot the memory's key and keeps it for
``memory.key_every_s`` seconds, then names the newest one; every later snapshot carries the choice
in its ``memory_key`` part ``{"version", "previous", "at"}``, and the trainer pins both snapshots
(``storage.snapshots.pin_snapshot``) so they outlive the store's ``keep`` window. Buckets are
named by the key snapshot (``MemoryKeys(space="k", version=K)``). Writers hash with key ``K``
only; readers read ``K``'s buckets hashed by ``K``'s own model and statistics, plus the previous
key's buckets hashed by *its* model, so a renewal never empties the memory and no query is ever
compared with an entry of another space. The price is one more forward pass of the hidden
layers per key read (two at most), in process, and buckets of a retired key expire on their own
(their TTL: two key periods, unless ``memory.ttl_s`` sets one). A snapshot that names no key
(the first one a trainer publishes, or one published by hand) is its own key.

The alternative the issue offered -- key by the newest snapshot and read a window over the last
few -- still compares a query with entries hashed elsewhere (73 % agreement at one snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import ErrorSums, HiddenStandardizer, RandomProjectionLSH
from driftrec.storage.client import MultiGet, is_cluster
from driftrec.storage.error_memory import (
    BucketNames,
    MemoryKeys,
    lsh_calls,
    plan_buckets,
    plan_session_buckets,
    run_scripts,
    session_calls,
    sums_from_values,
)
from driftrec.storage.snapshots import SnapshotKeys, load_pinned

log = logging.getLogger(__name__)

KEY_PART = "memory_key"


@dataclass(frozen=True)
class KeyRef:
    """Which published snapshot keys the LSH memory now (``version``) and which did before."""

    version: int
    previous: int | None = None
    at: float = 0.0  # wall time the trainer chose ``version``

    def to_bytes(self) -> bytes:
        return orjson.dumps({"version": self.version, "previous": self.previous, "at": self.at})

    @classmethod
    def of_parts(cls, parts: dict[str, bytes], own_version: int | None) -> KeyRef | None:
        """The key a snapshot names; the snapshot itself where it names none (None: no version).
        A part that is not the JSON this module writes raises ``ValueError``."""
        raw = parts.get(KEY_PART)
        if raw is None:
            return None if own_version is None else cls(own_version)
        try:
            doc = _KeyDoc.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"{KEY_PART} is not a key reference: {exc.errors()[0]['msg']}") from None
        return cls(doc.version, doc.previous, doc.at)

    def renewed(self, version: int, now: float) -> KeyRef:
        return KeyRef(version, self.version, now)


class _KeyDoc(BaseModel):
    """The ``memory_key`` part as stored: validated where it is loaded (storage is input too)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    version: int = Field(gt=0)
    previous: int | None = Field(None, gt=0)
    at: float = Field(0.0, allow_inf_nan=False)


@dataclass(frozen=True)
class KeyView:
    """One key snapshot's hidden space: the model and statistics that hash into it, and its buckets."""

    version: int
    model: SparseScorer
    standardizer: HiddenStandardizer | None
    names: BucketNames

    def keyed(self, hidden: np.ndarray) -> np.ndarray:
        return self.standardizer.transform(hidden) if self.standardizer is not None else hidden

    def of_interactions(self, interactions: Sequence[Interaction]) -> np.ndarray:
        return self.keyed(self.model.predict_with_hidden(interactions)[1])

    def of_candidates(self, user_id: str, items: Sequence[str], cats: Sequence[str | None]) -> np.ndarray:
        return self.keyed(self.model.score_candidates(user_id, items, cats)[1])


def key_view(settings: Settings, version: int, model: SparseScorer, standardizer: HiddenStandardizer | None) -> KeyView:
    m = settings.memory
    keys = MemoryKeys(settings.key_prefix, version, m.n_shards, space="k")
    lsh = RandomProjectionLSH(dim=model.hidden, n_tables=m.n_tables, n_bits=m.n_bits, seed=m.seed, version=version)
    return KeyView(version, model, standardizer, BucketNames(keys, lsh))


def session_memory_keys(settings: Settings) -> MemoryKeys:
    """The session memory's keys: by model generation (no hidden space keys it)."""
    return MemoryKeys.from_settings(settings.key_prefix, settings.dsl.generation, settings.memory.n_shards)


def lsh_ttl_s(settings: Settings) -> int:
    """How long an LSH bucket lives after its last write: ``memory.ttl_s``, else two key periods
    (a key is written while current and read while current or previous)."""
    m = settings.memory
    return m.ttl_s if m.ttl_s > 0 else int(math.ceil(2 * m.key_every_s)) + 60


def pin_ttl_s(settings: Settings) -> float:
    """How long the trainer keeps a key snapshot pinned past its last renewal of the pin."""
    return 2 * settings.memory.key_every_s + 60.0


class KeyViews:
    """Loads the key views a snapshot names (current first, then the previous if still pinned),
    keeping the ones already built."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.snap_keys = SnapshotKeys(settings.key_prefix, "dsl")
        self._built: dict[int, KeyView] = {}

    async def resolve(
        self, version: int, parts: dict[str, bytes], model: SparseScorer, standardizer: HiddenStandardizer | None
    ) -> tuple[KeyView, ...]:
        """The views of snapshot ``version`` (whose ``model``/``standardizer`` are already loaded);
        empty if its current key cannot be loaded: then the LSH memory is neither read nor written."""
        try:
            ref = KeyRef.of_parts(parts, version)
        except ValueError as exc:
            log.error("snapshot %d: %s; the LSH memory is off until a snapshot names a usable key", version, exc)
            return ()
        assert ref is not None
        views: list[KeyView] = []
        for v in (ref.version, ref.previous):
            if v is None:
                continue
            view = self._built.get(v)
            if view is None and v == version:
                view = key_view(self.settings, v, model, standardizer)
            elif view is None:
                view = await self._load(v)
            if view is None:
                if v == ref.version:
                    return ()
                continue
            views.append(view)
        self._built = {view.version: view for view in views}
        return tuple(views)

    async def _load(self, version: int) -> KeyView | None:
        parts = await load_pinned(self.redis, self.snap_keys, version)
        if parts is None or "model" not in parts:
            log.warning("key snapshot %d is not pinned (expired?): its buckets are not read", version)
            return None
        try:
            model = await asyncio.to_thread(SparseScorer.from_bytes, parts["model"])
            stats = parts.get("hidden_stats")
            standardizer = HiddenStandardizer.from_bytes(stats) if stats else None
        except Exception as exc:  # a crafted or damaged pin must not take the memory's readers down
            log.error("key snapshot %d is unusable: %s", version, exc)
            return None
        return key_view(self.settings, version, model, standardizer)


@dataclass(frozen=True)
class MemorySums:
    """What both memories held for each query (None: that memory was not read)."""

    lsh: ErrorSums | None
    session: ErrorSums | None


Keyed = tuple[KeyView, np.ndarray]  # a key view and the samples' hidden vectors hashed in its space


class MemoryRead:
    """One read of both memories, queued into the caller's pipeline: which buckets (each key
    view's LSH buckets for the queries hashed in its space, and the ``(user, category)`` session
    buckets), then what they held. The one read plan of the memories: the scorer reads it for a
    user's candidates, the ingest writer for a batch as of each event."""

    def __init__(
        self,
        settings: Settings,
        keyed: Sequence[Keyed],
        pairs: Sequence[tuple[str, str | None]] | None,
        cluster: bool,
        session_keys: MemoryKeys | None = None,
    ) -> None:
        self.cfg = settings.memory
        self.plans = [plan_buckets(view.names, hidden) for view, hidden in keyed]
        session_keys = session_keys or session_memory_keys(settings)
        self.session_plan = plan_session_buckets(session_keys, pairs) if pairs is not None else None
        self.reads = [MultiGet(plan.names, cluster) for plan in self.plans]
        if self.session_plan is not None:
            self.reads.append(MultiGet(self.session_plan.names, cluster))

    def __len__(self) -> int:
        """How many pipeline commands ``queue`` adds (and ``sums`` reads back)."""
        return sum(len(read) for read in self.reads)

    def queue(self, pipe: Any) -> None:
        for read in self.reads:
            read.queue(pipe)

    def sums(self, replies: Sequence[Any], now: float | None, before: np.ndarray | None = None) -> MemorySums:
        """The sums per query from this read's pipeline replies (in order); ``before``: one event
        time per query, counting only strictly earlier entries (what the memory held then)."""
        c = self.cfg
        values, at = [], 0
        for read in self.reads:
            values.append(read.values(replies[at : at + len(read)]))
            at += len(read)
        lsh: ErrorSums | None = None
        for plan, got in zip(self.plans, values):
            more = sums_from_values(
                got, plan, gamma=c.gamma, prior=c.prior, half_life_s=c.half_life_s, now=now, before=before
            )
            lsh = more if lsh is None else lsh.plus(more)
        session = None
        if self.session_plan is not None:
            session = sums_from_values(
                values[-1], self.session_plan, gamma=c.session_gamma, prior=c.prior, before=before
            )
        return MemorySums(lsh, session)


class ServedErrorMemories:
    """Both memories: ``write`` the served errors of labelled interactions (LSH entries under the
    current key only), ``sums_before`` what the memories held just before each was served."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.cfg = settings.memory
        self.session_ttl_s = settings.state_ttl_s
        self.lsh_ttl_s = lsh_ttl_s(settings)
        self.session_keys = session_memory_keys(settings)

    async def write(self, labelled: Sequence[Interaction], probs: np.ndarray, current: Keyed | None) -> int:
        """Write the served ``probs`` of labelled interactions into both memories (the LSH one
        under ``current``'s key, hashed by it), in one round trip; idempotent per event id.
        Returns the new LSH and session entries."""
        if not labelled:
            return 0
        c = self.cfg
        calls: list[Any] = []
        ttls: list[int] = []
        if current is not None:
            view, keyed = current
            calls = lsh_calls(view.names.keys, view.names.lsh, labelled, probs, keyed, c.bucket_capacity)
            ttls = [self.lsh_ttl_s] * len(calls)
        if c.session_capacity > 0:
            # one bucket per (user, category): unbounded in number, so they expire with the user
            more = session_calls(self.session_keys, labelled, probs, c.session_capacity)
            calls += more
            ttls += [self.session_ttl_s or c.ttl_s] * len(more)
        return int(sum(await run_scripts(self.redis, calls, ttls))) if calls else 0

    async def sums_before(self, labelled: Sequence[Interaction], keyed: Sequence[Keyed]) -> MemorySums:
        """What both memories held for each labelled interaction from the entries of strictly
        earlier events: what serving read for it (every key view it reads), whether or not
        ingest has written it (or later events) since. One round trip for both memories."""
        n = len(labelled)
        if n == 0:
            return MemorySums(None, None)
        pairs = [(x.user_id, x.category) for x in labelled] if self.cfg.session_capacity > 0 else None
        read = MemoryRead(self.settings, keyed, pairs, is_cluster(self.redis), self.session_keys)
        pipe = self.redis.pipeline(transaction=False)
        read.queue(pipe)
        replies = await pipe.execute() if len(read) else []
        before = np.fromiter((x.ts for x in labelled), dtype=np.float64, count=n)
        return read.sums(replies, now=labelled[-1].ts, before=before)
