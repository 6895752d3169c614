"""The evaluation report: metrics from served records, plots (matplotlib Agg), self-contained HTML.

Everything here is computed from the per-event records written to ``served.jsonl``, so a reader
can recompute any number in ``report.json`` from that file alone (see :func:`load_served`).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from driftrec.models import metrics

SERVED_VARIANTS = ("base", "base+memory", "base+tpp", "full")
METRIC_NAMES = ("auc", "logloss", "recall20", "ndcg20")
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


def plot_series(series: dict[str, Any], variants: list[str], out: Path) -> dict[str, Path]:
    """One PNG per metric, a line per variant; returns metric → path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = series["end_index"]
    paths: dict[str, Path] = {}
    titles = {
        "auc": "AUC (sliding window)",
        "logloss": "log-loss (sliding window)",
        "recall20": "Recall@20 vs sampled negatives",
        "ndcg20": "NDCG@20 vs sampled negatives",
    }
    for name in METRIC_NAMES:
        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
        for v in variants:
            ys = [np.nan if val is None else val for val in series[v][name]]
            style = "-" if v in SERVED_VARIANTS else (":" if v.endswith("@event") else "--")
            ax.plot(x, ys, style, label=v, linewidth=2.0 if v == "full" else 1.2)
        ax.set_title(f"{titles[name]}, window {series['window_events']} events")
        ax.set_xlabel("event index (stream order)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths[name] = path
    return paths


def _fmt(x: Any, integer: bool = False) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.0f}" if integer or abs(x) >= 100 else f"{x:.4f}"
    return html.escape(str(x))


def write_html(report: dict[str, Any], pngs: dict[str, Path], path: Path) -> None:
    rows = []
    cols = ["auc", "logloss", "recall20", "ndcg20", "events_per_s"]
    for v, m in report["variants"].items():
        rows.append(
            "<tr><th>"
            + html.escape(v)
            + "</th>"
            + "".join(f"<td>{_fmt(m.get(c), c == 'events_per_s')}</td>" for c in cols)
            + "</tr>"
        )
    imgs = []
    for name, png in pngs.items():
        data = base64.b64encode(png.read_bytes()).decode()
        imgs.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'
        )
    run = report["run"]
    meta = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(orjson.dumps(v).decode()[:400])}</code></td></tr>"
        for k, v in run.items()
        if k != "protocol"
    )
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>driftrec prequential evaluation</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{text-align:left}}img{{max-width:100%}}code{{font-size:85%;white-space:pre-wrap}}</style></head>
<body><h1>driftrec — prequential evaluation</h1>
<p>Source <b>{html.escape(str(run.get("source")))}</b>, {run.get("n_scored")} labelled events scored
({run.get("n_ranked")} ranked against {run.get("negatives")} sampled negatives),
wall time {_fmt(run.get("wall_s"))} s.</p>
<h2>Variants</h2>
<table><tr><th>variant</th>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{"".join(rows)}</table>
<p>{html.escape(run.get("protocol", ""))}</p>
<h2>Over time</h2>{"".join(imgs)}
<h2>Run</h2><table>{meta}</table>
</body></html>"""
    path.write_text(doc, encoding="utf-8")
