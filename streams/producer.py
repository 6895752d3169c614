"""Publishing events: validate before sending, so a bad producer fails at its own desk."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.streams.ingest import RawMessage, dead_letter
from driftrec.streams.kafka_client import kafka_python_options

log = logging.getLogger(__name__)


Record = tuple[str, bytes | None, bytes]  # (topic, key, value)


class EventProducer:
    """kafka-python producer keyed by ``user_id`` (so one user's events stay in order).

    Why it resends: a send that fails after the client's own retries (a broker that restarted and
    forgot this producer's id leaves an idempotent kafka-python producer failing every later send)
    is kept, and sent again through a new client at the next send or flush, until ``flush``
    returns with nothing outstanding. A resend may duplicate an event that did arrive; the
    ``event_id`` claims make that harmless (a producer's retry is counted once).
    """

    def __init__(self, settings: Settings, **kafka_options: Any) -> None:
        self.settings = settings
        self._options = {"linger_ms": 5, "acks": "all", "batch_size": 64 * 1024} | kafka_options
        self._failed: deque[tuple[Record, BaseException]] = deque()  # appended by the sender thread
        self.rebuilds = 0
        self._producer = self._new_client()

    def _new_client(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id="driftrec-producer",
            **(kafka_python_options(self.settings) | self._options),
        )

    def send(self, event: Event | Mapping[str, Any]) -> None:
        """Validate (raises ``pydantic.ValidationError`` with the reason) and publish."""
        if not isinstance(event, Event):
            event = Event.model_validate(dict(event))
        self._send((self.settings.events_topic, event.user_id.encode(), event.to_bytes()))

    def send_raw(self, value: bytes, key: bytes | None = None, topic: str | None = None) -> None:
        """Publish bytes as they are (tests and tools that must reproduce a misbehaving producer)."""
        self._send((topic or self.settings.events_topic, key, value))

    def dead_letter(self, value: bytes, reason: str, source: str) -> None:
        """Refused input still reaches the DLQ, so nothing a user fed us is silently dropped."""
        raw = RawMessage(value=value, key=None, topic=source, partition=None, offset=None)
        letter = dead_letter(raw, reason, self.settings.ingest.dlq_copy_bytes)
        self._send((self.settings.dlq_topic, None, letter.model_dump_json().encode()))

    def _send(self, record: Record) -> None:
        if self._failed:
            self._recover()
        topic, key, value = record
        try:
            future = self._producer.send(topic, key=key, value=value)
        except KafkaError as exc:  # the client is in a fatal state: a new one takes the record
            self._failed.append((record, exc))
            self._recover()
            return
        future.add_errback(self._on_error, record)

    def _on_error(self, record: Record, exc: BaseException) -> None:
        self._failed.append((record, exc))

    def _recover(self) -> None:
        """Replace the client and send again what failed (in order)."""
        pending = [self._failed.popleft() for _ in range(len(self._failed))]
        log.warning("%d sends failed (%s); resending them through a new producer", len(pending), pending[0][1])
        with contextlib.suppress(Exception):
            self._producer.close(timeout=0)
        self._producer = self._new_client()
        self.rebuilds += 1
        for (topic, key, value), _ in pending:
            self._producer.send(topic, key=key, value=value).add_errback(self._on_error, (topic, key, value))

    def flush(self, timeout_s: float | None = 60.0, attempts: int = 5) -> None:
        """Wait until every send is acknowledged, resending failed ones; raises if some still fail."""
        for attempt in range(attempts):
            self._producer.flush(timeout=timeout_s)
            if not self._failed:
                return
            if attempt < attempts - 1:
                time.sleep(min(0.5 * 2**attempt, 5.0))
                self._recover()
        raise KafkaError(f"{len(self._failed)} sends still failing after {attempts} attempts: {self._failed[0][1]}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
