"""The event contract: what is accepted, and the reason given for what is not."""

from __future__ import annotations

import math

import orjson
import pytest

from driftrec.contract.events import Event, InvalidEvent, parse_event
from driftrec.streams.datasets import ml100k_events, read_jsonl, taobao_sample_events, write_jsonl
from driftrec.streams.ingest import RawMessage, dead_letter, split_valid
from tests.conftest import SHARED_DATA

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 880_000_000.0, "kind": "rating"}


def raw(**changes: object) -> bytes:
    payload = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in payload.items() if v is not ...})


def test_minimal_event_is_accepted_and_round_trips() -> None:
    event = parse_event(raw(label=1, category="Drama", features={"device": "ios", "price": 9.5}))
    assert event.label == 1 and event.category == "Drama" and event.features["price"] == 9.5
    assert parse_event(event.to_bytes()) == event


def test_integer_timestamp_is_a_number() -> None:
    assert parse_event(raw(ts=880_000_000)).ts == 880_000_000.0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (raw(user_id=...), "user_id: Field required"),
        (raw(ts="880000000"), "ts: Input should be a valid number"),
        (raw(ts=1e12), "outside"),
        (raw(ts=100.0), "outside"),
        (raw(label=2), "label"),
        (raw(label=True), "not a boolean"),
        (raw(label="1"), "label"),
        (raw(user_id=""), "user_id"),
        (raw(item_id="x" * 300), "item_id"),
        (raw(features={"a": [1]}), "features.a"),
        (raw(features={"a": None}), "features.a"),
        (raw(unknown_field=1), "unknown_field: Extra inputs are not permitted"),
        (b'{"event_id":"e","user_id":"u","item_id":"i","ts":NaN,"kind":"k"}', "malformed JSON"),
    ],
)
def test_contract_violations_name_the_field(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(payload)


def test_non_finite_feature_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        Event.model_validate({**GOOD, "features": {"x": math.inf}})


def test_split_valid_keeps_order_and_reasons() -> None:
    msgs = [RawMessage(raw(event_id=f"e{i}"), b"u1", "events", 0, i) for i in range(3)]
    msgs.insert(1, RawMessage(b"{", b"u1", "events", 0, 99))
    msgs.append(RawMessage(raw(event_id="k"), b"someone-else", "events", 1, 7))
    valid, rejected = split_valid(msgs)
    assert [e.event_id for e in valid] == ["e0", "e1", "e2"]
    assert [m.offset for m, _ in rejected] == [99, 7]
    assert "differs from user_id" in rejected[1][1]
    letter = dead_letter(*rejected[0])
    assert letter.original == "{" and letter.original_b64 == "ew==" and letter.offset == 99


@pytest.mark.integration  # ML-100K comes from the package registry on first use
def test_ml100k_conversion_follows_the_shared_convention(tmp_path) -> None:
    from driftrec.contract.settings import get_settings

    events = ml100k_events(get_settings().data_cache)
    assert len(events) == 100_000
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))
    assert {e.label for e in events} == {0, 1}
    assert sum(e.label or 0 for e in events) == 55_375  # ratings >= 4 in ML-100K
    assert len({e.event_id for e in events}) == 100_000
    assert all(e.category for e in events[:1000]) and "rating" not in events[0].features


def test_taobao_sample_and_jsonl_round_trip(tmp_path) -> None:
    events = taobao_sample_events(SHARED_DATA)
    assert len(events) == 4321 and len({e.user_id for e in events}) == 43
    path = tmp_path / "events.jsonl"
    write_jsonl(events[:50], path)
    with path.open("ab") as fh:
        fh.write(b'{"broken": \n')
    back = list(read_jsonl(path))
    assert back[:50] == events[:50]
    assert isinstance(back[50], tuple) and "malformed JSON" in back[50][1]
