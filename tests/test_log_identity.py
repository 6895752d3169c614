"""A new broker log: read positions from the old one are found and forgotten; positions say their log.

The broker restart itself, with a real worker and trainer, is in tests/test_faults.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from faust.types import TP

from driftrec.streams.lineage import LineagePosition
from driftrec.streams.log_identity import reset_read_positions, stale_read_positions


class ConsumerBook:
    """The per-partition bookkeeping a Faust consumer keeps (the fields the functions read)."""

    def __init__(self, read: dict[TP, int], high: dict[TP, int]) -> None:
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None, read)
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None, read)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list, {tp: [o] for tp, o in read.items()})
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set, {tp: {o} for tp, o in read.items()})
        self._gap: dict[TP, Any] = {}
        self._high = high

    def highwater(self, tp: TP) -> int | None:
        return self._high.get(tp)


def test_a_read_position_at_or_past_the_log_end_is_stale() -> None:
    a, b, c, d = (TP("events", p) for p in range(4))
    book = ConsumerBook(read={a: 149, b: 9, c: 40}, high={a: 12, b: 10, c: 40})
    # a: read 149 in a log 12 long; b: the last message of a 10-long log; c: at the end; d: nothing read
    assert stale_read_positions(book, {a, b, c, d}) == {a, c}


def test_reset_forgets_what_faust_would_drop_by() -> None:
    a, b = TP("events", 0), TP("events", 1)
    book = ConsumerBook(read={a: 149, b: 7}, high={})
    reset_read_positions(book, {a})
    assert book._read_offset[a] is None and book._committed_offset[a] is None
    assert a not in book._acked and a not in book._acked_index
    assert book._read_offset[b] == 7  # the other partition keeps its place


def test_a_position_carries_the_log_its_offsets_count_in() -> None:
    position = LineagePosition("events", {0: 5, 1: 7}, messages=12, events=11, learned=10, log_id="driftrec-abc")
    again = LineagePosition.from_bytes(position.to_bytes(), "events")
    assert again.log_id == "driftrec-abc" and again.next_offsets == {0: 5, 1: 7}
    assert LineagePosition.from_bytes(b'{"topic": "events", "next": {"0": 3}}', "events").log_id == ""
