"""A pure-Python statement of what the worker's Redis state must be after a set of events.

The worker's state must depend only on the *set* of distinct events it saw, so this model
ignores order and duplicates on purpose (of copies under one id, the first is the event).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import cast

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.storage.client import connect_sync
from driftrec.storage.event_state import StateKeys, sequence_member


def expected_state(events: Iterable[Event], prefix: str, max_seq_len: int) -> dict[str, object]:
    first: dict[str, Event] = {}
    for e in events:  # the first copy of an id is the event (storage.claims); the others are not
        first.setdefault(e.event_id, e)
    unique = first.values()
    keys = StateKeys(prefix)
    counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(int))
    seqs: dict[str, list[tuple[float, bytes]]] = defaultdict(list)
    categories: dict[str, str] = {}
    for e in unique:
        for key in (keys.user_counts(e.user_id), keys.item_counts(e.item_id)):
            c = counts[key]
            c["events"] += 1
            c[f"kind:{e.kind}"] += 1
            if e.label is not None:
                c["labelled"] += 1
                c["positives"] += e.label
        if e.category:
            categories[keys.item_counts(e.item_id)] = e.category
        user = counts[keys.user_counts(e.user_id)]
        user["last_ts"] = max(user.get("last_ts", float("-inf")), e.ts)
        seqs[keys.user_seq(e.user_id)].append((e.ts, sequence_member(e)))
    hashes: dict[str, dict[str, float | str]] = {k: {f: float(v) for f, v in c.items()} for k, c in counts.items()}
    for key, category in categories.items():
        hashes[key]["category"] = category
    state: dict[str, object] = dict(hashes)
    for key, entries in seqs.items():
        state[key] = sorted(entries)[-max_seq_len:]
    return state


def redis_state(settings: Settings) -> dict[str, object]:
    """Everything the ingest path keeps (dedup markers excluded: they carry wall-clock TTLs)."""
    client = connect_sync(settings)
    state: dict[str, object] = {}
    for raw_key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        key = raw_key.decode()
        if ":seen:" in key:
            continue
        if key.endswith(":counts"):
            counts = cast(dict[bytes, bytes], client.hgetall(key))
            state[key] = {f.decode(): v.decode() if f == b"category" else float(v) for f, v in counts.items()}
        elif key.endswith(":seq"):
            rows = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
            state[key] = [(ts, m) for m, ts in rows]
    return state
