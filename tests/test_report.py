"""The evaluation report a person reads: every variant explained, each metric's direction and
best value marked, provenance stamped, peers and their no-lag twins in one colour."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from driftrec import __version__
from driftrec.report import colours, plot_series, summarize, write_html

STAMP = {"version": __version__, "commit": "abc1234", "date": "2026-12-03T00:00:00+00:00"}
VARIANTS = ["base", "full-no-memory", "full-no-tpp", "full", "vw", "vw@event"]


def _records(n: int = 400, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.random() < 0.5)
        scores = {
            v: float(np.clip(0.5 + (y - 0.5) * k + rng.normal(0, 0.3), 0.01, 0.99))
            for k, v in zip((0.1, 0.2, 0.15, 0.3, 0.05, 0.4), VARIANTS)
        }
        ranked = y == 1
        rank = {v: [int(rng.integers(0, 30)), 0] for v in VARIANTS}
        out.append({"label": y, "ts": 1e9 + i, "scores": scores, "ranked": ranked, "rank": rank})
    return out


def test_report_marks_directions_best_values_meanings_and_provenance(tmp_path: Path) -> None:
    records = _records()
    overall, series = summarize(records, VARIANTS, 100, 50)
    for v in VARIANTS:
        overall[v]["events_per_s"] = 80.0 if v in ("base", "full-no-memory", "full-no-tpp", "full") else 5000.0
    run = {
        "source": "synthetic",
        "n_scored": len(records),
        "n_ranked": 200,
        "negatives": 49,
        "window": 250,
        "synchronous": True,
        "wall_s": 12.0,
        "protocol": "test-then-train",
        "settings": {"dsl": {"lr": 0.01}},
    }
    report = {"stamp": STAMP, "variants": overall, "series": series, "run": run}
    pngs = {"auc": tmp_path / "auc.png"}
    pngs["auc"].write_bytes(b"\x89PNG not drawn here")
    path = tmp_path / "report.html"
    write_html(report, pngs, path)
    doc = path.read_text()

    assert f"driftrec {STAMP['version']}" in doc and STAMP["commit"] in doc and STAMP["date"] in doc
    assert "AUC ↑" in doc and "log-loss ↓" in doc and "NDCG@20 ↑" in doc
    # the best value of the equal-information group in each direction is the one in bold
    equal = [v for v in VARIANTS if not v.endswith("@event")]
    best_auc = max(equal, key=lambda v: overall[v]["auc"] or 0.0)
    best_ll = min(equal, key=lambda v: overall[v]["logloss"] or 9.0)
    row = lambda v: re.search(rf"{re.escape(v)}</th>(.*?)</tr>", doc, re.S).group(1)  # noqa: E731
    assert re.findall(r'<td class="num(?: best)?">', row(best_auc))[0] == '<td class="num best">'
    assert re.findall(r'<td class="num(?: best)?">', row(best_ll))[1] == '<td class="num best">'
    assert row("vw@event").count("best") == 4  # alone in its (reference) group
    # every variant says what it is; the two kinds of rate are told apart
    assert "no-lag reference" in doc and "the score the service returns" in doc
    assert "pipeline (served variants, whole loop)" in doc and "vw (in-process compute)" in doc
    assert "<details><summary>settings</summary>" in doc


def test_a_peer_and_its_per_event_twin_share_a_colour() -> None:
    c = colours(["base", "full", "river-lr", "vw", "river-lr@event", "vw@event"])
    assert c["vw"] == c["vw@event"] and c["river-lr"] == c["river-lr@event"]
    assert len({c["base"], c["full"], c["vw"], c["river-lr"]}) == 4


@pytest.mark.integration  # matplotlib may run fc-list to build its font cache
def test_plots_one_png_per_metric(tmp_path: Path) -> None:
    records = _records()
    _, series = summarize(records, VARIANTS, 100, 50)
    pngs = plot_series(series, VARIANTS, tmp_path)
    assert {p.name for p in pngs.values()} == {"auc.png", "logloss.png", "recall20.png", "ndcg20.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs.values())


def test_the_terminal_table_keeps_the_two_rates_apart() -> None:
    from driftrec.evaluate import variant_table

    row = {"auc": 0.7, "logloss": 0.6, "recall20": 0.5, "ndcg20": 0.2}
    table = variant_table({"variants": {"full": {**row, "events_per_s": 88.0}, "vw": {**row, "events_per_s": 6076.0}}})
    head, full, vw = table.splitlines()
    assert "pipeline ev/s" in head and "compute ev/s" in head
    assert full.rstrip().endswith("88") and vw.rstrip().endswith("6,076")
    assert len(full.rstrip()) < len(vw.rstrip())  # the pipeline's rate sits in its own column
