"""The ReLoop2 error memory and the session memory in Redis: key layout, write script, read path.

The math is ``driftrec.models.error_memory``; this module is its Redis home, written at ingest
(``storage.served_memory.ServedErrorMemories.write``, from ``streams.fusion_writer``), read by the
scoring service (``plan_buckets`` / ``sums_from_values`` through ``storage.served_memory.MemoryRead``,
inside its one pipelined round trip) and
read as of each event's time by that same writer, which learns the fusion
(``ServedErrorMemories.sums_before``). Which hidden space keys the LSH buckets -- a pinned "key
snapshot", never the one that happens to be newest -- is ``storage/served_memory.py``.

Write side
----------
Key layout. One LSH bucket ``(version, table, code)`` is two keys; the hash tag is the bucket's
*shard* ``code mod n_shards``, so both keys of a bucket — and the other buckets of its shard —
live in one Redis Cluster slot:

    {prefix}:em2:{v<version>:t<table>:s<shard>}:b<code>:z   ZSET    member=event_id, score=event ts
    {prefix}:em2:{v<version>:t<table>:s<shard>}:b<code>:s   STRING  packed little-endian float64
                                                            triples (ts, y, ŷ_served), 24 bytes an entry

Why this shape:
* The ZSET gives membership (a re-written ``event_id`` is a no-op: Kafka redelivery is harmless)
  and the FIFO order (oldest *event time* leaves first; ties by event_id bytes — exactly the order
  the in-process ``ErrorMemory`` uses).
* The STRING is the bucket's entries in ZSET order, rebuilt by the write script. The read path
  then needs one ``MGET`` for all candidates × tables instead of one command per bucket (redis-py
  spends ~0.1 ms of client CPU per pipelined command; 100 candidates × 8 tables would cost 80 ms).
  Packed binary (Lua ``struct.pack('<ddd')``) rather than text because the scoring service reads
  hundreds of buckets per request: ``np.frombuffer`` over the joined values is a memcpy, where
  parsing decimal text cost milliseconds; the doubles round-trip exactly either way.
* Sharding the hash tag (default 16 shards per table) lets a micro-batch be written with one
  ``EVALSHA`` per (table, shard) — at most ``n_tables × n_shards`` script calls per batch, all in one
  pipelined round trip — while still spreading a version over ``n_tables × n_shards`` slots.
* A Lua script, because "add if absent, trim to capacity, rebuild the snapshot, refresh TTL" must
  be atomic; all its keys share one slot, so it is legal on Redis Cluster.

Read side
---------
What is read is each query's neighbour sums (``models.error_memory.ErrorSums``); the estimate
``ê`` follows once the query's served score is known, and ``models/served.py`` turns it into the
correction the fusion weighs. All candidates ×
tables are fetched in **one round trip**: a single ``MGET`` of the distinct buckets' snapshot keys
(on a Redis Cluster client, ``mget_nonatomic``, which sends one MGET per slot in one pipeline).
The estimate is the same function the in-process reference ``models.error_memory.ErrorMemory``
uses, so both give the same answers.

The read is split in two plain steps — :func:`plan_buckets` (which keys) and
:func:`sums_from_values` (what they hold) — so the scoring service can put the ``MGET`` into
the same pipeline as its other reads (one round trip per request in total).

Who writes
----------
The ingest worker that owns the user's partition, in the batch that applies the event: the
memories are ReLoop2's fast loop and must not wait for the trainer's micro-batches
(``streams.fusion_writer`` says how it follows the served snapshot). The errors must be those of
the score served *before* anything learned the events — an error taken from a snapshot that
already learned its event was never made (we measured compensation turning harmful that way) — so
ingest scores with the newest *published* snapshot, which the trainer publishes only after
learning what it holds, and the fusion layer's state before the event. ``ŷ_served`` is the fused
score before the memories' own correction (``models/served.py`` says why). Writes are
idempotent per event id (see the write side above).

Reads as of a time: each bucket's entries are in event-time order, so "what the memory held when
the event at ``t`` was served" is the prefix of entries with ``ts < t``
(``sums_from_values(before=...)``). The fusion writer learns from that, so an event's own
error, which a redelivery may already have written, never leaks into its estimate.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from redis.asyncio import Redis

from driftrec.contract.interaction import Interaction, stable_hash
from driftrec.models.error_memory import (
    DEFAULT_EPS,
    DEFAULT_GAMMA,
    DEFAULT_LAMBDA,
    DEFAULT_PRIOR,
    ErrorSums,
    HiddenPredictor,
    RandomProjectionLSH,
    compensation_delta,
    recency_weights,
    session_code,
)
from driftrec.storage.client import Scripts, mget

log = logging.getLogger(__name__)

B = TypeVar("B", bound=Hashable)  # a bucket id: (table, code) for LSH buckets, code for sessions

# KEYS: z1, s1, z2, s2, ...   ARGV: capacity, ttl_s, then per bucket: m, m × (event_id, ts, y, ŷ)
ENTRY_BYTES = 24  # one (ts, y, ŷ_served) triple of little-endian float64
# "em2": entries are (ts, y, ŷ) triples; the first layout ("em") held (ts, error) pairs, whose
# byte strings can also be a multiple of 24 long, so the two must never share key names.
KEY_SPACE = "em2"
WRITE_BUCKETS_LUA = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local added = 0
local a = 3
for k = 1, #KEYS, 2 do
  local zkey, skey = KEYS[k], KEYS[k + 1]
  local m = tonumber(ARGV[a])
  a = a + 1
  local ids = redis.call('ZRANGE', zkey, 0, -1)
  local vals = {}
  local snap = redis.call('GET', skey)
  local nbytes = 0
  if snap then nbytes = #snap end
  if nbytes ~= 24 * #ids then
    -- one of the pair expired or was deleted alone: start the bucket afresh
    redis.call('DEL', zkey, skey)
    ids = {}
  else
    for i = 1, #ids do vals[ids[i]] = string.sub(snap, 24 * i - 23, 24 * i) end
  end
  local fresh = {}
  for q = 1, m do
    local eid, ts, y, p = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
    a = a + 4
    if vals[eid] == nil then
      redis.call('ZADD', zkey, ts, eid)
      vals[eid] = struct.pack('<ddd', tonumber(ts), tonumber(y), tonumber(p))
      fresh[eid] = true
    end
  end
  if next(fresh) ~= nil then
    local n = redis.call('ZCARD', zkey)
    if n > cap then redis.call('ZREMRANGEBYRANK', zkey, 0, n - cap - 1) end
    ids = redis.call('ZRANGE', zkey, 0, -1)
    local out = {}
    for i = 1, #ids do
      out[i] = vals[ids[i]]
      if fresh[ids[i]] then added = added + 1 end
    end
    redis.call('SET', skey, table.concat(out), 'KEEPTTL')
  end
  if ttl > 0 then
    redis.call('EXPIRE', zkey, ttl)
    redis.call('EXPIRE', skey, ttl)
  end
end
return added
"""
_SCRIPTS = Scripts(WRITE_BUCKETS_LUA)
WRITE_BUCKETS_SHA = _SCRIPTS.sha[WRITE_BUCKETS_LUA]


@dataclass(frozen=True)
class MemoryKeys:
    """Names every key of one model version's memory; the version is inside the hash tag, so a new
    version starts from an empty memory and the old one is retired as a whole (TTL or delete)."""

    prefix: str
    version: int
    n_shards: int = 16
    # "k": LSH buckets under key snapshot ``version`` (``storage/served_memory.py``); "v": a model
    # generation (the session memory, which no hidden space keys, and callers that key by hand)
    space: str = "v"

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError("the key prefix must not contain '{' or '}' (it would move the hash tag)")
        if self.n_shards < 1:
            raise ValueError("n_shards must be positive")
        if self.space not in ("v", "k"):
            raise ValueError("space must be 'v' (a generation) or 'k' (a key snapshot)")

    @classmethod
    def from_settings(cls, key_prefix: str, version: int, n_shards: int = 16) -> MemoryKeys:
        """``key_prefix`` is ``Settings.key_prefix``; kept a plain string so callers decide."""
        return cls(prefix=key_prefix, version=version, n_shards=n_shards)

    def tag(self, table: int, code: int) -> str:
        return f"{{{self.space}{self.version}:t{table}:s{code % self.n_shards}}}"

    def bucket(self, table: int, code: int) -> tuple[str, str]:
        """``(zset_key, snapshot_key)`` of one bucket; both carry the same hash tag."""
        base = f"{self.prefix}:{KEY_SPACE}:{self.tag(table, code)}:b{code}"
        return f"{base}:z", f"{base}:s"

    def session_bucket(self, code: int) -> tuple[str, str]:
        """``(zset_key, snapshot_key)`` of a session-memory bucket (``models.error_memory.SessionMemory``):
        same entry format and script as the LSH buckets, its own shard tags (``u`` for "user")."""
        base = f"{self.prefix}:{KEY_SPACE}:{{v{self.version}:u:s{code % self.n_shards}}}:b{code}"
        return f"{base}:z", f"{base}:s"

    def pattern(self) -> str:
        """SCAN pattern matching this version's keys (cleanup, memory accounting)."""
        return f"{self.prefix}:{KEY_SPACE}:{{{self.space}{self.version}:*"


def event_key(interaction: Interaction) -> str:
    """The idempotency key: the contract's ``event_id``; a stable digest if a caller has none."""
    if interaction.event_id:
        return interaction.event_id
    digest = stable_hash(f"{interaction.user_id}\x1f{interaction.item_id}\x1f{interaction.ts!r}", 1 << 62)
    return f"_h{digest:x}"


def _check(keys: MemoryKeys, lsh: RandomProjectionLSH) -> None:
    if keys.version != lsh.version:
        raise ValueError(f"keys are for model version {keys.version}, the LSH for {lsh.version}")


async def write_errors(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    interactions: Sequence[Interaction],
    probs: np.ndarray,
    hidden: np.ndarray,
    *,
    capacity: int,
    ttl_s: int = 0,
) -> int:
    """Store ``(event_id, ts, y, ŷ)`` of every labelled interaction in its bucket of every table.

    ``probs``/``hidden`` must be what the model *served* for these interactions (before it learned
    from them), otherwise the memory records errors the model no longer makes. Unlabelled
    interactions are skipped. Returns the number of new bucket entries that survived the FIFO trim
    (0 for a re-written batch).
    """
    calls = lsh_calls(keys, lsh, interactions, probs, hidden, capacity)
    return int(sum(await run_scripts(redis, calls, ttl_s))) if calls else 0


# One write-script call: its keys (one slot), the capacity of its buckets, its entry arguments
ScriptCall = tuple[list[str], int, list[str | int]]


def lsh_calls(
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    interactions: Sequence[Interaction],
    probs: np.ndarray,
    hidden: np.ndarray,
    capacity: int,
) -> list[ScriptCall]:
    _check(keys, lsh)
    labelled = [i for i, x in enumerate(interactions) if x.label is not None]
    if not labelled:
        return []
    idx = np.asarray(labelled)
    codes = lsh.codes(np.asarray(hidden)[idx])
    served = np.asarray(probs, dtype=np.float64)[idx]
    per_bucket: dict[tuple[int, int], list[str]] = defaultdict(list)
    for row, i in enumerate(labelled):
        entry = _entry(interactions[i], float(served[row]))
        for t in range(lsh.n_tables):
            per_bucket[(t, int(codes[row, t]))].extend(entry)
    # one script call per (table, shard): its buckets share a slot
    return _script_calls(per_bucket, lambda b: (b[0], b[1] % keys.n_shards), lambda b: keys.bucket(*b), capacity)


def _entry(x: Interaction, served: float) -> tuple[str, str, str, str]:
    """One entry's script arguments: ``(event_id, ts, y, ŷ)`` as exact decimal text."""
    return event_key(x), repr(float(x.ts)), repr(float(x.label or 0)), repr(served)  # callers pass labelled only


def _script_calls(
    per_bucket: dict[B, list[str]],
    slot: Callable[[B], Hashable],
    bucket_keys: Callable[[B], tuple[str, str]],
    capacity: int,
) -> list[ScriptCall]:
    """One script call per hash-tag slot (a call's keys must share one), each bucket's entries
    preceded by their count, as ``WRITE_BUCKETS_LUA`` reads its arguments."""
    groups: dict[Hashable, tuple[list[str], list[str | int]]] = {}
    for bucket, entries in per_bucket.items():
        keys_, args = groups.setdefault(slot(bucket), ([], []))
        keys_.extend(bucket_keys(bucket))
        args.append(len(entries) // 4)
        args.extend(entries)
    return [(keys_, capacity, args) for keys_, args in groups.values()]


async def write_session_errors(
    redis: Redis,
    keys: MemoryKeys,
    interactions: Sequence[Interaction],
    probs: np.ndarray,
    *,
    capacity: int,
    ttl_s: int = 0,
) -> int:
    """Store ``(event_id, ts, y, ŷ)`` of every labelled interaction in its ``(user, category)``
    bucket (``models.error_memory.SessionMemory``); idempotent per event id like :func:`write_errors`."""
    calls = session_calls(keys, interactions, probs, capacity)
    return int(sum(await run_scripts(redis, calls, ttl_s))) if calls else 0


def session_calls(
    keys: MemoryKeys, interactions: Sequence[Interaction], probs: np.ndarray, capacity: int
) -> list[ScriptCall]:
    per_bucket: dict[int, list[str]] = defaultdict(list)
    for x, p in zip(interactions, np.asarray(probs, dtype=np.float64)):
        if x.label is not None:
            per_bucket[session_code(x.user_id, x.category)].extend(_entry(x, float(p)))
    return _script_calls(per_bucket, lambda code: code % keys.n_shards, keys.session_bucket, capacity)


async def run_scripts(redis: Redis, calls: list[ScriptCall], ttl_s: int | Sequence[int]) -> list[int]:
    """One pipelined round trip of bucket writes (``Scripts`` reloads a lost script and redoes the
    batch, safe because the script is idempotent per event_id); ``ttl_s`` for all, or per call."""
    ttls = [ttl_s] * len(calls) if isinstance(ttl_s, int) else list(ttl_s)

    def build(pipe: Any) -> None:
        for (keys_, capacity, args), ttl in zip(calls, ttls):
            pipe.execute_command("EVALSHA", WRITE_BUCKETS_SHA, len(keys_), *keys_, capacity, ttl, *args)

    return [int(r) for r in await _SCRIPTS.execute(redis, build)]


async def learn_and_write(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    predictor: HiddenPredictor,
    interactions: Sequence[Interaction],
    *,
    capacity: int,
    ttl_s: int = 0,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Score a micro-batch with the served model and write its errors.

    Call it *before* the model learns the batch (test-then-train), so the stored errors are the
    ones users saw. Returns ``(new entries, probs, hidden)`` so the caller can reuse the forward pass.
    """
    probs, hidden = predictor.predict_with_hidden(interactions)
    written = await write_errors(redis, keys, lsh, interactions, probs, hidden, capacity=capacity, ttl_s=ttl_s)
    return written, probs, hidden


async def delete_memory(redis: Redis, keys: MemoryKeys, batch: int = 500) -> int:
    """Drop every key of this version (tests, benchmarks, retiring an old model version)."""
    deleted = 0
    chunk: list[str] = []
    async for key in redis.scan_iter(match=keys.pattern(), count=batch):
        chunk.append(key)
        if len(chunk) >= batch:
            deleted += await redis.unlink(*chunk)
            chunk = []
    if chunk:
        deleted += await redis.unlink(*chunk)
    return deleted


# ---- read side --------------------------------------------------------------------------------
_ENTRY = np.dtype("<f8")


class BucketNames:
    """Every bucket's snapshot key name of one (keys, lsh), built once.

    Why: formatting ``n_candidates × n_tables`` key strings per request is the slowest part of a
    naive read; with ``2**n_bits`` codes per table the whole name table is small (8 × 1024 by
    default), so a request only indexes into it.
    """

    def __init__(self, keys: MemoryKeys, lsh: RandomProjectionLSH) -> None:
        if keys.version != lsh.version:
            raise ValueError(f"keys are for model version {keys.version}, the LSH for {lsh.version}")
        self.keys, self.lsh = keys, lsh
        self.n_codes = 1 << lsh.n_bits
        names = [keys.bucket(t, c)[1].encode() for t in range(lsh.n_tables) for c in range(self.n_codes)]
        self.names = np.array(names, dtype=object)
        self._offsets = (np.arange(lsh.n_tables, dtype=np.int64) * self.n_codes)[None, :]

    def flat_ids(self, codes: np.ndarray) -> np.ndarray:
        """(n, n_tables) codes → (n, n_tables) indices into ``names``."""
        return codes + self._offsets


@dataclass(frozen=True)
class BucketPlan:
    """Which keys to fetch (``names``, distinct) and which of them each candidate reads (``rows``)."""

    names: list[bytes]
    rows: np.ndarray  # (n, n_tables) positions into names


def plan_buckets(names: BucketNames, hidden: np.ndarray) -> BucketPlan:
    codes = names.lsh.codes(hidden)
    if codes.shape[0] == 0:
        return BucketPlan([], np.zeros((0, names.lsh.n_tables), dtype=np.int64))
    flat = names.flat_ids(codes)
    # the id space is small (n_tables · 2**n_bits): a presence table beats sorting for unique()
    present = np.zeros(names.names.size, dtype=bool)
    present[flat] = True
    distinct = np.flatnonzero(present)
    position = np.cumsum(present) - 1
    return BucketPlan(names.names[distinct].tolist(), position[flat])


def plan_session_buckets(keys: MemoryKeys, pairs: Sequence[tuple[str, str | None]]) -> BucketPlan:
    """The session memory's keys for ``(user, category)`` pairs (a candidate list, or a trainer
    batch): one bucket each, every distinct pair fetched once (``models.error_memory.SessionMemory``)."""
    where = {pair: j for j, pair in enumerate(dict.fromkeys(pairs))}  # a candidate list has few distinct pairs
    names = [keys.session_bucket(session_code(*pair))[1].encode() for pair in where]
    rows = np.fromiter(map(where.__getitem__, pairs), dtype=np.int64, count=len(pairs)).reshape(-1, 1)
    return BucketPlan(names, rows)


def sums_from_values(
    values: list[bytes | None],
    plan: BucketPlan,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
    before: np.ndarray | None = None,
) -> ErrorSums:
    """What the buckets of ``plan`` (the MGET reply ``values``) hold for each query.

    ``before`` (one event time per query): count only the entries of strictly earlier events,
    i.e. what the memory held when that event was served, whoever has written since (ingest's
    fusion writer learns this way from buckets another worker may already have written). A value
    whose length is not a whole number of entries (e.g. a bucket written in an older format) is
    read as empty rather than misparsed.
    """
    n = plan.rows.shape[0]
    counts = np.fromiter(
        (len(v) // ENTRY_BYTES if v and len(v) % ENTRY_BYTES == 0 else 0 for v in values),
        dtype=np.int64,
        count=len(values),
    )
    if n == 0 or not counts.any():
        return ErrorSums(np.zeros(n), np.zeros(n), np.zeros(n), gamma, prior)
    blob = b"".join(v for v, c in zip(values, counts) if c and v is not None)
    entries = np.frombuffer(blob, dtype=_ENTRY).reshape(-1, 3)  # columns: ts, y, ŷ_served
    owner = np.repeat(np.arange(len(values)), counts)
    if half_life_s > 0 and now is not None:
        w = recency_weights(entries[:, 0], now, half_life_s)
    else:
        w = np.ones(entries.shape[0])
    if before is None:
        bucket_w = np.bincount(owner, weights=w, minlength=len(values))
        bucket_wy = np.bincount(owner, weights=w * entries[:, 1], minlength=len(values))
        bucket_wp = np.bincount(owner, weights=w * entries[:, 2], minlength=len(values))
        # a candidate's sums are the sums of its buckets' sums: the same quantities ErrorMemory
        # computes entry by entry (an entry found in k of its buckets counts k times)
        support = bucket_w[plan.rows].sum(axis=1)
        sum_y = bucket_wy[plan.rows].sum(axis=1)
        sum_p = bucket_wp[plan.rows].sum(axis=1)
    else:
        support, sum_y, sum_p = _sums_before(entries, owner, counts, w, plan.rows, np.asarray(before, dtype=np.float64))
    return ErrorSums(support, sum_y, sum_p, gamma, prior)


def estimates_from_values(
    values: list[bytes | None],
    plan: BucketPlan,
    query_probs: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
    before: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ê, neighbour weight)`` per query whose served score is ``query_probs``
    (:func:`sums_from_values`, then the estimate)."""
    sums = sums_from_values(values, plan, gamma=gamma, prior=prior, half_life_s=half_life_s, now=now, before=before)
    return sums.estimate(np.asarray(query_probs, dtype=np.float64)), sums.weight


def _sums_before(
    entries: np.ndarray, owner: np.ndarray, counts: np.ndarray, w: np.ndarray, rows: np.ndarray, before: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate, ``Σw``, ``Σw·y``, ``Σw·ŷ`` over its buckets' entries with ``ts < before``.

    A bucket's entries are stored in event-time order (its ZSET's), so "earlier than t" is a
    prefix of each bucket: one ``searchsorted`` over (bucket, ts) keys finds every prefix, and
    prefix sums give the totals.
    """
    ts = entries[:, 0]
    t0 = float(min(ts.min(), before.min()))
    span = float(max(ts.max(), before.max())) - t0 + 2.0  # keys of one bucket stay below the next's
    keys = owner * span + (ts - t0)
    order = np.argsort(keys, kind="stable")  # already sorted unless a bucket was written out of order
    keys = keys[order]
    starts = np.concatenate(([0], np.cumsum(counts)))
    prefix = [np.concatenate(([0.0], np.cumsum(col[order]))) for col in (w, w * entries[:, 1], w * entries[:, 2])]
    query = rows * span + (before[:, None] - t0)  # (n, buckets per candidate)
    ends = np.searchsorted(keys, query, side="left")
    lo = starts[rows]
    ends = np.clip(ends, lo, starts[rows + 1])
    support, sum_y, sum_p = ((p[ends] - p[lo]).sum(axis=1) for p in prefix)
    return support, sum_y, sum_p


async def read_estimates(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    hidden: np.ndarray,
    base_probs: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
    names: BucketNames | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ê, neighbour weight)`` per row of ``hidden`` (served ``base_probs``); zero where the
    memory knows nothing.

    Pass a long-lived ``names`` to skip building the key table on every call."""
    if names is None:
        names = BucketNames(keys, lsh)
    elif names.keys != keys or names.lsh is not lsh:
        raise ValueError("names were built for other keys or another LSH")
    plan = plan_buckets(names, hidden)
    if not plan.names:
        return np.zeros(0), np.zeros(0)
    raw = await mget(redis, plan.names)  # per slot on a Redis Cluster, one round trip
    return estimates_from_values(raw, plan, base_probs, gamma=gamma, prior=prior, half_life_s=half_life_s, now=now)


async def read_compensation(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    hidden: np.ndarray,
    base_probs: np.ndarray,
    *,
    lam: float = DEFAULT_LAMBDA,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    now: float | None = None,
    eps: float = DEFAULT_EPS,
    names: BucketNames | None = None,
) -> np.ndarray:
    """Additive correction per candidate, probability space: ``clip(ŷ + λ·ê) − ŷ``."""
    e_hat, _ = await read_estimates(
        redis, keys, lsh, hidden, base_probs, gamma=gamma, prior=prior, half_life_s=half_life_s, now=now, names=names
    )
    return compensation_delta(base_probs, e_hat, lam, eps)
