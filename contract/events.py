"""The event contract of DESIGN.md, and the one function that decides accept vs. dead-letter.

Decisions (documented in the README):
- Unknown top-level fields are **rejected** (``extra="forbid"``): a producer that sends a
  misspelled ``lable`` would otherwise silently train nothing. Extra context belongs in
  ``features``.
- Types are strict: ``"1"`` is not a label and ``true`` is not a timestamp.
- Numbers must be finite; ``ts`` must lie between 1990-01-01 and one day past the wall clock
  (recorded datasets are old, events from the future are clock bugs).
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from driftrec.contract.interaction import Interaction

MIN_TS = 631_152_000.0  # 1990-01-01T00:00:00Z
FUTURE_SLACK_S = 86_400.0
MAX_ID_LEN = 256

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)]
FeatureValue = Annotated[str, StringConstraints(max_length=1024)] | float | int


class Event(BaseModel):
    """One impression/click/rating on topic ``events`` (key = ``user_id``)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: Id
    user_id: Id
    item_id: Id
    ts: float
    kind: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    label: Literal[0, 1] | None = None
    category: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)] | None = None
    features: dict[Annotated[str, StringConstraints(min_length=1, max_length=128)], FeatureValue] = Field(
        default_factory=dict, max_length=256
    )

    @field_validator("label", mode="before")
    @classmethod
    def _label_is_not_bool(cls, label: object) -> object:
        if isinstance(label, bool):
            raise ValueError("label must be the number 0 or 1, not a boolean")
        return label

    @field_validator("ts")
    @classmethod
    def _ts_is_plausible(cls, ts: float) -> float:
        if not math.isfinite(ts):
            raise ValueError("ts must be a finite number")
        upper = time.time() + FUTURE_SLACK_S
        if not MIN_TS <= ts <= upper:
            raise ValueError(f"ts {ts!r} is outside [{MIN_TS:.0f} (1990-01-01), now + 1 day]")
        return ts

    @field_validator("features")
    @classmethod
    def _features_are_finite(cls, features: dict[str, str | float | int]) -> dict[str, str | float | int]:
        for name, value in features.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"feature {name!r} is not a finite number")
        return features

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(exclude_none=True))

    def to_interaction(self) -> Interaction:
        return Interaction(
            user_id=self.user_id,
            item_id=self.item_id,
            ts=self.ts,
            label=self.label,
            category=self.category,
            kind=self.kind,
            event_id=self.event_id,
            features=dict(self.features),
        )


class DeadLetter(BaseModel):
    """What goes to ``events.dlq``: the original bytes and why they were refused.

    The copy is lossless up to ``ingest.dlq_copy_bytes``; a larger original is cut there
    (``truncated``), and its size and SHA-256 still identify it in the source topic, which
    ``topic``/``partition``/``offset`` locate: a letter must fit the broker's message limit, or the
    bad event would take the good ones of its batch down with it.
    """

    reason: str
    original: str  # the raw value (or its first bytes), decoded as UTF-8 with replacement, for people
    original_b64: str  # the exact raw bytes (or their first ones), for replaying after a fix
    original_bytes: int = 0  # the size of the whole original value
    original_sha256: str = ""  # of the whole original value
    truncated: bool = False  # the copies above hold only the first bytes of the original
    key: str | None = None
    topic: str
    partition: int | None = None
    offset: int | None = None
    ts: float


def parse_event(raw: bytes) -> Event:
    """Decode and validate one message value; raises ``InvalidEvent`` with a readable reason."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(payload).__name__}")
    try:
        return Event.model_validate(payload)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from None


class InvalidEvent(ValueError):
    """A message that breaks the event contract; its message is the dead-letter reason."""


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "<event>"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
