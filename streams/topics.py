"""Topic administration. Faust does not create source topics, so they exist before workers start."""

from __future__ import annotations

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from driftrec.contract.settings import Settings
from driftrec.streams.kafka_client import kafka_python_options


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Every topic the pipeline uses, with its partition count (events are keyed by user_id)."""
    n = settings.events_partitions
    return {
        settings.events_topic: n,
        settings.dlq_topic: 1,
        settings.score_requests_topic: n,
        settings.score_results_topic: n,
    }


def _admin(settings: Settings, timeout_s: float = 10.0) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="driftrec-admin",
        request_timeout_ms=int(timeout_s * 1000),
        **kafka_python_options(settings),
    )


def broker_topics(settings: Settings, timeout_s: float = 10.0) -> set[str]:
    admin = _admin(settings, timeout_s)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; return the names created. Existing topics are left as they are."""
    admin = _admin(settings)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, parts, 1) for name, parts in topic_partitions(settings).items() if name not in existing
        ]
        created = []
        for topic in missing:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
