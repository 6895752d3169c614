"""Property: no request body, content type or size makes the scoring service answer 5xx.

A real uvicorn server (in a thread) in front of a real Redis (DB 4, uuid prefix) with a loaded
snapshot; hypothesis throws malformed JSON, wrong types, empty and oversized candidate lists,
huge strings, NaN/inf timestamps and wrong content types at ``POST /v1/score``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis as redis_sync
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from driftrec.harness import free_port
from driftrec.serving.app import create_app
from driftrec.storage.snapshots import SnapshotKeys, publish_snapshot
from tests.test_serving import REDIS_URL, make_settings, snapshot_parts

pytestmark = pytest.mark.integration  # a real uvicorn server and Redis

MAX_CANDIDATES = 50
CLIENT = httpx.Client(timeout=30)  # keep-alive: the server, not connection set-up, is under test


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    prefix = f"drtest-fuzz-{uuid.uuid4().hex}"
    settings = make_settings(prefix, max_candidates=MAX_CANDIDATES, max_body_bytes=64 * 1024, reload_every_s=0.5)

    async def publish() -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        await publish_snapshot(client, SnapshotKeys(prefix, "dsl"), snapshot_parts())
        await client.aclose()

    asyncio.run(publish())
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).json()["model_version"] is not None:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("scoring server did not come up with a snapshot")
        time.sleep(0.05)
    yield url
    CLIENT.close()
    server.should_exit = True
    thread.join(10)
    client = redis_sync.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=300),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20,
)
ids = st.one_of(st.text(max_size=300), json_values)
candidate_lists = st.one_of(
    st.lists(st.text(max_size=300), max_size=80),
    json_values,
    st.integers(0, 20_000).map(lambda n: [f"i{j}" for j in range(n)]),
)
timestamps = st.one_of(st.none(), st.floats(), st.integers(-(2**64), 2**64), st.text(max_size=10), st.just("NaN"))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["shaped", "shaped", "any", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=500))
    if kind == "any":
        return json.dumps(draw(json_values)).encode()
    doc = {"user_id": draw(ids), "candidates": draw(candidate_lists)}
    if draw(st.booleans()):
        doc["ts"] = draw(timestamps)
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.text(min_size=1, max_size=8))] = draw(json_scalars)
    if draw(st.booleans()) and draw(st.booleans()):
        del doc[draw(st.sampled_from(["user_id", "candidates"]))]
    # stdlib json: integers beyond 64 bits and NaN/Infinity literals, which some clients emit
    return json.dumps(doc).encode()


content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "APPLICATION/JSON",
    ]
)


@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies(), content_type=content_types)
def test_bad_input_never_yields_5xx(base_url: str, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = CLIENT.post(f"{base_url}/v1/score", content=body, headers=headers)
    assert resp.status_code < 500, resp.text
    payload = resp.json()
    if resp.status_code == 200:
        scores = [x["score"] for x in payload["items"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= x <= 1 for x in scores)
        assert payload["model_version"] is not None
    else:
        assert 400 <= resp.status_code < 500
        assert payload["error"] and payload["message"]


def test_named_bad_requests_get_clear_errors(base_url: str) -> None:
    cases = [
        (b'{"user_id": "u1", "candidates": ["a"', "application/json", 400, "not valid JSON"),
        (b'{"user_id": "u1", "candidates": []}', "application/json", 422, "candidates"),
        (
            orjson.dumps({"user_id": "u1", "candidates": [f"i{j}" for j in range(10_000)]}),
            "application/json",
            413,
            "exceeds",
        ),
        (
            orjson.dumps({"user_id": "u1", "candidates": [f"i{j}" for j in range(MAX_CANDIDATES + 1)]}),
            "application/json",
            422,
            f"at most {MAX_CANDIDATES}",
        ),
        (orjson.dumps({"user_id": "u" * 100_000, "candidates": ["a"]}), "application/json", 413, "exceeds"),
        (orjson.dumps({"user_id": "u" * 257, "candidates": ["a"]}), "application/json", 422, "user_id"),
        (orjson.dumps({"user_id": 5, "candidates": ["a"]}), "application/json", 422, "user_id"),
        (orjson.dumps({"user_id": "u", "candidates": "a"}), "application/json", 422, "candidates"),
        (orjson.dumps({"user_id": "u", "candidates": ["a"], "ts": "yesterday"}), "application/json", 422, "ts"),
        (orjson.dumps({"user_id": "u", "candidates": ["a"], "ts": 9e15}), "application/json", 422, "outside"),
        (orjson.dumps({"user_id": "u", "candidates": ["a"], "extra": 1}), "application/json", 422, "extra"),
        (b"user_id=u&candidates=a", "application/x-www-form-urlencoded", 415, "Content-Type"),
    ]
    for body, ctype, status, words in cases:
        resp = httpx.post(f"{base_url}/v1/score", content=body, headers={"content-type": ctype}, timeout=30)
        assert resp.status_code == status, (body[:80], resp.text)
        assert words.lower() in resp.json()["message"].lower(), resp.text
    assert httpx.get(f"{base_url}/v1/score").status_code == 405
    schema = httpx.get(f"{base_url}/openapi.json").json()
    req = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert req["properties"]["candidates"]["maxItems"] == MAX_CANDIDATES
    ok = httpx.post(f"{base_url}/v1/score", json={"user_id": "u1", "candidates": ["i1", "zz"]}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["items"]) == 2
