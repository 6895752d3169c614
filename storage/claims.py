"""One claim per ``event_id``: which copy of an event is *the* event, for ingest and trainers alike.

Why: an ``event_id`` is the producer's promise that two messages are the same event. Redelivery
(same message again) and producer retries (same content, another offset) must be learned once;
two *different* events under one id (a producer bug, or a reused id) must not silently replace
each other, in state or in a model. Per-user and per-item "seen" markers cannot tell these apart,
and they disagreed across batches (last copy won inside a batch, first across batches).

The claim is one global key per id holding the content hash of the first copy and where that
copy sits in the log (``partition:offset``). Whoever reads a message first (an ingest worker or a
trainer) claims it with ``SET NX GET``; everyone then reaches the same verdict for every copy:

* ``canonical``: this message is the claimed copy (first sight, or a redelivery of it): apply it;
* ``duplicate``: same content at another position: already counted, skip it;
* ``conflict``: different content under a claimed id: skip it (ingest dead-letters it).

Claims live ``dedup_ttl_s`` (a copy later than that is new again, as the markers are).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from driftrec.contract.events import Event

Verdict = Literal["canonical", "duplicate", "conflict"]


def content_hash(event: Event) -> str:
    """16 hex digits of SHA-256 over the event's canonical JSON (key order and spacing ignored)."""
    canonical = orjson.dumps(event.model_dump(mode="json", exclude_none=True), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


def claim_value(event: Event, partition: int | None, offset: int | None) -> str:
    where = "" if partition is None or offset is None else f"{partition}:{offset}"
    return f"{content_hash(event)}|{where}"


def judge(stored: bytes | str | None, mine: str) -> Verdict:
    """The verdict for a copy whose claim value is ``mine``, the claim found being ``stored``."""
    if stored is None:
        return "canonical"
    stored = stored.decode() if isinstance(stored, bytes) else stored
    if stored == mine:
        return "canonical"
    their_hash, _, their_where = stored.partition("|")
    my_hash, _, my_where = mine.partition("|")
    if their_hash != my_hash:
        return "conflict"
    # same content elsewhere: a producer retry. Without a position on either side there is
    # nothing to tell the copies apart by, and the markers keep state idempotent anyway.
    return "duplicate" if their_where and my_where else "canonical"


def describe_claim(stored: bytes | str | None) -> str:
    """Where the claimed copy sits, for a dead letter's reason."""
    if stored is None:
        return "an unknown copy"
    text = stored.decode() if isinstance(stored, bytes) else stored
    _, _, where = text.partition("|")
    if not where:
        return "an earlier copy"
    partition, _, offset = where.partition(":")
    return f"the copy at partition {partition} offset {offset}"


@dataclass(frozen=True)
class Claimed:
    verdict: Verdict
    stored: bytes | None  # the claim found (None: this copy made it)


class EventClaims:
    """Claims ids in Redis: one pipelined round trip per batch (one slot per id on a cluster)."""

    def __init__(self, redis: Any, prefix: str, ttl_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    def key(self, event_id: str) -> str:
        return f"{self.prefix}:{{c:{event_id}}}:claim"

    async def claim(self, copies: Sequence[tuple[Event, int | None, int | None]]) -> list[Claimed]:
        """The verdict for each ``(event, partition, offset)``, in order; copies of one id inside the
        batch are judged against the first of them, as if they came one by one."""
        if not copies:
            return []
        values = [claim_value(e, p, o) for e, p, o in copies]
        pipe = self.redis.pipeline(transaction=False)
        for (event, _, _), value in zip(copies, values):
            pipe.set(self.key(event.event_id), value, nx=True, get=True, ex=self.ttl_s)
        stored = await pipe.execute()
        return [Claimed(judge(s, v), s) for s, v in zip(stored, values)]
