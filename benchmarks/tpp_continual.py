"""Continual learning on streaming event sequences: PromptTPP vs retrain / naive fine-tuning.

Run: ``python -m benchmarks.tpp_continual [--data DIR] [--seed N] [--dev METHOD]`` (or
``python benchmarks/tpp_continual.py ...``). Streams an EasyTPP dataset's training sequences in
time order as consecutive periods; trains on period t and evaluates on period t+1 (next-event
type error, time RMSE, log-likelihood), for a model retrained per period, a model fine-tuned on
each new period (forgetting), and PromptTPP (a prompt pool, no replay of past data); a
homogeneous Poisson process and the "repeat the last type" rule are the floors. The last line is
one JSON object; it is also appended to ``benchmarks/results/tpp_continual.jsonl``. The dev
rounds that chose the defaults (20 epochs, the copy path and its step size, a pool of 20) are
recorded in ``research/tpp_dev_rounds.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import emit
from driftrec.models.prompt_tpp import PromptTPP
from driftrec.models.tpp import EventSeq, HomogeneousPoisson, NeuralTPP

METHODS = ("retrain", "finetune", "prompt")
# The pre-declared selection grid (see the module docstring); do not edit after seeing results.
SELECT_GRID: tuple[dict[str, object], ...] = tuple(
    {"freeze": f, "pool_size": m, "top_n": n} for f in ("query", "encoder", "none") for m, n in ((10, 5), (20, 5))
)
SELECT_SEEDS = (0, 1)
# PromptTPP options of the default run (on top of the class defaults): chosen on dev, fifth round.
PROMPT_OPTS: dict[str, object] = {"pool_size": 20}


def load_split(folder: Path, split: str) -> tuple[list[EventSeq], list[float], int]:
    raw = json.loads((folder / f"{split}.json").read_text())
    seqs, starts = [], []
    for s in raw:
        dt = np.asarray(s["time_since_last_event"], dtype=np.float64)
        dt[0] = 0.0
        start = float(s["time_since_start"][0])
        seqs.append((start + np.cumsum(dt), np.asarray(s["type_event"], dtype=np.int64)))
        starts.append(start)
    return seqs, starts, int(raw[0]["dim_process"])


def evaluate(model: NeuralTPP, seqs: list[EventSeq]) -> dict[str, float]:
    preds = model.predict_next_all(seqs)
    wrong = np.concatenate([p[1][:-1] != s[1][1:] for p, s in zip(preds, seqs)])
    sq = np.concatenate([(p[0][:-1] - np.diff(s[0])) ** 2 for p, s in zip(preds, seqs)])
    return {
        "ll": float(model.log_likelihood_many(seqs)),
        "type_err": float(wrong.mean()),
        "rmse": float(np.sqrt(sq.mean())),
    }


def log(msg: str) -> None:
    print(msg, flush=True)


BaseOpts = Mapping[str, object]
"""Options of the base TPP shared by all three methods (``NeuralTPP`` keywords, from the command line)."""


def make_factory(
    n_types: int, seed: int, base_opts: BaseOpts | None = None, prompt_opts: Mapping[str, object] | None = None
) -> dict[str, Callable[[], NeuralTPP]]:
    opts: dict[str, Any] = dict(prompt_opts or {})  # JSON options from the command line
    base: dict[str, Any] = dict(base_opts or {})
    return {
        "retrain": lambda: NeuralTPP(n_types, seed=seed, **base),
        "finetune": lambda: NeuralTPP(n_types, seed=seed, **base),
        "prompt": lambda: PromptTPP(n_types, seed=seed, **base, **opts),
    }


def train_period(model: NeuralTPP, seqs: list[EventSeq], epochs: int, tag: str) -> None:
    t0 = time.perf_counter()
    model.start_period()
    model.learn_many(seqs, epochs=epochs)
    model.end_period()
    dt = time.perf_counter() - t0
    n_ev = sum(len(s[0]) for s in seqs) * epochs
    log(f"  {tag}: trained {len(seqs)} seqs x {epochs} ep in {dt:.1f}s ({n_ev / dt:.0f} events/s)")


def run_stream(
    data: Path,
    periods: int,
    epochs: int,
    seed: int,
    split: str = "train",
    methods: tuple[str, ...] = METHODS,
    prompt_opts: Mapping[str, object] | None = None,
    n_types: int | None = None,
    base_opts: BaseOpts | None = None,
) -> dict[str, Any]:
    seqs, starts, file_types = load_split(data, split)
    n_types = n_types or file_types
    order = np.argsort(starts, kind="stable")
    chunks = [[seqs[i] for i in part] for part in np.array_split(order, periods)]
    log(f"stream ({split}): {len(seqs)} sequences, {n_types} types, {periods} periods of ~{len(chunks[0])}")
    factory = make_factory(n_types, seed, base_opts, prompt_opts)
    persistent: dict[str, NeuralTPP] = {m: factory[m]() for m in ("finetune", "prompt") if m in methods}
    hist: dict[str, dict[str, list[float]]] = {m: {"ll": [], "type_err": [], "rmse": []} for m in methods}
    poisson_ll: list[float] = []
    for t in range(periods - 1):
        log(f"[period {t + 1}/{periods - 1}] train on chunk {t}, evaluate on chunk {t + 1}")
        poisson = HomogeneousPoisson(n_types)
        poisson.learn_many(chunks[t])
        poisson_ll.append(poisson.log_likelihood_many(chunks[t + 1]))
        for m in methods:
            model = factory[m]() if m == "retrain" else persistent[m]
            train_period(model, chunks[t], epochs, m)
            t0 = time.perf_counter()
            res = evaluate(model, chunks[t + 1])
            for k, v in res.items():
                hist[m][k].append(v)
            log(
                f"  {m}: ll={res['ll']:.4f} type_err={res['type_err']:.4f} rmse={res['rmse']:.4f}"
                f" (eval {time.perf_counter() - t0:.1f}s)"
            )
    return {"hist": hist, "poisson_ll": poisson_ll, "n_types": n_types, "chunk_size": len(chunks[0])}


def choose(dev: list[dict[str, Any]], ref: dict[str, float]) -> int:
    """Index of the chosen grid entry by the pre-declared rule (module docstring)."""
    errs = np.array([float(r["type_err"]) for r in dev])
    lls = np.array([float(r["ll"]) for r in dev])
    rank_err = errs.argsort(kind="stable").argsort()
    rank_ll = (-lls).argsort(kind="stable").argsort()
    score = (rank_err + rank_ll) / 2.0
    eligible = [i for i in range(len(dev)) if lls[i] > ref["ll"] and errs[i] < ref["type_err"]]
    pool = eligible or list(range(len(dev)))
    return min(pool, key=lambda i: (score[i], errs[i]))


def dev_means(
    data: Path,
    periods: int,
    epochs: int,
    n_types: int,
    method: str,
    prompt_opts: Mapping[str, object] | None,
    base_opts: BaseOpts,
) -> dict[str, float]:
    """One method on the dev.json periods, seeds ``SELECT_SEEDS``, figures averaged over periods and seeds."""
    runs = [
        run_stream(data, periods, epochs, seed, "dev", (method,), prompt_opts, n_types=n_types, base_opts=base_opts)
        for seed in SELECT_SEEDS
    ]
    return {k: float(np.mean([r["hist"][method][k] for r in runs])) for k in ("ll", "type_err", "rmse")}


def run_select(args: argparse.Namespace, base_opts: BaseOpts) -> dict[str, object]:
    """Choose PromptTPP options on dev periods, then report the choice once on train periods."""
    _, _, n_types = load_split(args.data, "train")
    ep = args.select_epochs or args.epochs
    log(f"== selection on dev.json: {len(SELECT_GRID)} configs + finetune reference, {ep} epochs ==")

    def dev_means_of(method: str, opts: Mapping[str, object] | None) -> dict[str, float]:
        return dev_means(args.data, args.periods, ep, n_types, method, opts, base_opts)

    ref = dev_means_of("finetune", None)
    log(f"dev finetune: ll={ref['ll']:.4f} type_err={ref['type_err']:.4f}")
    dev_rows: list[dict[str, object]] = []
    for opts in SELECT_GRID:
        row = {**opts, **dev_means_of("prompt", dict(opts))}
        dev_rows.append(row)
        log(f"dev prompt {opts}: ll={row['ll']:.4f} type_err={row['type_err']:.4f}")
    best = choose(dev_rows, ref)
    chosen = {k: SELECT_GRID[best][k] for k in SELECT_GRID[best]}
    log(f"chosen on dev: {chosen}")
    log("== evaluation on train.json periods (run once with the chosen config) ==")
    stream = run_stream(
        args.data, args.periods, args.epochs, args.seed, "train", METHODS, dict(chosen), base_opts=base_opts
    )
    return {"stream": stream, "dev": dev_rows, "dev_finetune": ref, "chosen": chosen, "select_epochs": ep}


def run_shift(
    data: Path,
    shift: Path,
    n_seq: int,
    epochs: int,
    seed: int,
    base_opts: BaseOpts | None = None,
    prompt_opts: Mapping[str, object] | None = None,
) -> dict[str, float]:
    a_train, a_starts, ka = load_split(data, "train")
    b_train, b_starts, kb = load_split(shift, "train")
    a_dev, _, _ = load_split(data, "dev")
    b_dev, _, _ = load_split(shift, "dev")
    n_types = max(ka, kb)
    a_chunk = [a_train[i] for i in np.argsort(a_starts, kind="stable")[:n_seq]]
    b_chunk = [b_train[i] for i in np.argsort(b_starts, kind="stable")[:n_seq]]
    log(f"shift: {data.name} ({ka} types) -> {shift.name} ({kb} types), shared space {n_types}")
    factory = make_factory(n_types, seed, base_opts, prompt_opts)
    out: dict[str, float] = {"shift_n_types": float(n_types)}
    for m in METHODS:
        model = factory[m]()
        train_period(model, a_chunk, epochs, f"{m} on {data.name}")
        zero = evaluate(model, b_dev)
        if m == "retrain":
            model = factory[m]()
        train_period(model, b_chunk, epochs, f"{m} on {shift.name}")
        new = evaluate(model, b_dev)
        old = evaluate(model, a_dev)
        out[f"shift_ll_target_zeroshot_{m}"] = zero["ll"]
        for name, res in (("target", new), ("source_after", old)):
            for k, v in res.items():
                out[f"shift_{k}_{name}_{m}"] = v
        log(
            f"  {m}: target ll={new['ll']:.4f} err={new['type_err']:.4f} rmse={new['rmse']:.4f} | "
            f"source after ll={old['ll']:.4f} err={old['type_err']:.4f}"
        )
    return out


def plot(hist: dict[str, dict[str, list[float]]], shift: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(
        axes,
        (("ll", "log-likelihood / event (higher better)"), ("type_err", "next type error"), ("rmse", "next time RMSE")),
    ):
        for m in METHODS:
            ys = hist[m][key]
            ax.plot(range(2, len(ys) + 2), ys, marker="o", label=m)
        ax.set_xticks(range(2, len(hist[METHODS[0]][key]) + 2))
        ax.set_xlabel("evaluation period (trained on previous)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if shift:
        x = np.arange(len(METHODS))
        axes[3].bar(x - 0.2, [shift[f"shift_ll_target_{m}"] for m in METHODS], 0.4, label="target after")
        axes[3].bar(x + 0.2, [shift[f"shift_ll_source_after_{m}"] for m in METHODS], 0.4, label="source after")
        axes[3].set_xticks(x, METHODS)
        axes[3].set_title("domain shift: LL / event")
        axes[3].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tpp-taobao-easytpp")
    ap.add_argument("--shift-data", type=Path, default=ROOT.parent / "shared" / "data" / "tpp-taxi-easytpp")
    ap.add_argument("--no-shift", action="store_true", help="skip the domain-shift run")
    ap.add_argument("--periods", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20, help="passes per period (chosen on dev; see the docstring)")
    ap.add_argument("--shift-seqs", type=int, default=260, help="sequences per domain in the shift run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "tpp_continual.png")
    ap.add_argument(
        "--copy-history",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="base TPP with the copy path (models/tpp.py; chosen on dev, fourth round)",
    )
    ap.add_argument(
        "--copy-lr-scale",
        type=float,
        default=10.0,
        help="copy head's Adam lr = lr x this (models/tpp.py; chosen on dev, fifth round; 1 = before)",
    )
    ap.add_argument(
        "--dev",
        choices=("finetune", "prompt"),
        default=None,
        help="only run this method on the dev.json periods (seeds 0 and 1, averaged) and stop: "
        "one step of a declared dev round; never touches train.json",
    )
    ap.add_argument(
        "--prompt-opts",
        type=json.loads,
        default=dict(PROMPT_OPTS),
        help="PromptTPP keywords as JSON (streams, shift run, --dev prompt); default %(default)s, "
        "chosen on dev (fifth round); '{}' = the official config M=10",
    )
    ap.add_argument(
        "--select",
        action="store_true",
        help="choose PromptTPP options on dev.json periods, then report them on train.json periods",
    )
    ap.add_argument("--select-epochs", type=int, default=0, help="epochs during selection (0 = --epochs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base_opts: dict[str, object] = {"copy_history": args.copy_history, "copy_lr_scale": args.copy_lr_scale}
    if args.dev:
        _, _, n_types = load_split(args.data, "train")
        ep = args.select_epochs or args.epochs
        opts = args.prompt_opts if args.dev == "prompt" else None
        dev = dev_means(args.data, args.periods, ep, n_types, args.dev, opts, base_opts)
        log(
            json.dumps(
                {
                    "dev_method": args.dev,
                    "base_opts": base_opts,
                    "prompt_opts": opts or {},
                    "epochs": ep,
                    "seeds": list(SELECT_SEEDS),
                    **{f"dev_{k}": v for k, v in dev.items()},
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
        )
        return

    selection: dict[str, object] = {}
    stream: dict[str, Any]
    if args.select:
        sel = run_select(args, base_opts)
        stream = cast(dict[str, Any], sel["stream"])
        selection = {
            "selection_grid": list(SELECT_GRID),
            "selection_dev": sel["dev"],
            "selection_dev_finetune": sel["dev_finetune"],
            "selection_epochs": sel["select_epochs"],
            "chosen": sel["chosen"],
        }
        if args.out == ROOT / "reports" / "tpp_continual.png":
            args.out = ROOT / "reports" / "tpp_continual_select.png"
    else:
        stream = run_stream(
            args.data, args.periods, args.epochs, args.seed, prompt_opts=args.prompt_opts, base_opts=base_opts
        )
    hist = stream["hist"]
    skip_shift = args.no_shift or args.select
    shift = (
        {}
        if skip_shift
        else run_shift(args.data, args.shift_data, args.shift_seqs, args.epochs, args.seed, base_opts, args.prompt_opts)
    )
    plot(hist, shift, args.out)

    result: dict[str, Any] = {
        "data": args.data.name,
        "periods": args.periods,
        "eval_periods": args.periods - 1,
        "epochs": args.epochs,
        "copy_history": args.copy_history,
        "copy_lr_scale": args.copy_lr_scale,
        "prompt_opts": args.prompt_opts,
        "seqs_per_period": stream["chunk_size"],
        "ll_poisson": float(np.mean(stream["poisson_ll"])),
    }
    for m in METHODS:
        for k in ("ll", "type_err", "rmse"):
            result[f"{k}_{m}"] = float(np.mean(hist[m][k]))
    for m in METHODS:
        for k in ("ll", "type_err", "rmse"):
            result[f"{k}_{m}_per_period"] = [round(v, 4) for v in hist[m][k]]
    result["target_met"] = bool(
        result["ll_prompt"] > result["ll_finetune"] and result["type_err_prompt"] < result["type_err_finetune"]
    )
    result.update(selection)
    result.update(shift)
    result["plot"] = str(args.out)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    emit("tpp_continual", result)


if __name__ == "__main__":
    main()
