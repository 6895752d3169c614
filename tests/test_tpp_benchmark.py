"""The TPP benchmark reads any EasyTPP folder and reports its floors and seed statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.tpp_continual import load_split, repeat_last_type_error, summarize_seeds


def _write(folder: Path, split: str, seqs: list[list[int]], dim: int) -> None:
    rows = [
        {
            "dim_process": dim,
            "type_event": types,
            "time_since_start": list(np.arange(len(types), dtype=float)),
            "time_since_last_event": [0.0] + [1.0] * (len(types) - 1),
        }
        for types in seqs
    ]
    (folder / f"{split}.json").write_text(json.dumps(rows))


def test_type_count_comes_from_the_data_and_empty_sequences_are_dropped(tmp_path: Path) -> None:
    _write(tmp_path, "train", [[0, 1, 1], [], [4, 4, 2]], dim=3)  # type 4 beyond the declared 3
    seqs, starts, n_types = load_split(tmp_path, "train")
    assert n_types == 5 and len(seqs) == len(starts) == 2
    assert repeat_last_type_error(seqs) == pytest.approx(2 / 4)  # 0→1 wrong, 1→1 right, 4→4 right, 4→2 wrong


def test_seed_summary_has_standard_errors_and_paired_differences() -> None:
    def run(shift: float) -> dict:
        hist = {
            m: {"ll": [-1.0 + shift + d, -1.1 + shift + d], "type_err": [0.4 - d, 0.5 - d], "rmse": [1.0, 1.0]}
            for m, d in (("retrain", 0.0), ("finetune", 0.01), ("prompt", 0.03))
        }
        return {"hist": hist, "poisson_ll": [-2.0], "repeat_type_err": [0.6], "n_types": 3, "chunk_size": 10}

    out = summarize_seeds({0: run(0.0), 1: run(0.02), 2: run(0.04)})
    assert out["ll_prompt"] == pytest.approx(-1.05 + 0.02 + 0.03)
    assert out["ll_prompt_se"] == pytest.approx(0.02 / np.sqrt(3))
    assert out["ll_prompt_minus_finetune"] == pytest.approx(0.02) and out["ll_prompt_minus_finetune_se"] == 0.0
    assert out["type_err_repeat_last"] == 0.6 and out["target_met"] is True
