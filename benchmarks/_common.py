"""What every benchmark shares: the result line and its log file.

A benchmark's last stdout line is one JSON object (DESIGN.md). The same object, with the version,
commit and date it came from, is appended to ``benchmarks/results/<name>.jsonl``, so results
live in files a person or a script can read, not in docstrings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def emit(name: str, result: dict[str, Any], record: bool = True) -> None:
    """Print ``result`` as the last line and append it (with provenance) to the results log."""
    from driftrec.provenance import stamp

    if record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamped = {**stamp(), **result}
        with (RESULTS / f"{name}.jsonl").open("a") as fh:
            fh.write(json.dumps(stamped) + "\n")
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def quiet_logging() -> None:
    """INFO with timestamps for the benchmark's own lines, WARNING for the clients."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for chatty in ("kafka", "aiokafka", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def private_settings(tag: str, **overrides: Any) -> Any:
    """Settings of a run of its own: a fresh home, a free broker port (``driftrec up`` starts the
    embedded broker there), its own key prefix, worker id and topic prefix."""
    import tempfile
    import uuid

    from driftrec.contract.settings import Settings
    from driftrec.harness import free_port

    run = uuid.uuid4().hex[:6]
    fields: dict[str, Any] = {
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "home": Path(tempfile.mkdtemp(prefix=f"driftrec-{tag}-")),
        "key_prefix": f"b{tag}{run}",
        "worker_id": f"b{tag}-{run}",
        "topic_prefix": f"{tag}{run}.",
        "worker_web_port": free_port(),
    }
    return Settings(**(fields | overrides))
