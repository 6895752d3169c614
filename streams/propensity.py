"""Per-user next-category propensities, written by the ingest role from the ``tpp`` lineage.

Why at ingest and not in the TPP trainer: the trainer is one process for the whole stream (one
lineage, one vocabulary), while ingest scales out by partition. The ingest worker that owns a
user's partition has just applied her events to ``user_seq``; it scores her sequence with the
newest published ``tpp`` snapshot (reloaded when ``latest`` moves, checked at most every
``serving.reload_every_s``) and writes, in one key the scoring service reads with one GET,
``StateKeys(prefix).user_tpp(user)``::

    {"ts": <time of the user's last event>, "version": <model steps>, "snapshot": <tpp version>,
     "probs": {category: lambda_k(ts) / sum_j lambda_j(ts)}, "n_types": K}

i.e. the probability that the user's next event is of category k, right after her last event.
The overflow type is left out of ``probs`` (it is not a category), so they sum to <= 1. Until
the lineage has published a snapshot nothing is written (serving treats the term as absent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.prompt_tpp import PromptTPP, TypeVocabulary
from driftrec.models.tpp import EventSeq
from driftrec.storage.event_state import StateKeys, sequence_member
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot

log = logging.getLogger(__name__)


@dataclass
class UserSequence:
    """One user's recent events, oldest first: times (Unix s) and category names."""

    times: list[float]
    categories: list[str | None]

    @property
    def last_ts(self) -> float:
        return self.times[-1]


async def user_sequences(
    redis: Any, keys: StateKeys, by_user: dict[str, list[Event]], max_len: int
) -> dict[str, UserSequence]:
    """Each user's newest ``max_len`` events: Redis ``user_seq`` united, by event id, with
    ``by_user`` (events ingest may not have written yet). Order is (ts, member bytes), Redis's
    own ZSET order."""
    pipe = redis.pipeline(transaction=False)
    users = sorted(by_user)
    for user in users:
        # only the stored newest max_len can survive the cut below (same order as the ZSET's)
        pipe.zrange(keys.user_seq(user), -max_len, -1, withscores=True)
    rows = await pipe.execute()
    out: dict[str, UserSequence] = {}
    for user, stored in zip(users, rows):
        entries: dict[str, tuple[float, bytes, str | None]] = {}
        for member, ts in stored:
            category, _kind, event_id = orjson.loads(member)
            entries[event_id] = (float(ts), bytes(member), category or None)
        for e in by_user[user]:
            entries.setdefault(e.event_id, (e.ts, sequence_member(e), e.category))
        ordered = sorted(entries.values(), key=lambda r: (r[0], r[1]))[-max_len:]
        if ordered:
            out[user] = UserSequence([r[0] for r in ordered], [r[2] for r in ordered])
    return out


def encode_sequence(vocab: TypeVocabulary, seq: UserSequence) -> EventSeq:
    """Times and type ids (looked up: only the trainer assigns new ids, in stream order)."""
    ids = [vocab.lookup(c) for c in seq.categories]
    return np.asarray(seq.times, dtype=np.float64), np.asarray(ids, dtype=np.int64)


def propensity_record(
    seq: UserSequence, lam: np.ndarray, vocab: TypeVocabulary, steps: int, snapshot: int | None = None
) -> dict[str, object]:
    """The JSON object stored at ``user_tpp``: next-category probabilities at the last event."""
    total = float(lam.sum())
    names = vocab.names()
    probs = {names[k]: float(lam[k] / total) for k in range(len(vocab))} if total > 0 else {}
    return {"ts": seq.last_ts, "version": steps, "snapshot": snapshot, "probs": probs, "n_types": vocab.n_types}


class PropensityWriter:
    """The ingest role's TPP side: score touched users with the served ``tpp`` snapshot."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.cfg = settings.tpp
        self.state_ttl_s = settings.state_ttl_s
        self.state_keys = StateKeys(settings.key_prefix)
        self.snap_keys = SnapshotKeys(settings.key_prefix, "tpp")
        self.reload_every_s = max(settings.serving.reload_every_s, 0.0)
        self.model: PromptTPP | None = None
        self.vocab: TypeVocabulary | None = None
        self.steps = 0
        self.version: int | None = None
        self._checked = float("-inf")

    async def refresh(self) -> None:
        """Load the newest ``tpp`` snapshot if ``latest`` moved (at most every ``reload_every_s``)."""
        now = time.monotonic()
        if now - self._checked < self.reload_every_s:
            return
        self._checked = now
        # one GET of ``latest`` while it has not moved; the blob only when it has
        found = await load_snapshot(self.redis, self.snap_keys, newer_than=self.version)
        if found is None or "model" not in found[1]:
            return
        version, parts = found
        model = await asyncio.to_thread(PromptTPP.from_bytes, parts["model"])
        assert isinstance(model, PromptTPP)
        self.model, self.vocab, self.version = model, TypeVocabulary.from_bytes(parts["vocab"]), version
        self.steps = int(orjson.loads(parts.get("meta", b"{}")).get("steps", 0))

    async def write(self, events: Sequence[Event]) -> int:
        """Refresh the propensity of every user in ``events`` (call after ingest applied them);
        returns how many were written (0 before the lineage's first snapshot)."""
        if not events:
            return 0
        await self.refresh()
        model, vocab = self.model, self.vocab
        if model is None or vocab is None or model.time_scale is None:
            return 0
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        seqs = await user_sequences(self.redis, self.state_keys, by_user, self.cfg.max_seq_len)
        users = sorted(seqs)
        encoded = [encode_sequence(vocab, seqs[u]) for u in users]
        lam = await asyncio.to_thread(model.intensity_many, encoded)
        pipe = self.redis.pipeline(transaction=False)
        for user, row in zip(users, lam):
            record = propensity_record(seqs[user], row, vocab, self.steps, self.version)
            # expires with the user's sequence
            pipe.set(self.state_keys.user_tpp(user), orjson.dumps(record), ex=self.state_ttl_s or None)
        await pipe.execute()
        return len(users)
