"""Which log the consumers are reading: a broker that comes back empty is a new log.

A broker with memory storage (the embedded Tansu) loses every topic and offset when it stops;
its replacement numbers messages from 0 again. A consumer that kept its read position from the
old log then skips the new log's first messages: aiokafka jumps to the old position when the new
log is already that long, and Faust drops any message below the offset it last read. Kafka's
``cluster_id`` names the log: the embedded broker gets a fresh one at every start
(``driftrec.embedded``), a real Kafka keeps its own across restarts, so a change of id is the
one reliable sign that every offset read before means nothing now.

The ingest role (``streams.worker``) and the trainers (``streams.lineage``) poll it; on a change,
they re-read the new log from its beginning, which is safe because ingest is idempotent per
``event_id`` and a trainer's position is the snapshot's, stamped with the log it came from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from driftrec.contract.settings import Settings
from driftrec.streams.kafka_client import aiokafka_options

log = logging.getLogger(__name__)


class BrokerLog:
    """The broker's cluster id, polled over one admin connection that outlives broker restarts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: Any = None
        self.known: str | None = None  # the id of the log read so far (None: not seen yet)
        self._timeout_s = max(1.0, settings.kafka_log_check_s)  # a dead broker: ask again soon
        self._abandoned: set[asyncio.Future[Any]] = set()  # calls given up on, still unwinding

    async def current(self) -> str | None:
        """The broker's cluster id now, or None while it does not answer."""
        from aiokafka.admin import AIOKafkaAdminClient

        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    client_id="driftrec-log-identity",
                    request_timeout_ms=int(self._timeout_s * 1000),
                    **aiokafka_options(self.settings),
                )
                self._admin = admin
                await self._bounded(admin.start())
            described = await self._bounded(self._admin.describe_cluster())
        except Exception as exc:  # the broker is down or restarting: ask again next time
            log.debug("the broker's cluster id is unknown for now: %r", exc)
            await self.close()
            return None
        cluster_id = described.get("cluster_id")
        return str(cluster_id) if cluster_id else None

    async def learn(self, within_s: float = 30.0) -> str | None:
        """The id of the log about to be read, asked now and again until the broker answers
        (``within_s`` at most; None then, ``known`` unchanged). Whoever reads offsets must know it
        *before* the first read: a watch whose first sighting is already the new log cannot tell
        the log changed."""
        deadline = time.monotonic() + within_s
        while (now := await self.current()) is None:
            if time.monotonic() >= deadline:
                log.warning("the broker's cluster id is unknown after %.0f s; a new log may go unnoticed", within_s)
                return None
            await asyncio.sleep(0.2)
        self.known = now
        return now

    async def replaced(self) -> bool:
        """Whether the log changed since the last call that saw one (the first sighting is not a change)."""
        now = await self.current()
        if now is None:
            return False
        before, self.known = self.known, now
        if before is not None and before != now:
            log.warning(
                "the broker's log was replaced (cluster id %s -> %s): offsets restart; re-reading it from 0",
                before,
                now,
            )
            return True
        return False

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await self._bounded(admin.close())
            except Exception as exc:
                log.debug("closing the log-identity admin client: %s", exc)

    async def _bounded(self, call: Any) -> Any:
        """``call``'s result within the timeout, or an ``Exception``: never a ``CancelledError``
        of the call's own. aiokafka cancels the requests of a connection that closes; through
        ``asyncio.wait_for`` that cancellation reached the caller as if the caller had been
        cancelled, and it ended the worker's watch for good (a timer that raises
        ``CancelledError`` stops). A call that does not answer in time is given up on, not awaited
        while it unwinds."""
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        if not done:
            task.cancel()
            self._abandoned.add(task)  # held until it ends, so it is not collected while running
            task.add_done_callback(self._abandoned.discard)
            task.add_done_callback(_consume)
            raise TimeoutError(f"no answer from the broker within {self._timeout_s} s")
        if task.cancelled():  # aiokafka cancels a request whose connection closed: not our cancellation
            raise ConnectionError("the broker's connection closed during the request")
        return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def reset_read_positions(consumer: Any, partitions: set[Any]) -> None:
    """Forget Faust's per-partition read, ack and commit bookkeeping, as a revoke does, so that the
    new log's messages are not dropped as "older than the read offset"."""
    for table in (
        consumer._read_offset,
        consumer._committed_offset,
        consumer._acked,
        consumer._acked_index,
        consumer._gap,
    ):
        for tp in partitions:
            table.pop(tp, None)


def stale_read_positions(consumer: Any, partitions: set[Any]) -> set[Any]:
    """Partitions whose read offset is at or past the log's end: impossible within one log, so a
    read position left over from a log that was replaced (whatever the cluster id says)."""
    stale = set()
    for tp in partitions:
        read = consumer._read_offset.get(tp)
        high = consumer.highwater(tp)
        if read is not None and high is not None and int(read) >= int(high):
            stale.add(tp)
    return stale
