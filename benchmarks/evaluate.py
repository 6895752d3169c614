"""Prequential evaluation on ML-100K (or ``--data`` JSONL) through the real pipeline.

Brings up the embedded broker (a private Tansu on a free port) and uses the configured Redis in
its own key prefix, runs ``driftrec.evaluate.run_evaluation`` (real worker process, real scoring
service process, test-then-train), and prints the variant table; the last line is one JSON
object of figures.

    python -m benchmarks.evaluate [--data events.jsonl] [--limit N] [--rank-fraction F] [--out DIR]
                                  [--no-sync | --fast-path-only | --lag-s S] [--repeat N]

The default slice is the demo's (the first 25,000 ML-100K events, ranking a fixed-seed 20 % of the
positives), which runs in 2-4 minutes on a 2-core machine (synchronous windows, the default);
``--limit 0`` evaluates the whole stream. ``--no-sync`` scores while the worker learns, with the
trainer's own snapshot schedule (the deployment's timing, see ``driftrec/evaluate.py``).
``--lag-s 1`` is the event-time lag protocol (the demo's); ``--repeat 3`` runs three times and
reports each figure's mean with its min and max.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from benchmarks._common import emit
from driftrec import embedded
from driftrec.contract.settings import get_settings
from driftrec.evaluate import DEMO_LIMIT, EvalOptions, run_evaluation, variant_table


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k", help="ml-100k (default), taobao-sample, or a JSONL file")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEMO_LIMIT,
        help=f"first N events only (default {DEMO_LIMIT}, the demo's slice; 0 = the whole stream)",
    )
    parser.add_argument(
        "--rank-fraction",
        type=float,
        default=0.2,
        help="fixed-seed fraction of positive events ranked against 49 negatives",
    )
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: a temp dir)")
    parser.add_argument(
        "--no-sync",
        action="store_true",
        help="score while the worker learns (deployment timing) instead of synchronous windows",
    )
    parser.add_argument(
        "--fast-path-only",
        action="store_true",
        help="after each window wait for ingest alone (the fast path), the model on its real cadence",
    )
    parser.add_argument(
        "--lag-s",
        type=float,
        default=None,
        help="event-time lag protocol: the fast path learns each event once it is this many seconds old",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run this many times (fresh state each) and report mean, min and max"
    )
    args = parser.parse_args()

    base = get_settings()
    home = Path(tempfile.mkdtemp(prefix="driftrec-bench-eval-"))
    settings = base.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{_free_port()}",
            "home": home,
            "key_prefix": f"bench{uuid.uuid4().hex[:6]}",
        }
    )
    started = time.perf_counter()
    reports = []
    for k in range(args.repeat):
        out = (args.out or home / "report") / (f"run{k + 1}" if args.repeat > 1 else "")
        embedded.up(settings)
        try:
            html = run_evaluation(
                settings,
                args.data,
                out,
                limit=args.limit or None,
                options=EvalOptions(
                    rank_fraction=args.rank_fraction,
                    window=args.window,
                    synchronous=not args.no_sync,
                    fast_path_only=args.fast_path_only,
                    lag_s=args.lag_s,
                ),
            )
        finally:
            embedded.down(settings)
        report = orjson.loads((out / "report.json").read_bytes())
        print(variant_table(report))
        print(f"report: {html}", flush=True)
        reports.append(report)
    v, run = _mean_variants(reports), reports[-1]["run"]
    figures: dict[str, object] = {
        "data": args.data,
        "events": run["n_events"],
        "scored": run["n_scored"],
        "ranked": run["n_ranked"],
    }
    names = {
        "base": "base",
        "full-no-memory": "full_no_memory",
        "full-no-tpp": "full_no_tpp",
        "full-no-wide": "full_no_wide",
        "full": "full",
        "river-lr": "river_lr",
        "river-fm": "river_fm",
        "vw": "vw",
        "ftrl": "ftrl",
        "river-lr@event": "river_lr_per_event",
        "river-fm@event": "river_fm_per_event",
        "vw@event": "vw_per_event",
        "ftrl@event": "ftrl_per_event",
    }
    for metric in ("auc", "logloss", "recall20", "ndcg20"):
        for variant, short in names.items():
            if variant in v:
                figures[f"{metric}_{short}"] = v[variant][metric]
                if len(reports) > 1:
                    figures[f"{metric}_{short}_min"] = v[variant][f"{metric}_min"]
                    figures[f"{metric}_{short}_max"] = v[variant][f"{metric}_max"]
    figures["events_per_s"] = v["full"]["events_per_s"]
    figures["synchronous"] = run["synchronous"]
    figures["fast_path_only"] = run["fast_path_only"]
    figures["window"] = run["window"]
    figures["lag_s"] = run.get("lag_s")
    figures["runs"] = len(reports)
    # the fusion layer's term weights at the end of each run (m: DSL logit, e: LSH memory,
    # s: session memory, t: TPP), under the lag protocol
    figures["term_weights_final"] = [(r["run"].get("term_weights") or [None])[-1] for r in reports]
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    emit("evaluate", figures)


def _mean_variants(reports: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per variant and metric: the mean over the runs, with ``<metric>_min`` / ``_max``."""
    out: dict[str, dict[str, float | None]] = {}
    for variant in reports[0]["variants"]:
        row: dict[str, float | None] = {}
        for metric in reports[0]["variants"][variant]:
            values = [r["variants"][variant].get(metric) for r in reports]
            if any(x is None for x in values):
                row[metric] = None
                continue
            row[metric] = round(sum(values) / len(values), 4)
            row[f"{metric}_min"], row[f"{metric}_max"] = round(min(values), 4), round(max(values), 4)
        out[variant] = row
    return out


if __name__ == "__main__":
    main()
