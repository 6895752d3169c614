"""Replaying recorded data through the broker in event-time order, optionally paced."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.streams.datasets import load_events, read_jsonl
from driftrec.streams.producer import EventProducer

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    published: int
    dead_lettered: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def source_items(settings: Settings, source: str, limit: int | None) -> list[Event | tuple[bytes, str]]:
    """Events of a named dataset, or every line of a JSONL file (invalid lines kept, with reason)."""
    path = Path(source)
    if path.is_file():
        items = list(read_jsonl(path))
        return items[:limit] if limit is not None else items
    return list(load_events(source, settings.data_cache, settings.shared_data, limit))


def publish(
    settings: Settings,
    items: Iterable[Event | tuple[bytes, str]],
    total: int | None = None,
    speed: float | None = None,
    progress: bool = True,
    source: str = "replay",
) -> ReplayReport:
    """Publish in the given order; ``speed`` X replays X event-seconds per wall second (None: flat out)."""
    started = time.monotonic()
    published = rejected = 0
    first_ts: float | None = None
    with EventProducer(settings) as producer:
        for item in tqdm(items, total=total, disable=not progress, unit="ev", desc=f"replay {source}"):
            if isinstance(item, Event):
                if speed:
                    first_ts = item.ts if first_ts is None else first_ts
                    delay = (item.ts - first_ts) / speed - (time.monotonic() - started)
                    if delay > 0:
                        time.sleep(delay)
                producer.send(item)
                published += 1
            else:
                raw, reason = item
                producer.dead_letter(raw, reason, source)
                rejected += 1
    report = ReplayReport(published, rejected, time.monotonic() - started)
    log.info(
        "replayed %d events (%d dead-lettered) in %.1f s (%.0f ev/s)",
        report.published,
        report.dead_lettered,
        report.seconds,
        report.rate,
    )
    return report


def replay(
    settings: Settings, source: str, speed: float | None = None, limit: int | None = None, progress: bool = True
) -> ReplayReport:
    items = source_items(settings, source, limit)
    return publish(settings, items, total=len(items), speed=speed, progress=progress, source=source)
