"""Ingest as plain functions: split a micro-batch into contract events and dead letters.

The Faust agents in ``streams.worker`` only move messages; what is accepted, and what a dead
letter says, is decided here, where it can be unit-tested without a broker.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass

from driftrec.contract.events import DeadLetter, Event, InvalidEvent, parse_event


@dataclass
class RawMessage:
    """What a handler needs of a Kafka message, independent of Faust's types."""

    value: bytes | None  # None: a tombstone (dead-lettered)
    key: bytes | None
    topic: str
    partition: int | None
    offset: int | None


def split_valid(messages: Sequence[RawMessage]) -> tuple[list[Event], list[tuple[RawMessage, str]]]:
    """Partition a batch into contract events and (message, reason) rejects, keeping order."""
    valid: list[Event] = []
    rejected: list[tuple[RawMessage, str]] = []
    for msg in messages:
        if msg.value is None:
            rejected.append((msg, "empty message value (tombstone)"))
            continue
        try:
            event = parse_event(msg.value)
        except InvalidEvent as exc:
            rejected.append((msg, str(exc)))
            continue
        if msg.key is not None and msg.key.decode(errors="replace") != event.user_id:
            rejected.append((msg, f"message key {msg.key!r} differs from user_id {event.user_id!r}"))
            continue
        valid.append(event)
    return valid, rejected


def dead_letter(msg: RawMessage, reason: str) -> DeadLetter:
    value = msg.value or b""
    return DeadLetter(
        reason=reason,
        original=value.decode("utf-8", errors="replace"),
        original_b64=base64.b64encode(value).decode(),
        key=None if msg.key is None else msg.key.decode("utf-8", errors="replace"),
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        ts=time.time(),
    )
