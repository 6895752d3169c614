"""The fast path as one object: what ingest applies to each micro-batch, in the worker or in the
evaluation harness.

Why one builder: the worker's ingest agent and ``driftrec evaluate``'s event-time-lag protocol
(which steps the fast path itself, per event, at the measured freshness) must apply *the same*
writers in the same order, so the protocol measures the code that is deployed.

Order: claim ids, apply per-user and per-item state, then the derived writers: the fusion
layer's per-event step with the served errors into the memories (``streams.fusion_writer``), then
the touched users' TPP propensities (``streams.propensity``), so the step sees the propensity that
served the event, not one that already knows it.
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
    from driftrec.streams.fusion_writer import FusionWriter

    # the served score's weights are learned here whichever terms are on (models/served.py)
    writers: list[AppliedEventsWriter] = [FusionWriter(redis, settings)]
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
