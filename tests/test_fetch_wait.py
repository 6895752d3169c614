"""The worker's consumer takes ``worker_fetch_max_wait_ms`` instead of Faust's fixed 1,500 ms."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from driftrec.contract.settings import Settings
from driftrec.streams import worker


async def test_the_faust_consumer_gets_the_configured_fetch_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(worker_fetch_max_wait_ms=37)
    app = worker.build_app(settings.model_copy(update={"worker_roles": frozenset({"ingest"})}))
    built: list[Any] = []

    def faust_builds(thread: Any, transport: Any) -> AIOKafkaConsumer:  # what Faust's own builder returns
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", fetch_max_wait_ms=1500)
        built.append(consumer)
        return consumer

    class Thread:
        pass

    thread = Thread()
    thread.app = app  # type: ignore[attr-defined]
    monkeypatch.setattr(worker, "_faust_create_worker_consumer", faust_builds)
    consumer = worker._create_worker_consumer(thread, None)
    assert consumer is built[0]
    assert consumer._fetch_max_wait_ms == 37  # read by aiokafka when the consumer starts
