"""Per-user and per-item state in Redis, updated idempotently under redelivery.

Why Lua scripts: "have I seen this event_id?" and "apply its update" must be one atomic step,
or a crash between them loses or doubles an update. Each script touches keys of a single hash
tag (``{u:<user>}`` or ``{i:<item>}``), so it runs on one slot of a Redis Cluster too; the user
half and the item half each keep their own dedup marker for the same reason.

The per-user sequence is a sorted set scored by event time and trimmed to the newest
``max_len`` entries: its final content depends only on *which* events arrived, not their order
or how often, which is what makes kill-and-restart replays converge to the same state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from streams.events import Event

DEDUP_TTL_S = 7 * 24 * 3600

_USER_SCRIPT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
local keep = tonumber(ARGV[4])
local n = redis.call('ZCARD', KEYS[2])
if n > keep then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - keep - 1) end
redis.call('HINCRBY', KEYS[3], 'events', 1)
redis.call('HINCRBY', KEYS[3], 'kind:' .. ARGV[5], 1)
if ARGV[6] ~= '' then
  redis.call('HINCRBY', KEYS[3], 'labelled', 1)
  redis.call('HINCRBY', KEYS[3], 'positives', tonumber(ARGV[6]))
end
local last = redis.call('HGET', KEYS[3], 'last_ts')
if (not last) or tonumber(last) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[3], 'last_ts', ARGV[2]) end
return 1
"""

_ITEM_SCRIPT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[2], 'events', 1)
redis.call('HINCRBY', KEYS[2], 'kind:' .. ARGV[2], 1)
if ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[2], 'labelled', 1)
  redis.call('HINCRBY', KEYS[2], 'positives', tonumber(ARGV[3]))
end
return 1
"""


@dataclass(frozen=True)
class StateKeys:
    """Key layout; the braces are Redis Cluster hash tags."""

    prefix: str

    def user_seen(self, user_id: str, event_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:seen:{event_id}"

    def user_seq(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:seq"

    def user_counts(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:counts"

    def item_seen(self, item_id: str, event_id: str) -> str:
        return f"{self.prefix}:{{i:{item_id}}}:seen:{event_id}"

    def item_counts(self, item_id: str) -> str:
        return f"{self.prefix}:{{i:{item_id}}}:counts"


def sequence_member(event: Event) -> bytes:
    """What one sequence entry holds: enough for the TPP (time is the score) and unique per event."""
    return orjson.dumps([event.category or "", event.kind, event.event_id])


class EventState:
    """Applies events to Redis state; one pipelined round trip per micro-batch."""

    def __init__(self, redis: Redis, prefix: str, max_seq_len: int = 256, dedup_ttl_s: int = DEDUP_TTL_S):
        self.redis = redis
        self.keys = StateKeys(prefix)
        self.max_seq_len = max_seq_len
        self.dedup_ttl_s = dedup_ttl_s
        self._user = redis.register_script(_USER_SCRIPT)
        self._item = redis.register_script(_ITEM_SCRIPT)

    async def apply(self, events: Sequence[Event]) -> int:
        """Apply a batch; return how many events were new (the rest were redeliveries)."""
        if not events:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for e in events:
            label = "" if e.label is None else str(e.label)
            k = self.keys
            await self._user(
                keys=[k.user_seen(e.user_id, e.event_id), k.user_seq(e.user_id), k.user_counts(e.user_id)],
                args=[self.dedup_ttl_s, repr(e.ts), sequence_member(e), self.max_seq_len, e.kind, label],
                client=pipe,
            )
            await self._item(
                keys=[k.item_seen(e.item_id, e.event_id), k.item_counts(e.item_id)],
                args=[self.dedup_ttl_s, e.kind, label],
                client=pipe,
            )
        results = await pipe.execute()
        return sum(int(r) for r in results[0::2])

    async def user_sequence(self, user_id: str) -> list[tuple[float, str, str]]:
        """The user's recent events as ``(ts, category, kind)``, oldest first."""
        rows = await self.redis.zrange(self.keys.user_seq(user_id), 0, -1, withscores=True)
        out = []
        for member, ts in rows:
            category, kind, _event_id = orjson.loads(member)
            out.append((float(ts), category, kind))
        return out
