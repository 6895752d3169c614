"""The evaluation report: metrics from served records, plots (matplotlib Agg), self-contained HTML.

Everything here is computed from the per-event records written to ``served.jsonl``, so a reader
can recompute any number in ``report.json`` from that file alone (see :func:`load_served`).
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from driftrec.models import metrics
from driftrec.models.served import ABLATIONS

SERVED_VARIANTS = ABLATIONS  # base, full-no-memory, full-no-tpp, full-no-wide, full
K = 20


def load_served(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def variant_arrays(
    records: list[dict[str, Any]], variant: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, pointwise scores, ranked mask, greater, ties)`` of one variant over the records."""
    y = np.fromiter((r["label"] for r in records), dtype=np.float64, count=len(records))
    s = np.fromiter((r["scores"][variant] for r in records), dtype=np.float64, count=len(records))
    ranked = np.fromiter((r["ranked"] for r in records), dtype=bool, count=len(records))
    g = np.fromiter((r["rank"][variant][0] if r["ranked"] else 0 for r in records), dtype=np.int64, count=len(records))
    t = np.fromiter((r["rank"][variant][1] if r["ranked"] else 0 for r in records), dtype=np.int64, count=len(records))
    return y, s, ranked, g, t


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)


def summarize(
    records: list[dict[str, Any]], variants: list[str], series_size: int, series_step: int
) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
    """Overall metrics per variant and sliding-window series (over event order)."""
    overall: dict[str, dict[str, float | None]] = {}
    bounds = metrics.window_bounds(len(records), series_size, series_step)
    series: dict[str, Any] = {
        "window_events": series_size,
        "step_events": series_step,
        "end_index": [end - 1 for _, end in bounds],
        "end_ts": [records[end - 1]["ts"] for _, end in bounds],
    }
    for v in variants:
        y, s, ranked, g, t = variant_arrays(records, v)
        rec, nd = metrics.ranking(g[ranked], t[ranked], K)
        overall[v] = {
            "auc": _clean(metrics.auc(y, s)),
            "logloss": _clean(metrics.logloss(y, s)),
            "recall20": _clean(rec),
            "ndcg20": _clean(nd),
        }
        per: dict[str, list[float | None]] = {"auc": [], "logloss": [], "recall20": [], "ndcg20": []}
        for start, end in bounds:
            per["auc"].append(_clean(metrics.auc(y[start:end], s[start:end])))
            per["logloss"].append(_clean(metrics.logloss(y[start:end], s[start:end])))
            m = ranked[start:end]
            r, n = metrics.ranking(g[start:end][m], t[start:end][m], K)
            per["recall20"].append(_clean(r))
            per["ndcg20"].append(_clean(n))
        series[v] = per
    return overall, series


METRICS = (  # (key, label, higher is better)
    ("auc", "AUC", True),
    ("logloss", "log-loss", False),
    ("recall20", "Recall@20", True),
    ("ndcg20", "NDCG@20", True),
)
PER_EVENT = "@event"  # name suffix of the per-event (no-lag) reference peers
MEANINGS = {
    "base": "the DSL model alone (the newest served snapshot)",
    "full-no-memory": "the served score without the error memories' correction (LSH and session)",
    "full-no-tpp": "the served score without the PromptTPP term",
    "full-no-wide": "the served score without the fusion layer's id weights",
    "full": "everything fused: the score the service returns",
    "river-lr": "River logistic regression, learning what the served state learns, at the same lag",
    "river-fm": "River factorization machine, learning what the served state learns, at the same lag",
    "vw": "Vowpal Wabbit logistic regression, learning what the served state learns, at the same lag",
    "ftrl": "the wide layer alone (FTRL over the ids, no DSL, memories or TPP), at the same lag",
}
_SERVED_COLOURS = {
    "base": "#1f77b4",
    "full-no-memory": "#2ca02c",
    "full-no-tpp": "#9467bd",
    "full-no-wide": "#bcbd22",
    "full": "#d62728",
}
_PEER_COLOURS = ("#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#000000", "#aec7e8")


def colours(variants: list[str]) -> dict[str, str]:
    """A colour per variant: each served variant its own, each peer one shared with its ``@event`` twin."""
    peers = list(dict.fromkeys(v.removesuffix(PER_EVENT) for v in variants if v not in _SERVED_COLOURS))
    peer_colour = {p: _PEER_COLOURS[i % len(_PEER_COLOURS)] for i, p in enumerate(peers)}
    return {v: _SERVED_COLOURS.get(v) or peer_colour[v.removesuffix(PER_EVENT)] for v in variants}


def meaning(variant: str) -> str:
    if variant.endswith(PER_EVENT):
        peer = variant.removesuffix(PER_EVENT)
        return f"{peer}, learning each event right after scoring it: the no-lag reference a pipeline cannot match"
    return MEANINGS.get(variant, "")


def plot_series(series: dict[str, Any], variants: list[str], out: Path) -> dict[str, Path]:
    """One PNG per metric, a line per variant; returns metric → path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = series["end_index"]
    colour = colours(variants)
    paths: dict[str, Path] = {}
    for name, label, higher in METRICS:
        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
        for v in variants:
            ys = [np.nan if val is None else val for val in series[v][name]]
            style = "-" if v in SERVED_VARIANTS else (":" if v.endswith(PER_EVENT) else "--")
            ax.plot(x, ys, style, color=colour[v], label=v, linewidth=2.2 if v == "full" else 1.2)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better), window {series['window_events']} events")
        ax.set_xlabel("event index (stream order)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths[name] = path
    return paths


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4f}"
    return str(x)


def _run_value(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "no", None: "–"}[x]
    if isinstance(x, float):
        return f"{x:,.0f}" if x.is_integer() else f"{x:,.2f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _groups(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in two groups (equal information; the no-lag reference), each cell knowing whether it
    is its group's best in its metric's direction."""
    colour = colours(list(variants))
    out = []
    for title, reference, names in (
        ("served variants and peers at equal information", False, [v for v in variants if not v.endswith(PER_EVENT)]),
        (
            "no-lag reference (learns each event before the next: not reachable through a broker)",
            True,
            [v for v in variants if v.endswith(PER_EVENT)],
        ),
    ):
        if not names:
            continue
        best: dict[str, float] = {}
        for key, _, higher in METRICS:
            vals = [variants[v][key] for v in names if variants[v].get(key) is not None]
            if vals:
                best[key] = max(vals) if higher else min(vals)
        rows = [
            {
                "name": v,
                "colour": colour[v],
                "meaning": meaning(v),
                "cells": [
                    {
                        "text": _fmt(variants[v].get(key)),
                        "best": variants[v].get(key) is not None and variants[v].get(key) == best.get(key),
                    }
                    for key, _, _ in METRICS
                ],
            }
            for v in names
        ]
        out.append({"title": title, "reference": reference, "rows": rows})
    return out


_RUN_LABELS = {
    "n_events": "events published",
    "n_scored": "labelled events scored",
    "n_ranked": "positives ranked",
    "n_positive": "positives",
    "dead_lettered": "dead-lettered",
    "negatives": "sampled negatives per ranked positive",
    "k": "K (Recall@K, NDCG@K)",
    "rank_fraction": "fraction of positives ranked",
    "seed": "seed",
    "window": "window (events)",
    "synchronous": "synchronous windows",
    "lag_s": "event-time lag of the fast path (s; none: windows)",
    "max_lag": "most events the worker may lag",
    "max_observed_lag": "largest lag seen (events)",
    "wall_s": "wall time (s)",
    "loop_s": "test-then-train loop (s)",
    "serving_s": "time in scoring requests (s)",
    "lag_waits_s": "time waiting for the worker (s)",
    "requests_per_s": "scoring requests per second",
    "first_served_version_at": "first event scored by a snapshot (index)",
    "last_model_version": "last snapshot version served",
    "events_with_compensation": "events with a memory correction",
    "events_with_tpp": "events with a TPP term",
}


def write_html(report: dict[str, Any], pngs: dict[str, Path], path: Path) -> None:
    """The self-contained HTML report (jinja2 template ``templates/report.html.j2``, plots inline)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    run = report["run"]
    variants = report["variants"]
    served = [v for v in variants if v in SERVED_VARIANTS]
    peers = [v for v in variants if v not in SERVED_VARIANTS]
    details = {k: v for k, v in run.items() if isinstance(v, dict)}
    html_doc = env.get_template("report.html.j2").render(
        stamp=report.get("stamp", {"version": "?", "commit": "unknown", "date": "?"}),
        run=run,
        metrics=[{"key": k, "label": label, "higher": higher} for k, label, higher in METRICS],
        groups=_groups(variants),
        pipeline_rate=_fmt(variants[served[0]].get("events_per_s")) if served else "–",
        peer_rates=[(v, _fmt(variants[v].get("events_per_s"))) for v in peers],
        series_window=report["series"]["window_events"],
        figures=[{"name": name, "data": base64.b64encode(png.read_bytes()).decode()} for name, png in pngs.items()],
        run_rows=[(label, _run_value(run.get(key))) for key, label in _RUN_LABELS.items() if key in run],
        run_details=[
            (key.replace("_", " "), orjson.dumps(val, option=orjson.OPT_INDENT_2).decode())
            for key, val in details.items()
        ],
    )
    path.write_text(html_doc, encoding="utf-8")
