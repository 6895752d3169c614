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
    """``POST /v1/score`` body: rank these candidates for this user."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"examples": [{"user_id": "196", "candidates": ["242", "302", "377"], "ts": 1700000000.0}]},
    )

    user_id: Id = Field(description="the user to rank for; unknown users are scored, not refused", examples=["196"])
    candidates: list[Id] = Field(
        min_length=1,
        max_length=HARD_MAX_CANDIDATES,
        description="item ids to rank; unknown items are scored, repeats are scored once",
        examples=[["242", "302", "377"]],
    )
    ts: float | None = Field(
        None,
        description=f"request time, Unix seconds, in [{MIN_TS:.0f} (1990-01-01), now + 1 day]; default: now",
        json_schema_extra={"minimum": MIN_TS},
        examples=[1700000000.0],
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
    """One candidate's score and its parts: ``logit(score) = logit(base) + compensation + tpp + wide``
    (the rule: ``models/served.py``)."""

    item_id: str = Field(description="the candidate's id", examples=["302"])
    score: float = Field(description="fused probability in [0, 1]", examples=[0.83])
    base: float = Field(description="DSL model probability (cold-start constant before any snapshot)", examples=[0.61])
    compensation: float = Field(
        description="the error memories' correction of the score served before it (ReLoop2), at its "
        "learned weight, logit space",
        examples=[0.52],
    )
    tpp: float = Field(description="the TPP propensity term at its learned weight, logit space", examples=[0.1])
    wide: float = Field(
        description="the fusion layer's id weights and its weight on the DSL logit, logit space: "
        "score = sigmoid(logit(base) + compensation + tpp + wide)",
        examples=[0.55],
    )


class ScoreResponse(BaseModel):
    """``POST /v1/score`` answer (and a ``score-results`` message's ``response``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "196",
                    "model_version": 7,
                    "items": [
                        {
                            "item_id": "302",
                            "score": 0.83,
                            "base": 0.61,
                            "compensation": 0.52,
                            "tpp": 0.1,
                            "wide": 0.55,
                        },
                        {
                            "item_id": "242",
                            "score": 0.55,
                            "base": 0.58,
                            "compensation": -0.05,
                            "tpp": 0.02,
                            "wide": -0.09,
                        },
                    ],
                    "took_ms": 1.2,
                    "degraded": False,
                    "degraded_reasons": [],
                }
            ]
        }
    )

    user_id: str = Field(description="the user ranked for, as asked", examples=["196"])
    model_version: int | None = Field(
        description="DSL snapshot version used; null before the first snapshot", examples=[7]
    )
    items: list[ScoredItem] = Field(description="every distinct candidate once, sorted by score, descending")
    took_ms: float = Field(description="time spent scoring inside the service, milliseconds", examples=[1.2])
    degraded: bool = Field(
        False, description="true when the answer lacks a term it should have (e.g. Redis was unreachable)"
    )
    degraded_reasons: list[str] = Field(
        default_factory=list, description="why the answer is degraded", examples=[["redis unreachable"]]
    )


class ErrorDetail(BaseModel):
    """One field's complaint."""

    loc: list[str | int] = Field(
        default_factory=list, description="where in the request: body, then the field path", examples=[["body", "ts"]]
    )
    msg: str = Field(description="what is wrong with it", examples=["ts must be a finite number"])


class ErrorResponse(BaseModel):
    """Every 4xx body: a one-line ``message`` for humans and the per-field ``detail``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "validation_error",
                    "message": "candidates: List should have at least 1 item after validation, not 0",
                    "detail": [
                        {
                            "loc": ["body", "candidates"],
                            "msg": "List should have at least 1 item after validation, not 0",
                        }
                    ],
                }
            ]
        }
    )

    error: str = Field(description="machine-readable kind, e.g. validation_error", examples=["validation_error"])
    message: str = Field(description="one line saying what is wrong", examples=["ts: ts must be a finite number"])
    detail: list[ErrorDetail] = Field(default_factory=list, description="per-field complaints (at most 20)")


class HealthResponse(BaseModel):
    """``GET /healthz``: liveness (always 200) and what is loaded; ``status`` says whether it is whole."""

    status: str = Field(description="ok, or degraded while a term is missing from answers", examples=["ok"])
    degraded: list[str] = Field(description="why it is degraded (empty when ok)", examples=[[]])
    model_version: int | None = Field(description="DSL snapshot version loaded; null before the first", examples=[7])
    snapshot_loaded_at: float | None = Field(
        description="when that snapshot was loaded, Unix seconds", examples=[1700000000.0]
    )
    catalog_items: int = Field(description="items whose category the loaded snapshot knows", examples=[1682])
    contributions: dict[str, bool] = Field(
        description="fusion terms switched on", examples=[{"dsl": True, "memory": True, "tpp": True, "wide": True}]
    )
    reloads: int = Field(description="snapshots swapped in since start", examples=[3])


class ScoreKafkaRequest(ScoreRequest):
    """A ``score-requests`` message value; the response goes to ``score-results`` keyed by request_id."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"request_id": "r-1", "user_id": "196", "candidates": ["242", "302"], "ts": 1700000000.0}]
        }
    )

    request_id: Id = Field(description="echoed in the result (and its message key) to match answers", examples=["r-1"])


class ScoreKafkaResult(BaseModel):
    """A ``score-results`` message value: exactly one of ``response`` and ``error`` is set."""

    request_id: str | None = Field(description="the request's id; null when it could not be read", examples=["r-1"])
    response: ScoreResponse | None = Field(None, description="the ranking, when the request was valid")
    error: ErrorResponse | None = Field(None, description="what was wrong, when it was not")


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
            loc=[*prefix, *[p for p in e.get("loc", ()) if isinstance(p, (str, int))]],
            msg=str(e.get("msg", "invalid")).removeprefix("Value error, "),  # our validators' words, as written
        )
        for e in exc_errors[:20]
    ]
    first = detail[0] if detail else ErrorDetail(msg="invalid request")
    where = ".".join(str(p) for p in first.loc[1:]) or "body"
    return ErrorResponse(error="validation_error", message=f"{where}: {first.msg}", detail=detail)
