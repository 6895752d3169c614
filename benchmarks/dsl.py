"""DSL vs dense on Gowalla (LightGCN split): Recall@20, NDCG@20, training and inference time.

Run: ``python -m benchmarks.dsl [--data DIR] [--epochs N] [--dim D] [--skip-ml100k]``.

What it does, all in one run: trains MF-BPR dense and with DSL at 80 %, 90 % and 95 % sparsity
by the same code path (``models.dsl.SparseMF``), evaluates full ranking over all items with each
user's train items excluded (LightGCN protocol, last epoch, no test-set selection), times
training, and times scoring 100 and 1,000 random candidates for one user (median of many
repeats): dense numpy gather + matvec vs the sparse CSR scorer (``CSRTable.dot``). Optionally a
prequential AUC of dense vs sparse ``DSLRecommender`` on MovieLens-100K, when the verified
ML-100K cache already exists (no network is used here). The last line is one JSON object.

Paper (Wang et al., WSDM 2024, arXiv:2402.02855): the authors' code (github.com/shuyao-wang/DSL)
was checked (see ``models/sparse.py``), but the paper's result table could not be retrieved with
the tools available when this was written, so no paper numbers are copied here; the claim under
test is the paper's qualitative one: at high sparsity DSL stays close to the dense model.
Defaults (8 epochs, dim 64, ΔT 200, 1 thread, ``--init aligned``) run in ~2.5 min on a 2-core
machine; timings depend on machine load.

Mask init. ``--init aligned`` (shared columns per table, ``models/sparse.py``) is the default
because it won on the validation split (``--select paper paper_aligned``: Recall@20 0.0476 vs
0.0172 for the paper's uniform init; declared as a second selection round before it ran).
``--init random`` reproduces the paper's init. Test figures, 8 epochs, same seed: uniform init
s80 / s90 / s95 Recall@20 0.0376 / 0.0218 / 0.0117; aligned 0.0739 / 0.0552 / 0.0432 (dense
0.1107). Even aligned, 90 % sparsity stays ~50 % below dense, and below a dense model with the
same budget (dim 6: validation 0.0723 vs 0.0476), so the issue's "within 5 %" target is not met.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.dsl import DSLRecommender, SparseMF

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gowalla-lightgcn"


def log(msg: str) -> None:
    print(msg, flush=True)


def read_lightgcn(path: Path) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    with path.open() as fh:
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            user = int(parts[0])
            while len(out) <= user:
                out.append(np.zeros(0, dtype=np.int64))
            out[user] = np.asarray(parts[1:], dtype=np.int64)
    return out


def evaluate(model: SparseMF, train: list[np.ndarray], test: list[np.ndarray], k: int = 20,
             batch: int = 2048) -> tuple[float, float]:
    """Mean Recall@k and NDCG@k over users with test items (LightGCN definitions)."""
    users = np.asarray([u for u, t in enumerate(test) if len(t)], dtype=np.int64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for start in range(0, len(users), batch):
        ub = users[start : start + batch]
        top = model.recommend_topk(ub, k, exclude=[train[u] if u < len(train) else np.zeros(0, np.int64) for u in ub])
        for row, u in enumerate(ub):
            truth = test[u]
            hits = np.isin(top[row], truth)
            recalls.append(hits.sum() / len(truth))
            idcg = discounts[: min(len(truth), k)].sum()
            ndcgs.append((hits * discounts).sum() / idcg)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def median_us(fn, repeats: int) -> float:
    fn()
    times = np.empty(repeats)
    for r in range(repeats):
        t0 = time.perf_counter()
        fn()
        times[r] = time.perf_counter() - t0
    return float(np.median(times) * 1e3)  # milliseconds


def inference_times(model: SparseMF, n_items: int, seed: int, repeats: int) -> dict[str, float]:
    """Dense gather+matvec vs sparse CSR row-gather+SpMV for one user's candidates (ms)."""
    rng = np.random.default_rng(seed)
    user_dense = model.user.detach().numpy()
    item_dense = np.ascontiguousarray(model.item.detach().numpy())
    user_csr, item_csr = model.to_sparse_tables()
    u = int(rng.integers(len(user_dense)))
    out: dict[str, float] = {}
    for k in (100, 1000):
        cand = rng.choice(n_items, size=k, replace=False).astype(np.int32)

        def dense() -> np.ndarray:
            return np.take(item_dense, cand, axis=0) @ user_dense[u]

        def sparse() -> np.ndarray:
            return item_csr.dot(cand, user_csr.rows_dense(np.asarray([u]))[0])

        assert np.allclose(dense(), sparse(), atol=1e-4), "sparse scorer disagrees with dense"
        out[f"dense_{k}"] = median_us(dense, repeats)
        out[f"sparse_{k}"] = median_us(sparse, repeats)
    out["item_table_bytes_dense"] = float(item_dense.nbytes)
    out["item_table_bytes_csr"] = float(item_csr.nbytes)
    return out


def run_gowalla(data: Path, epochs: int, dim: int, seed: int, prune_every: int, repeats: int,
                grow_from: str = "batch", init: str = "random") -> dict[str, float]:
    train = read_lightgcn(data / "train.txt")
    test = read_lightgcn(data / "test.txt")
    n_users = max(len(train), len(test))
    n_items = 1 + max(int(max((a.max() for a in train + test if len(a)), default=0)), 0)
    users = np.concatenate([np.full(len(a), u, dtype=np.int64) for u, a in enumerate(train)])
    items = np.concatenate(train)
    keys = np.sort(users * n_items + items)
    log(f"gowalla: {n_users} users, {n_items} items, {len(items)} train pairs, "
        f"{sum(len(t) for t in test)} test pairs; epochs={epochs} dim={dim}")
    batch = 2048
    total_steps = epochs * ((len(items) + batch - 1) // batch)
    result: dict[str, float] = {}
    for tag, density in (("dense", 1.0), ("s80", 0.2), ("s90", 0.1), ("s95", 0.05)):
        model = SparseMF(n_users, n_items, dim=dim, density=density, batch_size=batch,
                         prune_every=prune_every, total_steps=total_steps, seed=seed, grow_from=grow_from,
                         init=init)
        log(f"[{tag}] density={density} active={model.n_active_params:,}/{model.n_total_params:,}")
        t0 = time.perf_counter()
        for epoch in range(1, epochs + 1):
            te = time.perf_counter()
            loss = model.fit_epoch(users, items, keys)
            dt = time.perf_counter() - te
            log(f"[{tag}] epoch {epoch}/{epochs} loss {loss:.4f} {len(items) / dt:,.0f} pairs/s ({dt:.1f}s)")
        train_s = time.perf_counter() - t0
        assert model.n_active_params == round(density * n_users * dim) + round(density * n_items * dim) \
            or density == 1.0
        te = time.perf_counter()
        recall, ndcg = evaluate(model, train, test)
        log(f"[{tag}] Recall@20 {recall:.4f} NDCG@20 {ndcg:.4f} train {train_s:.0f}s eval {time.perf_counter() - te:.0f}s")
        result[f"recall20_{tag}"] = round(recall, 5)
        result[f"ndcg20_{tag}"] = round(ndcg, 5)
        result[f"train_s_{tag}"] = round(train_s, 1)
        result[f"params_{'dense' if tag == 'dense' else 'active_' + tag}"] = model.n_active_params
        if tag != "dense":
            active_users = int(model.masks.masks["user"].sum())
            result[f"user_share_of_budget_{tag}"] = round(active_users / model.n_active_params, 4)
        if tag in ("dense", "s90"):
            times = inference_times(model, n_items, seed, repeats)
            key = "dense" if tag == "dense" else "s90"
            for k in (100, 1000):
                # the dense model is served dense, the sparse model by its CSR scorer
                result[f"infer_ms_{k}_{key}"] = round(times[f"{'dense' if tag == 'dense' else 'sparse'}_{k}"], 4)
            if tag == "s90":
                for k in (100, 1000):
                    result[f"infer_ms_{k}_s90_dense_storage"] = round(times[f"dense_{k}"], 4)
                result["item_table_bytes_dense"] = int(times["item_table_bytes_dense"])
                result["item_table_bytes_csr_s90"] = int(times["item_table_bytes_csr"])
            log(f"[{tag}] inference ms: " + ", ".join(f"{k}={v:.4f}" for k, v in times.items() if "bytes" not in k))
        del model
    result["recall20_s90_rel_gap"] = round(1 - result["recall20_s90"] / result["recall20_dense"], 4)
    return result


def split_validation(train: list[np.ndarray], frac: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out ``frac`` of each user's train items (at least one when the user has >= 2)."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for items in train:
        n_val = int(round(frac * len(items))) if len(items) >= 2 else 0
        n_val = max(n_val, 1) if len(items) >= 2 else 0
        perm = rng.permutation(len(items))
        val.append(np.sort(items[perm[:n_val]]))
        fit.append(np.sort(items[perm[n_val:]]))
    return fit, val


# Settings compared by ``--select`` on the validation split (never on test.txt):
# name -> (density-independent) SparseMF keyword arguments for the sparse models.
SELECT_CONFIGS: dict[str, dict[str, object]] = {
    "paper": dict(prune_every=200, initial_fraction=0.5, protect_grown=False, lr=1e-2),
    "dt800_protect": dict(prune_every=800, initial_fraction=0.5, protect_grown=True, lr=1e-2),
    "p02_dt400_protect": dict(prune_every=400, initial_fraction=0.2, protect_grown=True, lr=1e-2),
    "p02_dt400_protect_lr3e-2": dict(prune_every=400, initial_fraction=0.2, protect_grown=True, lr=3e-2),
    "p02_dt400_protect_window": dict(prune_every=400, initial_fraction=0.2, protect_grown=True, lr=1e-2,
                                     grow_from="window"),
    # added in a second round (declared before its runs): shared-column mask init, see models/sparse.py
    "paper_aligned": dict(prune_every=200, initial_fraction=0.5, protect_grown=False, lr=1e-2, init="aligned"),
}


def select(data: Path, epochs: int, dim: int, seed: int, names: list[str], density: float) -> dict[str, float]:
    """Train on train.txt minus a 10 % per-user hold-out and report validation Recall@20 per config."""
    full = read_lightgcn(data / "train.txt")
    train, val = split_validation(full, 0.1, seed)
    n_users = len(full)
    n_items = 1 + int(max(a.max() for a in full if len(a)))
    users = np.concatenate([np.full(len(a), u, dtype=np.int64) for u, a in enumerate(train)])
    items = np.concatenate(train)
    keys = np.sort(users * n_items + items)
    total_steps = epochs * ((len(items) + 2047) // 2048)
    out: dict[str, float] = {}
    for name in names:
        kw = dict(SELECT_CONFIGS[name]) if name != "dense" else {}
        d = 1.0 if name == "dense" else density
        t0 = time.perf_counter()
        model = SparseMF(n_users, n_items, dim=dim, density=d, batch_size=2048, total_steps=total_steps,
                         seed=seed, **kw)  # type: ignore[arg-type]
        for _ in range(epochs):
            model.fit_epoch(users, items, keys)
        recall, ndcg = evaluate(model, train, val)
        log(f"[select {name} density={d}] val Recall@20 {recall:.4f} NDCG@20 {ndcg:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")
        out[f"val_recall20_{name}"] = round(recall, 5)
    return out


def prequential_ml100k(limit: int | None, seed: int) -> dict[str, float]:
    """Test-then-train AUC of dense vs DSL ``DSLRecommender`` on the ML-100K replay."""
    from driftrec.settings import get_settings
    from sklearn.metrics import roc_auc_score

    cache = get_settings().data_cache / "ml-100k"
    if not all((cache / f).is_file() for f in ("ml-100k.inter", "ml-100k.item", "ml-100k.user")):
        raise FileNotFoundError(f"ML-100K cache {cache} absent (run `driftrec replay ml-100k` once)")
    from streams.datasets import load_ml100k_interactions

    stream = load_ml100k_interactions(limit=limit)
    out: dict[str, float] = {}
    for tag, density in (("dense", 1.0), ("s90", 0.1)):
        model = DSLRecommender(density=density, head_density=1.0 if density == 1.0 else 0.5, seed=seed)
        preds, labels, t0 = [], [], time.perf_counter()
        for start in range(0, len(stream), 256):
            batch = stream[start : start + 256]
            labelled = [x for x in batch if x.label is not None]
            preds.append(model.predict_proba_many(labelled))
            labels.extend(x.label for x in labelled)
            model.learn_many(batch)
        auc = roc_auc_score(labels, np.concatenate(preds))
        log(f"[ml100k {tag}] prequential AUC {auc:.4f} over {len(labels)} events "
            f"({len(stream) / (time.perf_counter() - t0):,.0f} events/s) active {model.n_active_params:,}")
        out[f"ml100k_auc_{tag}"] = round(float(auc), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with LightGCN train.txt/test.txt")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--prune-every", type=int, default=200, help="ΔT in optimiser steps")
    ap.add_argument("--repeats", type=int, default=2000, help="repeats for inference timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grow-from", choices=("batch", "window"), default="batch",
                    help="growth score: last batch's dense gradient (paper) or |grad| summed over the ΔT window")
    ap.add_argument("--init", choices=("random", "aligned"), default="aligned",
                    help="mask init: uniform (paper) or shared columns per table (models/sparse.py)")
    ap.add_argument("--skip-ml100k", action="store_true")
    ap.add_argument("--select", nargs="*", default=None,
                    help=f"only compare settings on a validation split of train.txt: dense and/or {list(SELECT_CONFIGS)}")
    ap.add_argument("--select-density", type=float, default=0.1)
    ap.add_argument("--ml100k-limit", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.select is not None:
        res = select(args.data, args.epochs, args.dim, args.seed, args.select or list(SELECT_CONFIGS),
                     args.select_density)
        print(json.dumps({"benchmark": "dsl-select", "epochs": args.epochs, "density": args.select_density, **res}))
        return
    result: dict[str, object] = {"benchmark": "dsl", "data": str(args.data), "epochs": args.epochs, "dim": args.dim,
                                 "prune_every": args.prune_every, "grow_from": args.grow_from, "init": args.init}
    result.update(run_gowalla(args.data, args.epochs, args.dim, args.seed, args.prune_every, args.repeats,
                              args.grow_from, args.init))
    if args.skip_ml100k:
        result["ml100k"] = "skipped (--skip-ml100k)"
    else:
        try:
            result.update(prequential_ml100k(args.ml100k_limit, args.seed))
        except (ImportError, FileNotFoundError, OSError) as exc:
            result["ml100k"] = f"skipped: {exc}"
    result["target_recall_within_5pct_s90"] = bool(result["recall20_s90_rel_gap"] <= 0.05)  # type: ignore[operator]
    result["target_infer_1000_sparse_faster"] = bool(
        result["infer_ms_1000_s90"] < result["infer_ms_1000_dense"])  # type: ignore[operator]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
