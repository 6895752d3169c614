"""The scoring API documents itself: every field described with an example that validates, a
health model, Swagger UI served from the package (no CDN), Prometheus content negotiation."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from driftrec.contract.settings import Settings
from driftrec.serving import schemas
from driftrec.serving.app import create_app

MODELS: list[type[BaseModel]] = [
    schemas.ScoreRequest,
    schemas.ScoredItem,
    schemas.ScoreResponse,
    schemas.ErrorDetail,
    schemas.ErrorResponse,
    schemas.HealthResponse,
    schemas.ScoreKafkaRequest,
    schemas.ScoreKafkaResult,
]


def _get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as http:
            return await http.get(path, headers=headers)

    return asyncio.run(run())


def test_every_field_of_every_wire_model_is_described() -> None:
    for model in MODELS:
        assert model.__doc__, model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_the_documented_examples_are_valid_requests_and_responses() -> None:
    for model in MODELS:
        for example in (model.model_config.get("json_schema_extra") or {}).get("examples", []):
            model.model_validate(example)  # the request example's ts is inside the accepted window
    req = schemas.ScoreRequest.model_json_schema()
    assert req["properties"]["ts"]["examples"] == [1700000000.0] and req["properties"]["ts"]["minimum"] > 0


def test_openapi_describes_health_and_the_score_body() -> None:
    doc = create_app(Settings()).openapi()
    health = doc["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health == {"$ref": "#/components/schemas/HealthResponse"}
    body = doc["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["examples"][0]["candidates"] and body["properties"]["candidates"]["description"]


def test_docs_are_served_from_the_package_without_a_cdn() -> None:
    app = create_app(Settings())
    page = _get(app, "/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.split("<script>")[0]
    asset = _get(app, "/static-offline-docs/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
    assert _get(app, "/redoc").status_code == 200


def test_metrics_negotiate_the_format_and_include_process_metrics() -> None:
    app = create_app(Settings())
    text = _get(app, "/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "process_resident_memory_bytes" in text.text and "python_info" in text.text
    om = _get(app, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


def test_validation_messages_carry_no_pydantic_prefix() -> None:
    with pytest.raises(ValidationError) as caught:
        schemas.ScoreRequest.model_validate_json(b'{"user_id": "u", "candidates": ["i"], "ts": 1e20}')
    err = schemas.validation_error(caught.value.errors())
    assert "Value error" not in err.message and err.message.startswith("ts: ts 1e+20")
