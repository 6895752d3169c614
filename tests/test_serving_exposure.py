"""What the scoring service shows a caller it should not trust: auth, methods, deadlines, schema."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from driftrec.contract.events import MIN_TS
from driftrec.contract.settings import Settings
from driftrec.harness import free_port
from driftrec.procs import ChildProcess, serving_healthy
from tests.infra import TEST_REDIS_DB

pytestmark = pytest.mark.integration  # a real Redis, and a real uvicorn for the deadlines


@pytest.fixture
def service(tmp_path) -> Iterator[Settings]:
    settings = Settings(
        key_prefix=f"expose{free_port()}",
        home=tmp_path,
        redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        serving={"port": free_port(), "api_key": "s3cret", "body_timeout_s": 1.0},
    )
    child = ChildProcess("serve", ["serve"], settings, tmp_path / "serve.log")
    child.start(lambda: serving_healthy(settings) is not None)
    try:
        yield settings
    finally:
        child.stop()


def test_auth_methods_schema_and_a_slow_body(service: Settings) -> None:
    base = f"http://127.0.0.1:{service.serving.port}"
    body = {"user_id": "u1", "candidates": ["a", "b"]}
    refused = httpx.post(f"{base}/v1/score", json=body, timeout=5)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401
    ok = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["degraded"] is False
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # probes need no key

    not_allowed = httpx.get(f"{base}/v1/score", timeout=5)
    assert not_allowed.status_code == 405 and "POST" in not_allowed.headers["allow"]

    ts = httpx.get(f"{base}/openapi.json", timeout=5).json()
    ts_schema = ts["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ts_schema["properties"]["ts"]["minimum"] == MIN_TS

    # a client that sends its headers and then trickles the body is cut off at the deadline
    with socket.create_connection(("127.0.0.1", service.serving.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5


def test_scoring_agent_errors_carry_no_exception_text() -> None:
    from driftrec.serving.kafka_agent import handle_request

    class Exploding:
        async def score(self, *_: object) -> None:
            raise RuntimeError("redis://secret-host:6379 refused")

    value = b'{"request_id": "r1", "user_id": "u", "candidates": ["a"]}'
    _, payload = asyncio.run(handle_request(Exploding(), value, 10))  # type: ignore[arg-type]
    assert b"secret-host" not in payload and b"internal_error" in payload
