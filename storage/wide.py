"""The wide model's ``(z, n)`` per feature in Redis: read per batch and per request, added to once
per event.

Layout: one string key per feature holding ``(z, n)`` as two little-endian doubles (16 bytes, the
Lua ``struct`` format ``<d<d``), so the scorer reads a request's features with the ``MGET``\\ s of
its one round trip. The user's features sit under the user's hash tag (``{u:<user>}``, beside
the user's state); the shared ones (bias, the model weight, items, categories) under the item
shard of their name (``{is:<shard>}``), spreading them over the item shards' slots.

Why deltas with per-slot markers: an event's update spans two slots (its user's and its item's),
and a Lua script can only touch one slot of a Redis Cluster. So each slot gets the event's deltas
for its own features and a "this event was added here" marker in the same script, and a
redelivered event adds nothing to a slot that already has it. Concurrent workers (another user's
partition touching the same item) add their deltas too: FTRL's state is a sum of per-event terms,
so the result does not depend on who wrote first; each event's step was computed from the state
its batch read (Hogwild-style, as distributed FTRL is run in practice).
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from driftrec.contract.interaction import stable_hash
from driftrec.models.served import REAL_FEATURES
from driftrec.models.wide import USER_FEATURE_PREFIXES, FTRLParams, layer_weights
from driftrec.storage.client import MultiGet, Scripts, is_cluster
from driftrec.storage.event_state import ITEM_SHARDS

_PACK = struct.Struct("<dd")

# KEYS = [marker_1..marker_e, feature_1..feature_k]; ARGV[1] marker TTL, ARGV[2] state TTL (0: none),
# ARGV[3] JSON [[[feature index, dz, dn], ...] per event]. Returns how many events were new here.
_ADD_SCRIPT = """
local marker_ttl, state_ttl = ARGV[1], tonumber(ARGV[2])
local events = cjson.decode(ARGV[3])
local e = #events
local new = 0
local touched = {}
for i, deltas in ipairs(events) do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', marker_ttl) then
    new = new + 1
    for _, d in ipairs(deltas) do
      local key = KEYS[e + d[1]]
      local raw = redis.call('GET', key)
      local z, n = 0, 0
      if raw then z, n = struct.unpack('<d<d', raw) end
      redis.call('SET', key, struct.pack('<d<d', z + d[2], n + d[3]))
      touched[key] = true
    end
  end
end
if state_ttl > 0 then
  for key, _ in pairs(touched) do redis.call('EXPIRE', key, state_ttl) end
end
return new
"""


def pack(z: float, n: float) -> bytes:
    return _PACK.pack(z, n)


def unpack(raw: bytes | None) -> tuple[float, float]:
    if raw is None:
        return (0.0, 0.0)
    if len(raw) != _PACK.size:
        raise ValueError(f"a wide feature value must be {_PACK.size} bytes, got {len(raw)}")
    z, n = _PACK.unpack(raw)
    return (float(z), float(n))


@lru_cache(maxsize=1 << 16)
def _shared_tag(feature: str) -> str:
    """The item shard of a shared feature (hashing it is most of the key layout's cost)."""
    return f"is:{stable_hash(feature, ITEM_SHARDS, salt='item-shard')}"


@dataclass(frozen=True)
class WideKeys:
    """Key layout (the braces are Redis Cluster hash tags)."""

    prefix: str

    def tag(self, user_id: str, feature: str) -> str:
        if feature.startswith(USER_FEATURE_PREFIXES):
            return f"u:{user_id}"
        return _shared_tag(feature)

    def feature(self, user_id: str, feature: str) -> str:
        return f"{self.prefix}:{{{self.tag(user_id, feature)}}}:wide:{feature}"

    def marker(self, tag: str, event_id: str) -> str:
        return f"{self.prefix}:{{{tag}}}:wseen:{event_id}"


@dataclass
class WideUpdate:
    """One event's deltas, keyed by feature, for :meth:`WideStore.add`."""

    event_id: str
    user_id: str
    deltas: dict[str, tuple[float, float]]
    features: Sequence[str] = ()  # every feature of the event: each of their slots gets a marker


@dataclass
class _SlotCall:
    markers: list[str] = field(default_factory=list)
    features: dict[str, int] = field(default_factory=dict)  # key -> 1-based index
    events: list[list[list[float]]] = field(default_factory=list)


class WideStore:
    """Reads ``(z, n)`` of features and adds events' deltas once per event (module doc)."""

    def __init__(self, redis: Any, prefix: str, marker_ttl_s: int, state_ttl_s: int = 0) -> None:
        self.redis = redis
        self.keys = WideKeys(prefix)
        self.marker_ttl_s = marker_ttl_s
        self.state_ttl_s = state_ttl_s
        self.cluster = is_cluster(redis)
        self._scripts = Scripts(_ADD_SCRIPT)
        self._shared_keys: dict[str, bytes] = {}

    def reads(self, user_id: str, features: Iterable[str]) -> tuple[list[str], MultiGet]:
        """The features and the ``MultiGet`` that reads them (queue it into a pipeline)."""
        names = list(features)
        return names, MultiGet([self._key(user_id, f) for f in names], self.cluster)

    def _key(self, user_id: str, feature: str) -> str | bytes:
        """``keys.feature``, remembered for shared features (bias, items, categories): their key
        does not depend on the user, and building it (a hash for the item shard) per candidate was
        a tenth of a 1,000-candidate request. Bounded like ``_shared_tag``'s cache."""
        if feature.startswith(USER_FEATURE_PREFIXES):
            return self.keys.feature(user_id, feature)
        key = self._shared_keys.get(feature)
        if key is None:
            if len(self._shared_keys) >= 1 << 18:
                self._shared_keys.clear()
            key = self._shared_keys[feature] = self.keys.feature(user_id, feature).encode()  # sent as is
        return key

    def tags(self, user_id: str, features: Iterable[str]) -> set[str]:
        """The slots an event with these features writes (its user's slot always: the marker)."""
        return {f"u:{user_id}"} | {self.keys.tag(user_id, f) for f in features}

    async def applied(self, events: Sequence[tuple[str, str, Sequence[str]]]) -> set[str]:
        """Of ``(event_id, user_id, features)``, the events every slot of which already has its
        deltas: a redelivery the batch must not learn again. An event that reached only some of
        its slots (a crash between them) is learned again; the slots that have it skip it."""
        done, _, _ = await self.lookup(events)
        return done

    async def lookup(
        self, events: Sequence[tuple[str, str, Sequence[str]]], extra: Sequence[str] = ()
    ) -> tuple[set[str], dict[tuple[str, str], tuple[float, float]], list[bytes | None]]:
        """Which events are learned everywhere (:meth:`applied`), the ``(z, n)`` of every feature
        of ``events``, and an ``MGET`` of the ``extra`` keys, in one round trip (ingest's read per
        batch)."""
        per_event = [[self.keys.marker(t, eid) for t in sorted(self.tags(user, fs))] for eid, user, fs in events]
        markers = [k for ks in per_event for k in ks]
        wanted = list(dict.fromkeys((user, f) for _, user, fs in events for f in fs))
        feature_keys = [self.keys.feature(u, f) for u, f in wanted]
        reads = [MultiGet(markers, self.cluster), MultiGet(feature_keys, self.cluster), MultiGet(extra, self.cluster)]
        pipe = self.redis.pipeline(transaction=False)
        for read in reads:
            read.queue(pipe)
        replies = await pipe.execute() if any(len(r) for r in reads) else []
        values, at = [], 0
        for read in reads:
            values.append(read.values(replies[at : at + len(read)]))
            at += len(read)
        found = dict(zip(markers, values[0]))
        done = {eid for (eid, _, _), ks in zip(events, per_event) if all(found[k] is not None for k in ks)}
        stored = {uf: unpack(raw) for uf, raw in zip(wanted, values[1]) if raw is not None}
        return done, stored, values[2]

    async def weights(self, params: FTRLParams, features: Sequence[str] = REAL_FEATURES) -> dict[str, float]:
        """The current weights of shared features (by default the served score's term weights)."""
        names, read = self.reads("", features)
        pipe = self.redis.pipeline(transaction=False)
        read.queue(pipe)
        raw = read.values(await pipe.execute())
        return layer_weights(params, {f: unpack(v) for f, v in zip(names, raw) if v is not None}) | {
            f: 0.0 for f, v in zip(names, raw) if v is None
        }

    async def add(self, updates: Sequence[WideUpdate]) -> int:
        """Add each event's deltas once per slot; returns how many events were new in their
        user's slot."""
        calls: dict[str, _SlotCall] = defaultdict(_SlotCall)
        for up in updates:
            per_tag: dict[str, list[list[float]]] = defaultdict(list)
            for f, (dz, dn) in up.deltas.items():
                tag = self.keys.tag(up.user_id, f)
                call = calls[tag]
                key = self.keys.feature(up.user_id, f)
                idx = call.features.setdefault(key, len(call.features) + 1)
                per_tag[tag].append([idx, dz, dn])
            for tag in self.tags(up.user_id, [*up.features, *up.deltas]):  # a marker even without a delta
                per_tag.setdefault(tag, [])
            for tag, deltas in per_tag.items():
                call = calls[tag]
                call.markers.append(self.keys.marker(tag, up.event_id))
                call.events.append(deltas)
        if not calls:
            return 0
        sha = self._scripts.sha[_ADD_SCRIPT]
        order = list(calls)

        def build(pipe: Any) -> None:
            for tag in order:
                call = calls[tag]
                keys = [*call.markers, *call.features]
                pipe.execute_command(
                    "EVALSHA",
                    sha,
                    len(keys),
                    *keys,
                    self.marker_ttl_s,
                    self.state_ttl_s,
                    orjson.dumps(call.events),
                )

        results = await self._scripts.execute(self.redis, build)
        return sum(int(r) for tag, r in zip(order, results) if tag.startswith("u:"))
