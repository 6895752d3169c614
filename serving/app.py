"""HTTP front of the scoring service: ``POST /v1/score``, ``GET /healthz``, ``GET /metrics``.

Why the score body is read and validated by hand instead of a FastAPI body parameter: the
request size must be capped *before* anything is parsed (a 10 MB string must cost a 413, not a
parse), wrong content types must say so (415) rather than fail validation obscurely, and
``ScoreRequest.model_validate_json`` parses and validates in one pass of pydantic-core. The
OpenAPI document still describes the body (``openapi_extra``), so schema-driven clients and
fuzzers see the real contract. Responses are written with orjson straight from numpy arrays, not
through a response model, because for 1,000 candidates model validation would cost more than
scoring.

Every error is ``{"error", "message", "detail"}`` (``serving.schemas.ErrorResponse``) with a 4xx
status; an unexpected exception is logged and answered with a JSON 500 without taking the
process down.
"""

from __future__ import annotations

import os

# One uvicorn worker is one core: BLAS/OpenMP thread pools would only contend with the event loop
# (and with each other on a loaded host). Must be set before numpy/torch load their libraries.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import asyncio
import contextlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from prometheus_client import GC_COLLECTOR, CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from driftrec.contract.settings import Settings
from driftrec.serving.schemas import (
    ErrorResponse,
    HealthResponse,
    ScoreRequest,
    ScoreResponse,
    check_request,
    validation_error,
)
from driftrec.serving.scorer import REDIS_DOWN, Scorer

log = logging.getLogger(__name__)
JSON = "application/json"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)


def _error(
    status: int,
    error: str,
    message: str,
    detail: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = {"error": error, "message": message, "detail": detail or []}
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _error_model(status: int, err: ErrorResponse) -> Response:
    return Response(orjson.dumps(err.model_dump()), status_code=status, media_type=JSON)


class _ScorerCollector:
    """Exports the scorer's state at scrape time (snapshot version, reloads, degraded reads)."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def collect(self) -> Any:
        st = self.scorer.stats
        version = GaugeMetricFamily("driftrec_serving_snapshot_version", "DSL snapshot version loaded (-1: none)")
        version.add_metric([], -1 if self.scorer.version is None else self.scorer.version)
        yield version
        for name, doc, value in (
            ("driftrec_serving_snapshot_reloads", "Snapshots swapped in without a restart", st.reloads),
            ("driftrec_serving_snapshot_reload_failures", "Snapshots refused as unusable", st.reload_failures),
            (
                "driftrec_serving_redis_errors",
                "Requests answered without memory/tpp because Redis failed",
                st.redis_errors,
            ),
            ("driftrec_serving_tpp_parse_errors", "Unreadable per-user TPP propensities", st.tpp_parse_errors),
            (
                "driftrec_serving_wide_parse_errors",
                "Requests whose wide features were unreadable",
                st.wide_parse_errors,
            ),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        on = GaugeMetricFamily("driftrec_serving_contribution_enabled", "Fusion terms switched on", labels=["term"])
        for term, enabled in self.scorer.contributions().items():
            on.add_metric([term], 1.0 if enabled else 0.0)
        yield on


class ServingMetrics:
    def __init__(self, scorer: Scorer) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        self.requests = Counter(
            "driftrec_serving_requests_total", "Score requests by HTTP status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "driftrec_serving_request_seconds",
            "Score request handling time",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.candidates = Histogram(
            "driftrec_serving_candidates",
            "Candidates per scored request",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=self.registry,
        )
        self.registry.register(_ScorerCollector(scorer))


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` (stops reading there: no unbounded buffering)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, scorer: Scorer | None = None) -> FastAPI:
    """The ASGI app. A given ``scorer`` is used as is (the caller starts and closes it); otherwise
    one is created and started/closed with the app's lifespan."""
    owned = scorer is None
    the_scorer = scorer if scorer is not None else Scorer(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            await the_scorer.start()
        try:
            yield
        finally:
            if owned:
                await the_scorer.close()

    app = FastAPIOffline(  # /docs and /redoc from assets shipped in the package: no CDN, works offline
        title="driftrec scoring",
        version="1",
        lifespan=lifespan,
        description="Fuses the DSL model, the ReLoop2 error memory and PromptTPP; "
        "see serving/README.md for the fusion rule.",
    )
    app.state.scorer = the_scorer
    metrics = ServingMetrics(the_scorer)
    app.state.metrics = metrics
    max_candidates = settings.serving.max_candidates
    max_body = settings.serving.max_body_bytes
    body_timeout = settings.serving.body_timeout_s
    api_key = settings.serving.api_key.get_secret_value().encode() if settings.serving.api_key else None

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key)

    request_schema = ScoreRequest.model_json_schema()
    request_schema["properties"]["candidates"]["maxItems"] = max_candidates
    error_doc = {"model": ErrorResponse}

    @app.post(
        "/v1/score",
        response_class=Response,
        responses={
            200: {"model": ScoreResponse, "description": "ranked candidates"},
            400: error_doc,
            401: error_doc,
            408: error_doc,
            413: error_doc,
            415: error_doc,
            422: error_doc,
        },
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": request_schema}}}},
        summary="Score and rank candidates for a user",
    )
    async def score(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await _score(request)
        except ClientDisconnect:  # the client left mid-body: nobody reads an answer, nothing to log
            response = Response(status_code=499)
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def _score(request: Request) -> Response:
        if not authorized(request):
            headers = {"WWW-Authenticate": "Bearer"}
            return _error(401, "unauthorized", "a valid 'Authorization: Bearer <key>' is required", headers=headers)
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != JSON:
            return _error(415, "unsupported_media_type", f"Content-Type must be {JSON}, got {ctype or 'none'!r}")
        try:
            body = await asyncio.wait_for(_read_capped(request, max_body), body_timeout)
        except TimeoutError:
            return _error(408, "request_timeout", f"request body not received within {body_timeout:g} s")
        if body is None:
            return _error(413, "payload_too_large", f"request body exceeds {max_body} bytes")
        try:
            req = ScoreRequest.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False)
            if any(e.get("type") == "json_invalid" for e in errors):
                return _error(400, "malformed_json", f"body is not valid JSON: {errors[0].get('msg', '')}")
            return _error_model(422, validation_error(errors))
        problem = check_request(req, max_candidates)
        if problem is not None:
            return _error_model(422, problem)
        metrics.candidates.observe(len(req.candidates))
        result = await the_scorer.score(req.user_id, req.candidates, req.ts)
        return Response(result.to_json(), media_type=JSON)

    @app.get(
        "/healthz",
        summary="Liveness, loaded snapshot and enabled fusion terms",
        response_class=Response,
        responses={200: {"model": HealthResponse, "description": "always 200 (liveness); `status` says degraded"}},
    )
    async def healthz() -> Response:
        snap = the_scorer.current
        degraded = the_scorer.stats.degraded(time.time())
        if not await the_scorer.redis_answers() and not any(r.startswith("redis unreachable") for r in degraded):
            degraded.append(REDIS_DOWN)
        body = {
            "status": "degraded" if degraded else "ok",  # 200 either way: liveness, not readiness
            "degraded": degraded,
            "model_version": the_scorer.version,
            "snapshot_loaded_at": the_scorer.stats.loaded_at,
            "catalog_items": len(snap.catalog) if snap else 0,
            "contributions": the_scorer.contributions(),
            "reloads": the_scorer.stats.reloads,
        }
        return Response(orjson.dumps(body), media_type=JSON)

    @app.get(
        "/metrics", summary="Prometheus metrics (text, or OpenMetrics when the scraper asks)", response_class=Response
    )
    async def prometheus(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(metrics.registry), media_type=content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail), headers=exc.headers)  # 405 keeps its Allow

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> Response:
        return _error_model(422, validation_error(list(exc.errors()), prefix=()))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error while serving a request")
        return _error(500, "internal_error", f"internal error ({type(exc).__name__}); the service keeps running")

    return app


def run_server(settings: Settings) -> None:
    """``driftrec serve``: one uvicorn worker (uvloop/httptools when installed)."""
    import torch
    import uvicorn

    torch.set_num_threads(1)  # torch is loaded with the snapshot code, never used to score
    uvicorn.run(
        create_app(settings),
        host=settings.serving.host,
        port=settings.serving.port,
        workers=1,
        access_log=False,
        log_level="warning",
        loop="auto",
        http="auto",
        timeout_keep_alive=int(math.ceil(settings.serving.keep_alive_s)),
        limit_concurrency=settings.serving.max_concurrency,  # beyond it: 503 at once, not an unbounded queue
    )
