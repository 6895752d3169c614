"""What every benchmark shares: the result line and its log file.

A benchmark's last stdout line is one JSON object (DESIGN.md). The same object, with the version,
commit and date it came from, is appended to ``benchmarks/results/<name>.jsonl``, so results
live in files a person or a script can read, not in docstrings.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=False
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def emit(name: str, result: dict[str, Any], record: bool = True) -> None:
    """Print ``result`` as the last line and append it (with provenance) to the results log."""
    from driftrec import __version__

    if record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamped = {
            "version": __version__,
            "commit": _commit(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **result,
        }
        with (RESULTS / f"{name}.jsonl").open("a") as fh:
            fh.write(json.dumps(stamped) + "\n")
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
