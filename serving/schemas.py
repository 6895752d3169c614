"""Wire models of the scoring API (HTTP body and the ``score-requests``/``score-results`` topics).

Decisions the contract leaves open:

* ``candidates`` may repeat an id; repeats are scored once and the response lists each distinct
  id once (first occurrence wins ties in the sort), so a client never sees two rows for one item.
* ``ts`` is optional (default: the server's clock) and, when given, must be finite and plausible:
  between 1990-01-01 and one day past the server's clock, the same window events are held to.
* Unknown fields are refused (``extra="forbid"``): a typo such as ``"candidate"`` must be a
  clear 422, not a silently ignored field.
* Ids are 1..256 characters, like event ids, so the API and the event stream agree on what an
  id can be.

The HTTP request limit on the candidate count is ``settings.serving.max_candidates``; it is
checked in :func:`check_request` (the models themselves are settings-free, so the OpenAPI
document is one static schema).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from driftrec.contract.events import FUTURE_SLACK_S, MAX_ID_LEN, MIN_TS

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)]
HARD_MAX_CANDIDATES = 100_000  # schema ceiling; the served limit is settings.serving.max_candidates


class ScoreRequest(BaseModel):
    """``POST /v1/score`` body."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    user_id: Id
    candidates: list[Id] = Field(min_length=1, max_length=HARD_MAX_CANDIDATES)
    ts: float | None = Field(
        None,
        description=f"request time, Unix seconds, in [{MIN_TS:.0f} (1990-01-01), now + 1 day]; default: now",
        json_schema_extra={"minimum": MIN_TS},
    )

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_number(cls, ts: object) -> object:
        # strict mode refuses ints for float fields; a whole-second timestamp is still a time
        if isinstance(ts, int) and not isinstance(ts, bool):
            return float(ts)
        return ts

    @field_validator("ts")
    @classmethod
    def _ts_plausible(cls, ts: float | None) -> float | None:
        if ts is None:
            return None
        if not math.isfinite(ts):
            raise ValueError("ts must be a finite number")
        if not MIN_TS <= ts <= time.time() + FUTURE_SLACK_S:
            raise ValueError(f"ts {ts!r} is outside [{MIN_TS:.0f} (1990-01-01), now + 1 day]")
        return ts


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="fused probability in [0, 1]")
    base: float = Field(description="DSL model probability (cold-start constant before any snapshot)")
    compensation: float = Field(
        description="error-memory correction, probability space: base + compensation "
        "is the corrected probability, kept in [eps, 1 - eps]"
    )
    tpp: float = Field(
        description="TPP propensity term, logit space: score = sigmoid(logit(base + compensation) + tpp)"
    )


class ScoreResponse(BaseModel):
    user_id: str
    model_version: int | None = Field(description="DSL snapshot version used; null before the first snapshot")
    items: list[ScoredItem] = Field(description="sorted by score, descending")
    took_ms: float
    degraded: bool = Field(
        False, description="true when the answer lacks a term it should have (e.g. Redis was unreachable)"
    )
    degraded_reasons: list[str] = Field(default_factory=list, description="why the answer is degraded")


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(default_factory=list)
    msg: str


class ErrorResponse(BaseModel):
    """Every 4xx body: a one-line ``message`` for humans and the per-field ``detail``."""

    error: str = Field(description="machine-readable kind, e.g. validation_error")
    message: str
    detail: list[ErrorDetail] = Field(default_factory=list)


class ScoreKafkaRequest(ScoreRequest):
    """A ``score-requests`` message value; the response goes to ``score-results`` keyed by request_id."""

    request_id: Id


class ScoreKafkaResult(BaseModel):
    """A ``score-results`` message value: exactly one of ``response`` and ``error`` is set."""

    request_id: str | None
    response: ScoreResponse | None = None
    error: ErrorResponse | None = None


def check_request(req: ScoreRequest, max_candidates: int) -> ErrorResponse | None:
    """The settings-dependent check the static schema cannot express."""
    if len(req.candidates) > max_candidates:
        msg = f"candidates: at most {max_candidates} items per request, got {len(req.candidates)}"
        return ErrorResponse(
            error="validation_error", message=msg, detail=[ErrorDetail(loc=["body", "candidates"], msg=msg)]
        )
    return None


def validation_error(
    exc_errors: Sequence[Mapping[str, Any]], prefix: tuple[str | int, ...] = ("body",)
) -> ErrorResponse:
    """A pydantic error list → our error body (inputs are not echoed: they may be megabytes)."""
    detail = [
        ErrorDetail(
            loc=[*prefix, *[p for p in e.get("loc", ()) if isinstance(p, (str, int))]], msg=str(e.get("msg", "invalid"))
        )
        for e in exc_errors[:20]
    ]
    first = detail[0] if detail else ErrorDetail(msg="invalid request")
    where = ".".join(str(p) for p in first.loc[1:]) or "body"
    return ErrorResponse(error="validation_error", message=f"{where}: {first.msg}", detail=detail)
