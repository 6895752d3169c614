"""Per-user and per-item state in Redis, updated idempotently under redelivery.

Why Lua scripts: "have I seen this event_id?" and "apply its update" must be one atomic step,
or a crash between them loses or doubles an update. Each script touches keys of a single hash
tag (``{u:<user>}``, or ``{is:<shard>}`` for a shard of items), so it runs on one slot of a Redis Cluster; the user
half and the item half each keep their own dedup marker for the same reason.

The per-user sequence is a sorted set scored by event time and trimmed to the newest
``max_len`` entries: its final content depends only on *which* events arrived, not their order
or how often, which is what makes kill-and-restart replays converge to the same state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.interaction import stable_hash
from driftrec.storage.client import Scripts

# One call per user (per item) and micro-batch: KEYS = [seq, counts, seen_1..seen_n] (user) or
# [counts, seen_1..seen_n] (item); ARGV[3] is a JSON array of that entity's events in the batch,
# ARGV[4] the state TTL (0: none), refreshed by every new event so only idle users expire.
_USER_SCRIPT = """
local ttl, keep = ARGV[1], tonumber(ARGV[2])
local events = cjson.decode(ARGV[3])
local new, zargs, incr, last = 0, {}, {}, nil
local function add(field, by) incr[field] = (incr[field] or 0) + by end
for i, e in ipairs(events) do
  if redis.call('SET', KEYS[i + 2], '1', 'NX', 'EX', ttl) then
    new = new + 1
    zargs[#zargs + 1] = e[1]
    zargs[#zargs + 1] = e[2]
    add('events', 1)
    add('kind:' .. e[3], 1)
    if e[4] ~= '' then add('labelled', 1); add('positives', tonumber(e[4])) end
    if (not last) or tonumber(e[1]) > tonumber(last) then last = e[1] end
  end
end
if new == 0 then return 0 end
redis.call('ZADD', KEYS[1], unpack(zargs))
local state_ttl = tonumber(ARGV[4])
for field, by in pairs(incr) do redis.call('HINCRBY', KEYS[2], field, by) end
local stored = redis.call('HGET', KEYS[2], 'last_ts')
if (not stored) or tonumber(stored) < tonumber(last) then redis.call('HSET', KEYS[2], 'last_ts', last) end
local n = redis.call('ZCARD', KEYS[1])
if n > keep then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - keep - 1) end
if state_ttl > 0 then
  redis.call('EXPIRE', KEYS[1], state_ttl)
  redis.call('EXPIRE', KEYS[2], state_ttl)
end
return new
"""

# Items are grouped into ITEM_SHARDS hash tags so one call updates every item of a shard that a
# batch touches: KEYS = [seen_1..seen_n, counts_1..counts_n], ARGV[2] = [[kind, label, category], ...],
# ARGV[3] the state TTL (0: none).
# The item hash also remembers the item's category, so serving can look it up with the counts.
_ITEM_SCRIPT = """
local ttl = ARGV[1]
local events = cjson.decode(ARGV[2])
local n = #events
local incr = {}
for i, e in ipairs(events) do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    local key = KEYS[n + i]
    local c = incr[key] or {}
    incr[key] = c
    c['events'] = (c['events'] or 0) + 1
    c['kind:' .. e[1]] = (c['kind:' .. e[1]] or 0) + 1
    if e[3] ~= '' then redis.call('HSET', key, 'category', e[3]) end
    if e[2] ~= '' then
      c['labelled'] = (c['labelled'] or 0) + 1
      c['positives'] = (c['positives'] or 0) + tonumber(e[2])
    end
  end
end
local state_ttl = tonumber(ARGV[3])
for key, c in pairs(incr) do
  for field, by in pairs(c) do redis.call('HINCRBY', key, field, by) end
  if state_ttl > 0 then redis.call('EXPIRE', key, state_ttl) end
end
return 0
"""
ITEM_SHARDS = 64


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

    def user_tpp(self, user_id: str) -> str:
        """The TPP agent's per-user category propensity (JSON), beside the user's sequence."""
        return f"{self.prefix}:{{u:{user_id}}}:tpp"

    def item_shard(self, item_id: str) -> int:
        return stable_hash(item_id, ITEM_SHARDS, salt="item-shard")

    def item_seen(self, item_id: str, event_id: str) -> str:
        return f"{self.prefix}:{{is:{self.item_shard(item_id)}}}:seen:{event_id}"

    def item_counts(self, item_id: str) -> str:
        return f"{self.prefix}:{{is:{self.item_shard(item_id)}}}:item:{item_id}:counts"


def sequence_member(event: Event) -> bytes:
    """What one sequence entry holds: enough for the TPP (time is the score) and unique per event."""
    return orjson.dumps([event.category or "", event.kind, event.event_id])


class EventState:
    """Applies events to Redis state; one pipelined round trip per micro-batch."""

    def __init__(self, redis: Redis, prefix: str, max_seq_len: int, dedup_ttl_s: int, state_ttl_s: int = 0):
        self.redis = redis
        self.keys = StateKeys(prefix)
        self.max_seq_len = max_seq_len
        self.dedup_ttl_s = dedup_ttl_s
        self.state_ttl_s = state_ttl_s
        self._scripts = Scripts(_USER_SCRIPT, _ITEM_SCRIPT)

    async def apply(self, events: Sequence[Event]) -> int:
        """Apply a batch; return how many events were new (the rest were redeliveries). Copies of
        one id should be judged before (``storage.claims``); here the first copy wins."""
        if not events:
            return 0
        by_user: dict[str, list[Event]] = defaultdict(list)
        by_shard: dict[int, list[Event]] = defaultdict(list)
        first: dict[str, Event] = {}
        for e in events:
            first.setdefault(e.event_id, e)
        for e in first.values():
            by_user[e.user_id].append(e)
            by_shard[self.keys.item_shard(e.item_id)].append(e)
        k = self.keys
        user_sha, item_sha = self._scripts.sha[_USER_SCRIPT], self._scripts.sha[_ITEM_SCRIPT]

        def build(pipe: Any) -> None:
            for user_id, user_events in by_user.items():
                payload = orjson.dumps(
                    [[repr(e.ts), sequence_member(e).decode(), e.kind, _label(e)] for e in user_events]
                )
                keys = [
                    k.user_seq(user_id),
                    k.user_counts(user_id),
                    *(k.user_seen(user_id, e.event_id) for e in user_events),
                ]
                pipe.execute_command(
                    "EVALSHA", user_sha, len(keys), *keys, self.dedup_ttl_s, self.max_seq_len, payload, self.state_ttl_s
                )
            for shard_events in by_shard.values():
                payload = orjson.dumps([[e.kind, _label(e), e.category or ""] for e in shard_events])
                keys = [
                    *(k.item_seen(e.item_id, e.event_id) for e in shard_events),
                    *(k.item_counts(e.item_id) for e in shard_events),
                ]
                pipe.execute_command("EVALSHA", item_sha, len(keys), *keys, self.dedup_ttl_s, payload, self.state_ttl_s)

        results = await self._scripts.execute(self.redis, build)
        return sum(int(r) for r in results[: len(by_user)])

    async def user_sequence(self, user_id: str) -> list[tuple[float, str, str]]:
        """The user's recent events as ``(ts, category, kind)``, oldest first."""
        rows = cast(
            list[tuple[bytes, float]], await self.redis.zrange(self.keys.user_seq(user_id), 0, -1, withscores=True)
        )
        out = []
        for member, ts in rows:
            category, kind, _event_id = orjson.loads(member)
            out.append((float(ts), category, kind))
        return out


def _label(event: Event) -> str:
    return "" if event.label is None else str(event.label)
