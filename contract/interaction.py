"""The sample every learner consumes, decoupled from the wire format.

Why a plain dataclass and not the pydantic ``Event``: ``models/`` must not depend on the
transport layer; ``contract.events.Event.to_interaction()`` converts at the boundary (both live in this bottom layer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Interaction:
    user_id: str
    item_id: str
    ts: float
    label: int | None = None
    category: str | None = None
    kind: str = "impression"
    event_id: str = ""
    features: dict[str, str | float] = field(default_factory=dict)


def stable_hash(text: str, n_buckets: int, salt: str = "") -> int:
    """Hash a string id into ``[0, n_buckets)`` identically in every process.

    Python's ``hash()`` is salted per process; a snapshot trained in the worker must index the
    same rows when the scoring service loads it, so ids are hashed with blake2b.
    """
    digest = hashlib.blake2b(f"{salt}\x1f{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_buckets
