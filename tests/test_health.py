"""Health that tells the truth: a worker whose agent keeps failing and a scoring service that
cannot read Redis say so in ``/healthz`` and in Prometheus; the worker exports consumer lag."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from driftrec.contract.settings import Settings
from driftrec.harness import WorkerProcess, free_port, wait_for
from driftrec.procs import RedisServer
from driftrec.serving.app import create_app
from driftrec.streams.datasets import taobao_sample_events
from driftrec.streams.replay import publish
from tests.conftest import SHARED_DATA


def _lags(metrics: dict[str, float], topic: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("driftrec_consumer_lag{") and f'topic="{topic}"' in k}


def test_worker_exports_lag_per_partition_and_health(isolated: Settings, tmp_path) -> None:
    settings = isolated.model_copy(deep=True)
    settings.tpp.enabled = settings.dsl.enabled = False  # ingest alone: this is about the plumbing
    events = taobao_sample_events(SHARED_DATA)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        publish(settings, events, progress=False)
        wait_for(
            lambda: (m := worker.metrics()) and m["driftrec_events_processed_total"] == len(events),
            120,
            "every event applied",
            worker,
        )
        # every partition of `events` is reported, and the lag drains to 0 once offsets are committed
        lags = wait_for(
            lambda: (
                (lag := _lags(worker.metrics() or {}, settings.events_topic))
                and len(lag) == settings.events_partitions
                and sum(lag.values()) == 0
                and lag
            ),
            60,
            "the committed offsets to catch up",
            worker,
        )
        assert lags
        health = httpx.get(f"http://127.0.0.1:{settings.worker_web_port}/healthz", timeout=2).json()
        assert (health["status"], health["failing_agents"], health["lost_lease"]) == ("ok", [], [])
    finally:
        worker.stop()


def test_a_failing_agent_shows_in_health_and_metrics(isolated: Settings, tmp_path) -> None:
    # `driftrec worker` refuses to start without Redis (one line, exit 1), so Redis goes away after
    own = RedisServer(tmp_path / "redis", free_port()).start()
    settings = isolated.model_copy(update={"redis_url": own.url}, deep=True)
    settings.tpp.enabled = settings.dsl.enabled = False
    settings.serving.kafka_agent = False
    settings.redis_socket_timeout_s = 0.5
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        own.kill()
        publish(settings, taobao_sample_events(SHARED_DATA)[:20], progress=False)  # ingest cannot reach Redis
        wait_for(
            lambda: (m := worker.metrics()) and m.get('driftrec_transient_failures_total{agent="ingest"}', 0) >= 1,
            120,
            "the ingest agent's failures to be counted while it retries",
            worker,
        )
        health = httpx.get(f"http://127.0.0.1:{settings.worker_web_port}/healthz", timeout=2).json()
        assert (health["status"], health["failing_agents"]) == ("degraded", ["ingest"])
        assert worker.proc is not None and worker.proc.poll() is None, "the worker keeps running"
        assert (worker.metrics() or {})["driftrec_events_processed_total"] == 0  # nothing was applied
    finally:
        worker.stop()
        own.stop()


@pytest.mark.integration  # a real (refused) connection
def test_scoring_without_redis_answers_and_says_it_is_degraded() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="driftrec-health-test")
    settings.serving.reload_every_s = 0.05

    async def run() -> None:
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as http,
        ):
            resp = await http.post("/v1/score", json={"user_id": "u1", "candidates": ["i1", "i2"]})
            assert resp.status_code == 200  # scoring does not go down with the cache
            assert all(x["compensation"] == 0 and x["tpp"] == 0 for x in resp.json()["items"])
            assert resp.json()["degraded"] is True and "redis unreachable" in resp.json()["degraded_reasons"][0]
            health = (await http.get("/healthz")).json()
            assert health["status"] == "degraded" and any("redis" in r for r in health["degraded"])
            metrics = (await http.get("/metrics")).text
            assert "driftrec_serving_redis_errors_total 1.0" in metrics

    asyncio.run(run())


@pytest.mark.integration  # a real (refused) connection
def test_health_pings_redis_before_any_request() -> None:
    """No request has failed yet, but Redis is gone: health must not say ok."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="driftrec-health-test")
    settings.serving.reload_every_s = 0

    async def run() -> None:
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as http,
        ):
            health = (await http.get("/healthz")).json()
            assert health["status"] == "degraded" and health["degraded"][0].startswith("redis unreachable")

    asyncio.run(run())
