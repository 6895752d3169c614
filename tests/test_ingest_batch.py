"""The ingest batch as plain code: what is refused and why, how copies of an id are judged, and
that a failing dependency is waited out rather than skipped (the real-process versions of these
are in ``tests/test_faults.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
import pytest

from driftrec.contract.events import DeadLetter, Event
from driftrec.contract.settings import IngestSettings
from driftrec.storage.claims import Claimed, claim_value, judge
from driftrec.streams.ingest import IngestBatch, RawMessage, dead_letter, parse_batch


def _event(event_id: str = "e1", user: str = "u1", item: str = "i1", **extra: object) -> Event:
    return Event.model_validate(
        {"event_id": event_id, "user_id": user, "item_id": item, "ts": 9e8, "kind": "click"} | extra
    )


def _msg(event: Event | bytes, offset: int, key: bytes | None = b"u1", partition: int = 0) -> RawMessage:
    value = event.to_bytes() if isinstance(event, Event) else event
    return RawMessage(value=value, key=key, topic="events", partition=partition, offset=offset)


class MemoryClaims:
    """The claim rule of ``storage.claims`` over a dict (the Redis one runs in the fault tests)."""

    def __init__(self) -> None:
        self.stored: dict[str, str] = {}

    async def claim(self, copies: Sequence[tuple[Event, int | None, int | None]]) -> list[Claimed]:
        out = []
        for event, p, o in copies:
            mine = claim_value(event, p, o)
            found = self.stored.setdefault(event.event_id, mine)
            out.append(
                Claimed(judge(None if found == mine else found, mine), None if found == mine else found.encode())
            )
        return out


class FlakyState:
    """Fails ``failures`` times with ``error`` before applying; records what it applied."""

    def __init__(self, failures: int = 0, error: BaseException | None = None, poison: str | None = None) -> None:
        self.failures, self.error, self.poison = failures, error, poison
        self.applied: list[str] = []

    async def apply(self, events: Sequence[Event]) -> int:
        if self.failures:
            self.failures -= 1
            assert self.error is not None
            raise self.error
        if self.poison and any(e.event_id == self.poison for e in events):
            raise ValueError("cannot apply this one")
        new = [e.event_id for e in events if e.event_id not in self.applied]
        self.applied += new
        return len(new)


class Letters:
    def __init__(self, refuse_over: int | None = None) -> None:
        self.sent: list[DeadLetter] = []
        self.refuse_over = refuse_over

    async def __call__(self, letters: list[tuple[bytes | None, bytes]]) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for _, value in letters:
            if self.refuse_over is not None and len(value) > self.refuse_over:
                out.append(ValueError("message too large"))
            else:
                self.sent.append(DeadLetter.model_validate_json(value))
                out.append(None)
        return out


def _batch(state: FlakyState, letters: Letters, cfg: IngestSettings | None = None) -> IngestBatch:
    batch = IngestBatch(
        cfg or IngestSettings(),
        state,
        MemoryClaims(),
        letters,
        is_transient=lambda exc: isinstance(exc, ConnectionError),
    )
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    batch.sleep = sleep
    batch.slept = slept  # type: ignore[attr-defined]
    return batch


def test_oversized_and_keyless_messages_are_refused_with_reasons() -> None:
    big = b'{"pad": "' + b"x" * 2000 + b'"}'
    accepted, rejected = parse_batch(
        [_msg(big, 0), _msg(_event(), 1, key=None), _msg(_event("e2"), 2)], max_event_bytes=1000, require_key=True
    )
    assert [a.event.event_id for a in accepted] == ["e2"]
    assert "exceeds ingest.max_event_bytes (1000)" in rejected[0][1]
    assert "no key" in rejected[1][1]
    # keyless is accepted where it is allowed
    assert len(parse_batch([_msg(_event(), 1, key=None)], require_key=False)[0]) == 1


def test_a_dead_letter_carries_a_bounded_copy_and_says_so() -> None:
    value = b"y" * 10_000
    letter = dead_letter(RawMessage(value, b"k", "events", 3, 7), "too big", copy_bytes=100)
    assert letter.truncated and letter.original_bytes == 10_000 and len(letter.original) == 100
    assert "first 100 of 10000 bytes" in letter.reason and len(letter.original_sha256) == 64
    small = dead_letter(RawMessage(b"{oops", None, "events", 0, 1), "malformed", copy_bytes=100)
    assert not small.truncated and small.original == "{oops"


def test_copies_of_an_id_are_judged_once_for_all() -> None:
    a, b = _event("x", "u1", "i1"), _event("x", "u2", "i9")
    first = claim_value(a, 0, 5)
    assert judge(None, first) == "canonical"
    assert judge(first, first) == "canonical"  # a redelivery of the claimed copy
    assert judge(first, claim_value(a, 1, 9)) == "duplicate"  # the same content elsewhere
    assert judge(first, claim_value(b, 1, 9)) == "conflict"
    # key order and spacing are not content
    reordered = Event.model_validate(orjson.loads(orjson.dumps(dict(reversed(a.model_dump().items())))))
    assert claim_value(reordered, 0, 5) == first


def test_conflicting_copies_are_dead_lettered_and_the_first_wins() -> None:
    state, letters = FlakyState(), Letters()
    first, other = _event("dup", "u1", "i1"), _event("dup", "u2", "i2")
    out = asyncio.run(
        _batch(state, letters).handle(
            [_msg(first, 0), _msg(other, 1, key=b"u2"), _msg(first, 2), _msg(_event("e2"), 3)]
        )
    )
    assert state.applied == ["dup", "e2"]
    assert (out.applied, out.duplicates, out.dead_lettered) == (2, 1, 1)
    assert "'dup' is taken by the copy at partition 0 offset 0, with other contents" in letters.sent[0].reason


def test_a_failing_dependency_is_waited_out_with_backoff_not_skipped() -> None:
    state, letters = FlakyState(failures=6, error=ConnectionError("redis down")), Letters()
    batch = _batch(state, letters, IngestSettings(retry_backoff_s=0.1, retry_backoff_max_s=1.0))
    out = asyncio.run(batch.handle([_msg(_event("e1"), 0), _msg(_event("e2"), 1)]))
    assert state.applied == ["e1", "e2"] and out.retries == 6
    assert batch.slept == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # type: ignore[attr-defined]


def test_an_event_that_cannot_be_applied_goes_alone_to_the_dlq() -> None:
    state, letters = FlakyState(poison="bad"), Letters()
    out = asyncio.run(
        _batch(state, letters).handle([_msg(_event("a"), 0), _msg(_event("bad"), 1), _msg(_event("c"), 2)])
    )
    assert state.applied == ["a", "c"] and out.dead_lettered == 1
    assert letters.sent[0].reason.startswith("could not be applied: ValueError")


def test_a_letter_the_broker_refuses_goes_again_without_its_copy() -> None:
    letters = Letters(refuse_over=2000)
    cfg = IngestSettings(dlq_copy_bytes=10_000)
    asyncio.run(_batch(FlakyState(), letters, cfg).handle([_msg(b"z" * 5000, 0)]))
    assert len(letters.sent) == 1 and letters.sent[0].original == "" and "copy dropped" in letters.sent[0].reason


def test_an_unexpected_error_of_a_dependency_is_not_retried() -> None:
    class Broken:
        async def claim(self, copies: Sequence[tuple[Event, int | None, int | None]]) -> list[Claimed]:
            raise KeyError("bug")

    batch = IngestBatch(IngestSettings(), FlakyState(), Broken(), Letters(), is_transient=lambda e: False)
    with pytest.raises(KeyError):
        asyncio.run(batch.handle([_msg(_event(), 0)]))
