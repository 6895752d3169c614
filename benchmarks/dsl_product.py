"""DSL's product target: the online CTR model driftrec serves (``DSLRecommender``), 90 % sparse
against the same model dense, in one run (``python -m benchmarks.dsl --product``):

* prequential AUC / log-loss on the ML-100K replay (test-then-train in micro-batches of 256);
* one user's 1,000 candidates scored from the served snapshot, timed side by side: the sparse
  model through ``SparseScorer`` (its serving layout) and the dense model through the same
  scorer with every table held dense (numpy ``take``; the head is dense in both: the best dense
  path, not a CSR of full rows). Both take the one-user path (``SparseScorer.score_user_rows``:
  the user's part of the first layer folded in once per request). Timed with the ids hashed (what
  a request costs), on pre-hashed rows (the model alone), and on 1,000 of ML-100K's own items
  (``catalogue``: rows both models learned in full);
* memory: the snapshot's bytes and the scorer's resident tables;
* the same three figures on untrained models whose hashed tables have 1e4, 1e5 and 1e6 rows
  (a catalogue of that many ids with one row each; synthetic weights, as the issue allows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from driftrec.models import metrics
from driftrec.models.dsl import DSLRecommender, SparseScorer

CANDIDATES = 1000


def log(msg: str) -> None:
    print(msg, flush=True)


class _DenseRows:
    """A table held dense: ``rows_dense`` is a numpy ``take``."""

    def __init__(self, table: Any) -> None:
        self.array = np.ascontiguousarray(table.rows_dense(np.arange(table.shape[0], dtype=np.int32)))
        self.shape = self.array.shape

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def rows_dense(self, rows: np.ndarray) -> np.ndarray:
        return np.take(self.array, rows, axis=0)


def dense_scorer(blob: bytes) -> SparseScorer:
    """``SparseScorer`` of a snapshot with every table held dense (the head already is)."""
    scorer = SparseScorer.from_bytes(blob)
    scorer.tables = {k: _DenseRows(t) for k, t in scorer.tables.items()}  # type: ignore[misc]
    scorer.biases = {k: _DenseRows(t) for k, t in scorer.biases.items()}  # type: ignore[misc]
    return scorer


def resident_bytes(scorer: SparseScorer) -> int:
    parts = [*scorer.tables.values(), *scorer.biases.values(), *scorer.w_t.values(), *scorer.b.values()]
    return int(sum(p.nbytes for p in parts))


def _median_ms(fns: dict[str, Callable[[int], object]], repeats: int, block: int = 64) -> dict[str, float]:
    """Median ms per call, the variants taking turns in blocks (same machine load for each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(1, repeats // block)):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            for i in range(block):
                t0 = time.perf_counter()
                fns[name](r * block + i)
                times[name].append(time.perf_counter() - t0)
    return {name: round(float(np.median(t)) * 1e3, 4) for name, t in times.items()}


def serving_figures(
    dense: DSLRecommender,
    sparse: DSLRecommender,
    seed: int,
    repeats: int,
    tag: str = "",
    catalogue: dict[str, str | None] | None = None,
) -> dict:
    """Latency of 1,000 candidates and memory, dense vs s90, from the models' own snapshots.

    Candidates are random ids (most land on rows the stream never touched, which a 90 %-sparse
    table keeps sparse); with ``catalogue`` (item id -> category) also 1,000 of its items with
    their categories (``catalogue_*``: rows the models learned, which grow on touch keeps full).
    """
    rng = np.random.default_rng(seed)
    blobs = {"dense": dense.to_bytes(), "s90": sparse.to_bytes()}
    scorers = {"dense": dense_scorer(blobs["dense"]), "s90": SparseScorer.from_bytes(blobs["s90"])}
    n_rows = scorers["s90"].n_rows
    id_sets = [[f"i{x}" for x in rng.integers(0, 10 * n_rows, CANDIDATES)] for _ in range(32)]
    row_sets = [
        (
            int(rng.integers(n_rows)),
            rng.integers(0, n_rows, CANDIDATES).astype(np.int32),
            rng.integers(0, n_rows, CANDIDATES).astype(np.int32),
        )
        for _ in range(32)
    ]
    for name, model in (("dense", dense), ("s90", sparse)):  # each scorer serves its model's predictions
        want = model.score_candidates("u1", id_sets[0][:50])[0]
        assert np.allclose(scorers[name].score_candidates("u1", id_sets[0][:50])[0], want, atol=1e-5), name

    def by_ids(scorer: SparseScorer) -> Callable[[int], object]:
        return lambda i: scorer.score_candidates(f"u{i % 97}", id_sets[i % len(id_sets)])

    def by_rows(scorer: SparseScorer) -> Callable[[int], object]:
        return lambda i: scorer.score_user_rows(*row_sets[i % len(row_sets)])

    real_sets: list[tuple[list[str], list[str | None]]] = []
    if catalogue:
        known = sorted(catalogue)
        for _ in range(32):
            picked = [known[k] for k in rng.choice(len(known), size=min(CANDIDATES, len(known)), replace=False)]
            real_sets.append((picked, [catalogue[x] for x in picked]))

    def by_catalogue(scorer: SparseScorer) -> Callable[[int], object]:
        return lambda i: scorer.score_candidates(f"u{i % 97}", *real_sets[i % len(real_sets)])

    fns: dict[str, Callable[[int], object]] = {}
    for name, scorer in scorers.items():
        fns[f"ids_{name}"], fns[f"rows_{name}"] = by_ids(scorer), by_rows(scorer)
        if real_sets:
            fns[f"catalogue_{name}"] = by_catalogue(scorer)
    ms = _median_ms(fns, repeats)
    out: dict[str, Any] = {}
    for name in scorers:
        out[f"{tag}infer_ms_{CANDIDATES}_{name}"] = ms[f"ids_{name}"]
        out[f"{tag}infer_ms_{CANDIDATES}_rows_only_{name}"] = ms[f"rows_{name}"]
        out[f"{tag}snapshot_bytes_{name}"] = len(blobs[name])
        out[f"{tag}resident_bytes_{name}"] = resident_bytes(scorers[name])
    out[f"{tag}speedup_{CANDIDATES}"] = round(ms["ids_dense"] / ms["ids_s90"], 3)
    out[f"{tag}speedup_{CANDIDATES}_rows_only"] = round(ms["rows_dense"] / ms["rows_s90"], 3)
    if real_sets:
        for name in scorers:
            out[f"{tag}infer_ms_{CANDIDATES}_catalogue_{name}"] = ms[f"catalogue_{name}"]
        out[f"{tag}speedup_{CANDIDATES}_catalogue"] = round(ms["catalogue_dense"] / ms["catalogue_s90"], 3)
    out[f"{tag}snapshot_ratio"] = round(len(blobs["dense"]) / len(blobs["s90"]), 2)
    out[f"{tag}resident_ratio"] = round(resident_bytes(scorers["dense"]) / resident_bytes(scorers["s90"]), 2)
    return out


def _pair(n_rows: int, seed: int) -> tuple[DSLRecommender, DSLRecommender]:
    dense = DSLRecommender(n_rows=n_rows, density=1.0, head_density=1.0, seed=seed)
    sparse = DSLRecommender(n_rows=n_rows, density=0.1, head_density=0.5, seed=seed)
    return dense, sparse


def prequential(stream: list[Any], seed: int) -> tuple[dict[str, float], dict[str, DSLRecommender]]:
    out: dict[str, float] = {}
    models = dict(zip(("dense", "s90"), _pair(65536, seed)))
    for tag, model in models.items():
        preds: list[np.ndarray] = []
        labels: list[int] = []
        t0 = time.perf_counter()
        for start in range(0, len(stream), 256):
            batch = stream[start : start + 256]
            labelled = [x for x in batch if x.label is not None]
            preds.append(model.predict_many(labelled))
            labels.extend(int(x.label or 0) for x in labelled)
            model.learn_many(batch)
            if (start // 256) % 80 == 0:
                rate = (start + len(batch)) / (time.perf_counter() - t0)
                log(f"  [ml100k {tag}] {start + len(batch):,}/{len(stream):,} events ({rate:,.0f} ev/s)")
        y, p = np.asarray(labels), np.concatenate(preds)
        out[f"ml100k_auc_{tag}"] = round(metrics.auc(y, p), 4)
        out[f"ml100k_logloss_{tag}"] = round(metrics.logloss(y, p), 4)
        out[f"ml100k_active_params_{tag}"] = model.n_active_params
        log(f"[ml100k {tag}] AUC {out[f'ml100k_auc_{tag}']:.4f} log-loss {out[f'ml100k_logloss_{tag}']:.4f}")
    out["ml100k_auc_gap"] = round(out["ml100k_auc_dense"] - out["ml100k_auc_s90"], 4)
    return out, models


def product_figures(stream: list[Any], seed: int, repeats: int, catalogues: tuple[int, ...]) -> dict[str, Any]:
    result, models = prequential(stream, seed)
    log("serving the trained models' snapshots: 1,000 candidates, dense vs s90")
    catalogue = {x.item_id: x.category for x in stream}
    result.update(serving_figures(models["dense"], models["s90"], seed, repeats, catalogue=catalogue))
    for n in catalogues:
        log(f"catalogue of {n:,} rows (untrained, synthetic weights)")
        result.update(serving_figures(*_pair(n, seed), seed=seed, repeats=repeats, tag=f"rows{n}_"))
    result["target_auc_within_0.005"] = bool(abs(result["ml100k_auc_gap"]) <= 0.005)
    result["target_infer_2x_faster"] = bool(result[f"speedup_{CANDIDATES}"] >= 2.0)
    result["target_memory_5x_smaller"] = bool(result["resident_ratio"] >= 5.0 and result["snapshot_ratio"] >= 5.0)
    return result
