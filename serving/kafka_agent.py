"""The asynchronous scoring path: ``score-requests`` → the same ``Scorer`` → ``score-results``.

Request value: JSON ``{"request_id", "user_id", "candidates", "ts"?}`` (``ScoreKafkaRequest``).
Result value: ``ScoreKafkaResult`` JSON, keyed by ``request_id`` so a client can consume its own
answers from a partition it can compute; exactly one of ``response`` (the HTTP body) and
``error`` (the HTTP error body) is set.

Why every failure becomes a result instead of an exception: an agent that raises stops
consuming its partitions, so one bad message would silence scoring for everyone behind it.
A malformed request gets an error result carrying its ``request_id`` when one can be read from
the JSON (``null`` otherwise), so the caller is not left waiting for a timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
import orjson
from pydantic import ValidationError

from driftrec.contract.settings import Settings
from driftrec.serving.schemas import ScoreKafkaRequest, check_request, validation_error
from driftrec.serving.scorer import Scorer

log = logging.getLogger(__name__)


def _request_id_of(value: bytes | None) -> str | None:
    """The request id of a message we could not validate, if it has a readable one."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 256 else None


def _error_result(request_id: str | None, error: str, message: str, detail: list[Any] | None = None) -> bytes:
    return orjson.dumps(
        {
            "request_id": request_id,
            "response": None,
            "error": {"error": error, "message": message, "detail": detail or []},
        }
    )


async def handle_request(scorer: Scorer, value: bytes | None, max_candidates: int) -> tuple[str | None, bytes]:
    """``(request_id, result JSON)`` for one request message; never raises."""
    try:
        req = ScoreKafkaRequest.model_validate_json(value or b"")
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        rid = _request_id_of(value)
        if any(e.get("type") == "json_invalid" for e in errors):
            return rid, _error_result(rid, "malformed_json", f"value is not valid JSON: {errors[0].get('msg', '')}")
        err = validation_error(errors, prefix=())
        return rid, orjson.dumps({"request_id": rid, "response": None, "error": err.model_dump()})
    problem = check_request(req, max_candidates)
    if problem is not None:
        return req.request_id, orjson.dumps(
            {"request_id": req.request_id, "response": None, "error": problem.model_dump()}
        )
    try:
        result = await scorer.score(req.user_id, req.candidates, req.ts)
    except Exception:
        log.exception("scoring request %s failed", req.request_id)
        # the caller learns that it failed, not how: exception text can name hosts, keys or paths
        return req.request_id, _error_result(
            req.request_id, "internal_error", "internal error while scoring; the service keeps running"
        )
    return req.request_id, orjson.dumps({"request_id": req.request_id, "response": result.to_dict(), "error": None})


def register_scoring_agent(app: faust.App, settings: Settings, scorer_factory: Callable[[], Scorer]) -> None:
    """Add the ``score`` agent to a worker app.

    The scorer is created lazily inside the agent, i.e. on the worker's event loop (its Redis
    client and reload task must live there), and is shared by the agent's instances.
    """
    requests = app.topic(
        settings.score_requests_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.events_partitions,
    )
    results = app.topic(
        settings.score_results_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.events_partitions,
    )
    holder: dict[str, Scorer] = {}
    max_candidates = settings.serving.max_candidates

    async def scorer() -> Scorer:
        if "scorer" not in holder:
            created = scorer_factory()
            await created.start()
            holder["scorer"] = created
        return holder["scorer"]

    async def score(stream: faust.StreamT) -> None:
        the_scorer = await scorer()
        async for event in stream.events():
            try:
                rid, payload = await handle_request(the_scorer, event.message.value, max_candidates)
                await results.send(key=rid.encode() if rid is not None else None, value=payload)
            except Exception:
                log.exception("score agent failed on offset %s/%s", event.message.partition, event.message.offset)

    score.__name__ = "score"
    app.agent(requests, name="score")(score)
