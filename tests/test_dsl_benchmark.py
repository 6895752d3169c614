"""The offline DSL benchmark runs on any LightGCN-format folder, with the equal-budget dense model.

The figures themselves come from ``benchmarks/dsl.py`` runs on Gowalla and on other datasets
(issue 21); here, that a folder written by ``benchmarks/lightgcn_split.py`` from the Taobao
sample goes through the whole benchmark and reports every variant and the targets' ratios.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.dsl import CONFIGS, read_lightgcn, run_gowalla
from benchmarks.lightgcn_split import split_per_user, write_lightgcn
from driftrec.streams.datasets import taobao_sample_events
from tests.conftest import SHARED_DATA


def test_the_split_is_per_user_disjoint_and_about_80_20() -> None:
    pairs = [(f"u{u}", f"i{(u * 7 + k) % 50}") for u in range(20) for k in range(10)] + [("u0", "i0")] * 3
    train, test = split_per_user(pairs, 0.2, seed=0)
    assert len(train) == len(test) == 20
    for tr, te in zip(train, test):
        assert not set(tr) & set(te)  # no pair on both sides
        assert len(tr) + len(te) == 10  # duplicates counted once
        assert len(te) == 2


def test_the_benchmark_runs_on_any_lightgcn_folder(tmp_path: Path) -> None:
    events = taobao_sample_events(SHARED_DATA)
    train, test = split_per_user([(e.user_id, e.item_id) for e in events], 0.2, seed=0)
    write_lightgcn(train, tmp_path / "train.txt")
    write_lightgcn(test, tmp_path / "test.txt")
    assert [r.tolist() for r in read_lightgcn(tmp_path / "train.txt")] == [r.tolist() for r in train]
    sparse_kw = {k: v for k, v in CONFIGS["default"].items() if k != "epochs"}
    result = run_gowalla(tmp_path, epochs=1, dim=64, seed=0, repeats=512, sparse_kw=sparse_kw)
    for tag in ("dense", "dense_eq90", "s50", "s80", "s90", "s95"):
        assert 0.0 <= result[f"recall20_{tag}"] <= 1.0
    assert result["params_dense_eq90"] <= result["params_active_s90"]  # no more weights than s90 holds
    assert result["params_dense_eq90"] == len(train) * 6 + (1 + max(int(np.max(r)) for r in train + test if len(r))) * 6
    assert np.isclose(
        result["recall20_s90_over_dense_eq90"], result["recall20_s90"] / result["recall20_dense_eq90"], rtol=1e-3
    )
