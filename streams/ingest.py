"""Ingest as plain functions: from a micro-batch of messages to applied state and dead letters.

The Faust agent in ``streams.worker`` only moves messages; what is accepted, what a dead letter
says, and how a batch rides out a failing Redis or broker are decided here, where they can be
tested without Faust.

Why a batch never raises (``IngestBatch.handle``): Faust acknowledges the events of a
``take_events`` batch even when its body raises, so a batch that fails is a batch lost. Instead
each step retries what may pass by itself (a Redis or broker that is down, hung or failing over)
with capped exponential backoff, for as long as it takes; the worker holds the batch's offsets
uncommitted meanwhile (a SIGKILL then redelivers it). What cannot pass by itself (an event the
code cannot apply) goes to the dead-letter topic with its reason, alone, so the rest of the batch
is applied.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from driftrec.contract.events import DeadLetter, Event, InvalidEvent, parse_event
from driftrec.contract.settings import IngestSettings
from driftrec.storage.claims import Claimed, describe_claim

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RawMessage:
    """What a handler needs of a Kafka message, independent of Faust's types."""

    value: bytes | None  # None: a tombstone (dead-lettered)
    key: bytes | None
    topic: str
    partition: int | None
    offset: int | None


@dataclass(frozen=True)
class Accepted:
    """A message that holds a contract event."""

    msg: RawMessage
    event: Event


def parse_batch(
    messages: Sequence[RawMessage], max_event_bytes: int | None = None, require_key: bool = False
) -> tuple[list[Accepted], list[tuple[RawMessage, str]]]:
    """Partition a batch into accepted events and (message, reason) rejects, keeping order."""
    accepted: list[Accepted] = []
    rejected: list[tuple[RawMessage, str]] = []
    for msg in messages:
        reason, event = _judge_message(msg, max_event_bytes, require_key)
        if event is None:
            rejected.append((msg, reason))
        else:
            accepted.append(Accepted(msg, event))
    return accepted, rejected


def _judge_message(msg: RawMessage, max_event_bytes: int | None, require_key: bool) -> tuple[str, Event | None]:
    if msg.value is None:
        return "empty message value (tombstone)", None
    if max_event_bytes is not None and len(msg.value) > max_event_bytes:
        return f"message of {len(msg.value)} bytes exceeds ingest.max_event_bytes ({max_event_bytes})", None
    try:
        event = parse_event(msg.value)
    except InvalidEvent as exc:
        return str(exc), None
    if msg.key is None:
        if require_key:
            return f"message has no key; the key must be the user_id ({event.user_id!r})", None
    elif msg.key.decode(errors="replace") != event.user_id:
        return f"message key {msg.key!r} differs from user_id {event.user_id!r}", None
    return "", event


def split_valid(
    messages: Sequence[RawMessage], max_event_bytes: int | None = None, require_key: bool = False
) -> tuple[list[Event], list[tuple[RawMessage, str]]]:
    """Like :func:`parse_batch`, the events alone."""
    accepted, rejected = parse_batch(messages, max_event_bytes, require_key)
    return [a.event for a in accepted], rejected


def dead_letter(msg: RawMessage, reason: str, copy_bytes: int | None = None) -> DeadLetter:
    """The letter for a refused message; its copy of the value is cut to ``copy_bytes``."""
    value = msg.value or b""
    copy = value if copy_bytes is None or len(value) <= copy_bytes else value[:copy_bytes]
    truncated = len(copy) < len(value)
    if truncated:
        reason = f"{reason} (this letter holds the first {len(copy)} of {len(value)} bytes)"
    return DeadLetter(
        reason=reason,
        original=copy.decode("utf-8", errors="replace"),
        original_b64=base64.b64encode(copy).decode(),
        original_bytes=len(value),
        original_sha256=hashlib.sha256(value).hexdigest(),
        truncated=truncated,
        key=None if msg.key is None else msg.key.decode("utf-8", errors="replace")[:1024],
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        ts=time.time(),
    )


# ---- the batch ---------------------------------------------------------------------------------
class StateWriter(Protocol):
    async def apply(self, events: Sequence[Event]) -> int: ...


class Claims(Protocol):
    async def claim(self, copies: Sequence[tuple[Event, int | None, int | None]]) -> list[Claimed]: ...


class AppliedEventsWriter(Protocol):
    """State derived from applied events (served errors, TPP propensities): ``write`` them."""

    async def write(self, events: Sequence[Event]) -> int: ...


# sends (key, letter) pairs; returns, per letter, None once the broker has it, else the error
SendLetters = Callable[[list[tuple[bytes | None, bytes]]], Awaitable[list[BaseException | None]]]


@dataclass
class BatchOutcome:
    applied: int = 0  # new events applied to state
    redelivered: int = 0  # canonical copies whose state was applied before (a redelivery)
    duplicates: int = 0  # same content under a claimed id, at another offset (a producer retry)
    dead_lettered: int = 0
    retries: int = 0  # transient failures ridden out
    reasons: list[str] = field(default_factory=list)


class IngestBatch:
    """Handles one micro-batch: parse, claim ids, dead-letter, apply state, then the writers of
    derived state (``derived``: the served errors into the memories, the TPP propensities).

    ``is_transient`` says which failures are retried (Redis and broker errors that pass by
    themselves); any other failure is the event's, and the event alone is dead-lettered.
    """

    def __init__(
        self,
        cfg: IngestSettings,
        state: StateWriter,
        claims: Claims,
        send_letters: SendLetters,
        is_transient: Callable[[BaseException], bool],
        derived: Sequence[AppliedEventsWriter] = (),
        on_retry: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.claims = claims
        self.send_letters = send_letters
        self.is_transient = is_transient
        self.derived = list(derived)
        self.on_retry = on_retry  # (step, error) per transient failure: the worker's health sees a stall
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep

    async def handle(self, messages: Sequence[RawMessage]) -> BatchOutcome:
        out = BatchOutcome()
        accepted, rejected = parse_batch(messages, self.cfg.max_event_bytes, self.cfg.require_key)
        claimed = await self._retry(
            lambda: self.claims.claim([(a.event, a.msg.partition, a.msg.offset) for a in accepted]), "claim ids", out
        )
        canonical: list[Accepted] = []
        for a, c in zip(accepted, claimed):
            if c.verdict == "canonical":
                canonical.append(a)
            elif c.verdict == "duplicate":
                out.duplicates += 1
            else:
                rejected.append(
                    (
                        a.msg,
                        f"event_id {a.event.event_id!r} is taken by {describe_claim(c.stored)}, with other contents",
                    )
                )
        applied = await self._apply(canonical, rejected, out)
        await self._dead_letter(rejected, out)
        if applied:
            for writer in self.derived:
                await self._write_derived(writer, applied, out)
        return out

    async def _apply(
        self, canonical: list[Accepted], rejected: list[tuple[RawMessage, str]], out: BatchOutcome
    ) -> list[Event]:
        """Apply the batch in one round trip; if it fails for a reason other than a transient one,
        apply the events one by one so only those that fail are dead-lettered."""
        events = [a.event for a in canonical]
        if not events:
            return []
        try:
            new = await self._retry(lambda: self.state.apply(events), "apply state", out)
            out.applied += new
            out.redelivered += len(events) - new
            return events
        except Exception as exc:
            log.warning("a batch of %d events failed (%s); applying them one by one", len(events), exc)
        applied: list[Event] = []
        for a in canonical:

            def apply_one(event: Event = a.event) -> Awaitable[int]:
                return self.state.apply([event])

            try:
                new = await self._retry(apply_one, "apply state", out)
            except Exception as exc:
                rejected.append((a.msg, f"could not be applied: {type(exc).__name__}: {str(exc)[:500]}"))
                continue
            out.applied += new
            out.redelivered += 1 - new
            applied.append(a.event)
        return applied

    async def _dead_letter(self, rejected: list[tuple[RawMessage, str]], out: BatchOutcome) -> None:
        """Every refused message reaches the DLQ before the batch counts as handled; a letter the
        broker refuses as such (too large for it, say) goes again without its copy."""
        if not rejected:
            return
        letters = [(msg.key, dead_letter(msg, reason, self.cfg.dlq_copy_bytes)) for msg, reason in rejected]
        pending = [(key, letter.model_dump_json().encode()) for key, letter in letters]
        errors = await self._retry(lambda: self._send_all(pending), "send dead letters", out)
        bare = []
        for (key, letter), error in zip(letters, errors):
            if error is not None:
                log.error("the DLQ refused a letter (%s); sending it without its copy", error)
                letter = letter.model_copy(
                    update={
                        "original": "",
                        "original_b64": "",
                        "truncated": True,
                        "reason": f"{letter.reason} (copy dropped: {error})",
                    }
                )
                bare.append((key, letter.model_dump_json().encode()))
        if bare:
            for error in await self._retry(lambda: self._send_all(bare), "send dead letters", out):
                if error is not None:
                    log.error("the DLQ refused a letter without its copy too: %s", error)
        for msg, reason in rejected:
            log.warning("dead-lettered offset %s/%s: %s", msg.partition, msg.offset, reason[:300])
        out.dead_lettered += len(rejected)
        out.reasons += [reason for _, reason in rejected]

    async def _send_all(self, letters: list[tuple[bytes | None, bytes]]) -> list[BaseException | None]:
        """Send; a transient error of any letter fails the whole send (to be retried), any other is
        that letter's."""
        errors = await self.send_letters(letters)
        for error in errors:
            if error is not None and self.is_transient(error):
                raise error
        return errors

    async def _write_derived(self, writer: AppliedEventsWriter, events: list[Event], out: BatchOutcome) -> None:
        """Derived state is retried while the failure is transient; any other failure is logged,
        not retried (the user's next event writes it again), and the batch goes on."""
        try:
            await self._retry(lambda: writer.write(events), f"write {type(writer).__name__}", out)
        except Exception:
            log.exception("%s failed on %d events", type(writer).__name__, len(events))

    async def _retry(self, step: Callable[[], Awaitable[T]], what: str, out: BatchOutcome) -> T:
        """``step()`` until it does not fail transiently, with capped exponential backoff."""
        delay, failing_since = self.cfg.retry_backoff_s, None
        last_log = 0.0
        while True:
            try:
                result = await step()
            except Exception as exc:
                if not self.is_transient(exc):
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                out.retries += 1
                if self.on_retry is not None:
                    self.on_retry(what, exc)
                if now - last_log >= 10.0:
                    log.warning(
                        "%s failed (%s: %s); retrying, failing for %.0f s",
                        what,
                        type(exc).__name__,
                        exc,
                        now - failing_since,
                    )
                    last_log = now
                await self.sleep(delay)
                delay = min(delay * 2, self.cfg.retry_backoff_max_s)
                continue
            if failing_since is not None:
                log.warning("%s recovered after %.1f s", what, time.monotonic() - failing_since)
            return result
