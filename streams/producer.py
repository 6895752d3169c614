"""Publishing events: validate before sending, so a bad producer fails at its own desk."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaProducer

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.streams.ingest import RawMessage, dead_letter
from driftrec.streams.kafka_client import kafka_python_options


class EventProducer:
    """kafka-python producer keyed by ``user_id`` (so one user's events stay in order)."""

    def __init__(self, settings: Settings, **kafka_options: Any) -> None:
        self.settings = settings
        options = {"linger_ms": 5, "acks": "all", "batch_size": 64 * 1024} | kafka_options
        self._producer = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="driftrec-producer",
            **(kafka_python_options(settings) | options),
        )

    def send(self, event: Event | Mapping[str, Any]) -> None:
        """Validate (raises ``pydantic.ValidationError`` with the reason) and publish."""
        if not isinstance(event, Event):
            event = Event.model_validate(dict(event))
        self._producer.send(self.settings.events_topic, key=event.user_id.encode(), value=event.to_bytes())

    def send_raw(self, value: bytes, key: bytes | None = None, topic: str | None = None) -> None:
        """Publish bytes as they are (tests and tools that must reproduce a misbehaving producer)."""
        self._producer.send(topic or self.settings.events_topic, key=key, value=value)

    def dead_letter(self, value: bytes, reason: str, source: str) -> None:
        """Refused input still reaches the DLQ, so nothing a user fed us is silently dropped."""
        raw = RawMessage(value=value, key=None, topic=source, partition=None, offset=None)
        letter = dead_letter(raw, reason, self.settings.ingest.dlq_copy_bytes)
        self._producer.send(self.settings.dlq_topic, value=letter.model_dump_json().encode())

    def flush(self, timeout_s: float | None = 60.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
