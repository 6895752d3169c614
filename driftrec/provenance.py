"""Where a figure came from: the version, the commit and the date, stamped on every report and
benchmark result so a number read later can be traced to the code that produced it."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from driftrec import __version__

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checkout's short commit (``-dirty`` with uncommitted changes), or ``unknown`` outside git."""
    if not (REPO / ".git").exists():  # an installed copy: its folder's parent is no checkout of ours
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def stamp() -> dict[str, str]:
    return {
        "version": __version__,
        "commit": commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
