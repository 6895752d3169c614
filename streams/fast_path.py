"""The fast path as one object: what ingest applies to each micro-batch, in the worker or in the
evaluation harness.

Why one builder: the worker's ingest agent and ``driftrec evaluate``'s event-time-lag protocol
(which steps the fast path itself, per event, at the measured freshness) must apply *the same*
writers in the same order, so the protocol measures the code that is deployed.

Order: claim ids, apply per-user and per-item state, then the derived writers: the served
errors into the memories (``streams.served_errors``), the wide model's per-event step
(``streams.wide_writer``), the touched users' TPP propensities (``streams.propensity``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from driftrec.contract.settings import Settings
from driftrec.storage.claims import EventClaims
from driftrec.storage.event_state import EventState
from driftrec.streams.ingest import AppliedEventsWriter, IngestBatch, SendLetters


def fast_path_writers(redis: Any, settings: Settings) -> list[AppliedEventsWriter]:
    """The derived writers the settings switch on, in the order they run."""
    writers: list[AppliedEventsWriter] = []
    served = None
    if settings.memory.enabled:  # served errors into the memories, per event
        from driftrec.streams.served_errors import ServedErrorWriter

        served = ServedErrorWriter(redis, settings)
        writers.append(served)
    if settings.wide.enabled:  # the per-event FTRL on the DSL logit (models/wide.py)
        from driftrec.streams.wide_writer import WideWriter

        writers.append(WideWriter(redis, settings, served))
    if settings.tpp.enabled:
        from driftrec.streams.propensity import PropensityWriter

        writers.append(PropensityWriter(redis, settings))
    return writers


def ingest_batch(
    redis: Any,
    settings: Settings,
    send_letters: SendLetters,
    is_transient: Callable[[BaseException], bool],
    on_retry: Callable[[str, BaseException], None] | None = None,
) -> IngestBatch:
    """The ingest step of one micro-batch, with every writer of the fast path."""
    state = EventState(
        redis,
        settings.key_prefix,
        max_seq_len=settings.user_seq_len,
        dedup_ttl_s=settings.dedup_ttl_s,
        state_ttl_s=settings.state_ttl_s,
    )
    return IngestBatch(
        settings.ingest,
        state,
        EventClaims(redis, settings.key_prefix, settings.dedup_ttl_s),
        send_letters,
        is_transient=is_transient,
        derived=fast_path_writers(redis, settings),
        on_retry=on_retry,
    )
