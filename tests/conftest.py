from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from driftrec.contract.settings import Settings
from driftrec.streams.topics import ensure_topics
from tests.infra import delete_prefix, free_port, infrastructure

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One broker + Redis for the whole session (starting Tansu takes ~0.2 s, a JVM Kafka much more)."""
    with infrastructure(tmp_path_factory.mktemp("driftrec-home")) as settings:
        yield settings


@pytest.fixture
def isolated(infra: Settings) -> Iterator[Settings]:
    """Settings private to one test: own topics, consumer group, key prefix and ports."""
    run = uuid.uuid4().hex[:8]
    settings = infra.model_copy(update={
        "topic_prefix": f"{run}.",
        "key_prefix": f"{infra.key_prefix}{run}",
        "worker_id": f"{infra.worker_id}-{run}",
        "worker_web_port": free_port(),
    })
    settings.serving = settings.serving.model_copy(update={"port": free_port()})
    ensure_topics(settings)
    yield settings
    delete_prefix(settings)
