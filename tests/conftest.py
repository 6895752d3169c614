"""Shared fixtures, and the line between unit and integration tests.

A test is an integration test when it is marked ``integration`` or uses a fixture that reaches a
service (``SERVICE_FIXTURES``); those are marked here at collection. Every other test is a unit
test and runs with sockets and subprocesses forbidden, so "unit tests need no services" is
checked, not hoped: ``make test-unit`` runs exactly these, ``make test`` (and CI) runs all.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driftrec.contract.settings import Settings
from driftrec.harness import delete_prefix, free_port
from driftrec.streams.topics import ensure_topics
from tests.infra import infrastructure

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SERVICE_FIXTURES = {"infra", "isolated", "redis", "prefix", "client", "server", "service", "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


class ServiceInUnitTest(AssertionError):
    """A unit test tried to reach a service or start a process: mark it ``integration``."""


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*_: Any, **__: Any) -> None:
        raise ServiceInUnitTest(f"{request.node.nodeid} opened a connection or a process; mark it integration")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One broker + Redis for the whole session (starting Tansu takes ~0.2 s, a JVM Kafka much more)."""
    with infrastructure(tmp_path_factory.mktemp("driftrec-home")) as settings:
        yield settings


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local 3-master Redis Cluster for the session (DB 0 only: tests isolate by prefix)."""
    from driftrec.local_cluster import local_cluster

    with local_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture
def isolated(infra: Settings) -> Iterator[Settings]:
    """Settings private to one test: own topics, consumer group, key prefix and ports."""
    run = uuid.uuid4().hex[:8]
    settings = infra.model_copy(
        update={
            "topic_prefix": f"{run}.",
            "key_prefix": f"{infra.key_prefix}{run}",
            "worker_id": f"{infra.worker_id}-{run}",
            "worker_web_port": free_port(),
        }
    )
    settings.serving = settings.serving.model_copy(update={"port": free_port()})
    ensure_topics(settings)
    yield settings
    delete_prefix(settings)
