"""Continual learning on streaming event sequences: PromptTPP vs retrain / naive fine-tuning.

Run: ``python -m benchmarks.tpp_continual [--data DIR] [--seeds 0,1,2] [--budget-min 20]
[--max-seqs-per-period N] [--dev METHOD]`` (or ``python benchmarks/tpp_continual.py ...``). Any
EasyTPP folder works (the type count is read from the data); the default run averages three seeds
and reports standard errors, and cuts the epochs per period (never above ``--epochs``) so the run
fits ``--budget-min`` on this machine. Whatever part fails (a seed, the shift run, the plot) is
named under ``failed`` in the JSON line, which is printed in any case.

Streams an EasyTPP dataset's training sequences in time order as consecutive periods; trains on
period t and evaluates on period t+1 (next-event type error, time RMSE, log-likelihood), for a
model retrained per period, a model fine-tuned on
each new period (forgetting), and PromptTPP (a prompt pool, no replay of past data); a
homogeneous Poisson process and the "repeat the last type" rule are the floors. The last line is
one JSON object; it is also appended to ``benchmarks/results/tpp_continual.jsonl``. The dev
rounds that chose the defaults (20 epochs, the copy path and its step size, a pool of 20) are
recorded in ``research/tpp_dev_rounds.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
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
    """Sequences (absolute times, types), their start times, and the type count: the largest of
    ``dim_process`` and the largest type id + 1, since a file's first ``dim_process`` need not
    cover every type it holds. Empty sequences are dropped (nothing to learn or forecast)."""
    raw = json.loads((folder / f"{split}.json").read_text())
    seqs, starts = [], []
    n_types = 0
    for s in raw:
        types = np.asarray(s["type_event"], dtype=np.int64)
        n_types = max(n_types, int(s.get("dim_process", 0)), int(types.max()) + 1 if types.size else 0)
        if types.size == 0:
            continue
        dt = np.asarray(s["time_since_last_event"], dtype=np.float64)
        dt[0] = 0.0
        start = float(s["time_since_start"][0])
        seqs.append((start + np.cumsum(dt), types))
        starts.append(start)
    if not seqs:
        raise ValueError(f"{folder / (split + '.json')} holds no events")
    return seqs, starts, n_types


def repeat_last_type_error(seqs: list[EventSeq]) -> float:
    """Next-type error of the rule "the next event has the type of this one" (a floor no model
    that reads the history should lose to)."""
    wrong = np.concatenate([s[1][1:] != s[1][:-1] for s in seqs if len(s[1]) > 1])
    return float(wrong.mean()) if wrong.size else float("nan")


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
    max_seqs: int = 0,
) -> dict[str, Any]:
    seqs, starts, file_types = load_split(data, split)
    n_types = max(n_types or 0, file_types)
    order = np.argsort(starts, kind="stable")
    chunks = [[seqs[i] for i in part] for part in np.array_split(order, periods)]
    if max_seqs > 0:  # the earliest sequences of each period: the stream's order is kept
        chunks = [chunk[:max_seqs] for chunk in chunks]
    log(f"stream ({split}): {len(seqs)} sequences, {n_types} types, {periods} periods of ~{len(chunks[0])}")
    factory = make_factory(n_types, seed, base_opts, prompt_opts)
    persistent: dict[str, NeuralTPP] = {m: factory[m]() for m in ("finetune", "prompt") if m in methods}
    hist: dict[str, dict[str, list[float]]] = {m: {"ll": [], "type_err": [], "rmse": []} for m in methods}
    poisson_ll: list[float] = []
    repeat_err: list[float] = []
    for t in range(periods - 1):
        log(f"[period {t + 1}/{periods - 1}] train on chunk {t}, evaluate on chunk {t + 1}")
        poisson = HomogeneousPoisson(n_types)
        poisson.learn_many(chunks[t])
        poisson_ll.append(poisson.log_likelihood_many(chunks[t + 1]))
        repeat_err.append(repeat_last_type_error(chunks[t + 1]))
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
    return {
        "hist": hist,
        "poisson_ll": poisson_ll,
        "repeat_type_err": repeat_err,
        "n_types": n_types,
        "chunk_size": len(chunks[0]),
    }


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


def budget_epochs(
    data: Path,
    periods: int,
    max_seqs: int,
    n_types: int,
    n_rounds: int,
    shift_seqs: int,
    budget_s: float,
    cap: int,
    base_opts: BaseOpts,
    prompt_opts: Mapping[str, object],
) -> tuple[int, dict[str, float]]:
    """Epochs per period that fit the run into ``budget_s``: a second epoch of each model on the
    first period is timed (the first pays one-off costs), and the training of every period, seed
    and method (and the shift run) is given three quarters of the budget (evaluation takes the
    rest); seeds run in ``n_rounds`` rounds of parallel processes. At least 1, at most ``cap``."""
    t0 = time.perf_counter()
    seqs, starts, _ = load_split(data, "train")
    order = np.argsort(starts, kind="stable")
    first = [seqs[i] for i in np.array_split(order, periods)[0]]
    if max_seqs > 0:
        first = first[:max_seqs]
    factory = make_factory(n_types, 0, base_opts, prompt_opts)
    cost: dict[str, float] = {}
    for name in ("finetune", "prompt"):
        model = factory[name]()
        model.learn_many(first, epochs=1)  # the first epoch pays one-off costs (allocation, warm-up)
        t1 = time.perf_counter()
        model.learn_many(first, epochs=1)
        cost[name] = time.perf_counter() - t1
    period_epoch = 2 * cost["finetune"] + cost["prompt"]  # retrain + finetune + prompt, one epoch each
    shift_epoch = 2 * period_epoch * shift_seqs / max(1, len(first))  # each method trains on two domains
    calibration = time.perf_counter() - t0
    available = 0.75 * budget_s - calibration
    epochs = int(available // max(1e-9, n_rounds * (periods - 1) * period_epoch + shift_epoch))
    epochs = max(1, min(cap, epochs))
    log(
        f"budget {budget_s:.0f} s: one epoch of a period costs {period_epoch:.1f} s for the three methods; "
        f"{epochs} epochs per period (cap {cap})"
    )
    return epochs, {
        "budget_s": budget_s,
        "epoch_s_per_period": round(period_epoch, 2),
        "calibration_s": round(calibration, 1),
    }


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    se = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else None
    return float(arr.mean()), se


def summarize_seeds(streams: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of each method's per-period means, their standard errors over seeds, and
    the paired difference PromptTPP − fine-tuning (same seed, same periods)."""
    out: dict[str, Any] = {"seeds_run": sorted(streams)}
    if not streams:
        return out
    any_run = next(iter(streams.values()))
    out["seqs_per_period"] = any_run["chunk_size"]
    out["n_types"] = any_run["n_types"]
    out["ll_poisson"] = float(np.mean([np.mean(r["poisson_ll"]) for r in streams.values()]))
    out["type_err_repeat_last"] = float(np.mean([np.mean(r["repeat_type_err"]) for r in streams.values()]))
    per_seed = {
        m: {k: [float(np.mean(r["hist"][m][k])) for r in streams.values()] for k in ("ll", "type_err", "rmse")}
        for m in METHODS
    }
    for m in METHODS:
        for k in ("ll", "type_err", "rmse"):
            out[f"{k}_{m}"], out[f"{k}_{m}_se"] = _mean_se(per_seed[m][k])
            out[f"{k}_{m}_per_seed"] = [round(v, 4) for v in per_seed[m][k]]
    for k in ("ll", "type_err"):
        diffs = [a - b for a, b in zip(per_seed["prompt"][k], per_seed["finetune"][k])]
        out[f"{k}_prompt_minus_finetune"], out[f"{k}_prompt_minus_finetune_se"] = _mean_se(diffs)
    out["target_met"] = bool(
        out["ll_prompt"] > out["ll_finetune"] and out["type_err_prompt"] < out["type_err_finetune"]
    )
    return out


def _stream_job(threads: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return run_stream(**kwargs)


def _failure(failed: dict[str, str], part: str, exc: BaseException) -> None:
    import traceback

    failed[part] = f"{type(exc).__name__}: {exc}"
    log(f"!! {part} failed: {failed[part]}\n{traceback.format_exc()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tpp-taobao-easytpp")
    ap.add_argument("--shift-data", type=Path, default=ROOT.parent / "shared" / "data" / "tpp-taxi-easytpp")
    ap.add_argument("--no-shift", action="store_true", help="skip the domain-shift run")
    ap.add_argument("--periods", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20, help="passes per period (chosen on dev; see the docstring)")
    ap.add_argument("--shift-seqs", type=int, default=260, help="sequences per domain in the shift run")
    ap.add_argument("--seed", type=int, default=0, help="the seed of --dev/--select runs")
    ap.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds of the default run (means with standard errors)"
    )
    ap.add_argument(
        "--budget-min",
        type=float,
        default=20.0,
        help="wall-time budget of the default run in minutes: epochs per period are cut (never raised above "
        "--epochs) so the run fits it; 0 = always --epochs",
    )
    ap.add_argument(
        "--max-seqs-per-period",
        type=int,
        default=0,
        help="learn and evaluate at most this many sequences of each period (the earliest; 0 = all)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="seeds run at once, one process each (default: cores)"
    )
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

    if args.select:
        sel = run_select(args, base_opts)
        stream = cast(dict[str, Any], sel["stream"])
        out = (
            args.out
            if args.out != ROOT / "reports" / "tpp_continual.png"
            else ROOT / "reports" / "tpp_continual_select.png"
        )
        plot(stream["hist"], {}, out)
        result = {
            "data": args.data.name,
            "epochs": args.epochs,
            **summarize_seeds({args.seed: stream}),
            "selection_grid": list(SELECT_GRID),
            "selection_dev": sel["dev"],
            "selection_dev_finetune": sel["dev_finetune"],
            "selection_epochs": sel["select_epochs"],
            "chosen": sel["chosen"],
            "plot": str(out),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        emit("tpp_continual", result)
        return
    run_default(args, base_opts, t0)


def run_default(args: argparse.Namespace, base_opts: BaseOpts, t0: float) -> None:
    """Every seed's stream, the shift run and the plot; whatever fails is named in the JSON line,
    which is printed in any case (and the exit status is then 1)."""
    failed: dict[str, str] = {}
    seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    jobs = max(1, min(args.jobs, len(seeds)))
    result: dict[str, Any] = {
        "data": args.data.name,
        "periods": args.periods,
        "eval_periods": args.periods - 1,
        "seeds": seeds,
        "jobs": jobs,
        "copy_history": args.copy_history,
        "copy_lr_scale": args.copy_lr_scale,
        "prompt_opts": args.prompt_opts,
        "max_seqs_per_period": args.max_seqs_per_period,
    }
    streams: dict[int, dict[str, Any]] = {}
    shift: dict[str, float] = {}
    try:
        if not (args.data / "train.json").is_file():
            raise FileNotFoundError(f"{args.data / 'train.json'} not found: --data is an EasyTPP folder")
        n_types = max(
            load_split(args.data, split)[2] for split in ("train", "dev") if (args.data / f"{split}.json").is_file()
        )
        epochs = args.epochs
        if args.budget_min > 0:
            shift_seqs = 0 if args.no_shift else args.shift_seqs
            epochs, budget = budget_epochs(
                args.data,
                args.periods,
                args.max_seqs_per_period,
                n_types,
                -(-len(seeds) // jobs),
                shift_seqs,
                60 * args.budget_min,
                args.epochs,
                base_opts,
                args.prompt_opts,
            )
            result.update(budget)
        result["epochs"] = epochs
        # one process per seed, `jobs` at a time (each single-threaded): the seeds are independent
        log(f"== seeds {seeds}, {jobs} at a time ==")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                seed: pool.submit(
                    _stream_job,
                    args.threads,
                    dict(
                        data=args.data,
                        periods=args.periods,
                        epochs=epochs,
                        seed=seed,
                        prompt_opts=args.prompt_opts,
                        n_types=n_types,
                        base_opts=base_opts,
                        max_seqs=args.max_seqs_per_period,
                    ),
                )
                for seed in seeds
            }
            for seed, future in futures.items():
                try:
                    streams[seed] = future.result()
                except Exception as exc:
                    _failure(failed, f"stream seed {seed}", exc)
        if not args.no_shift:
            try:
                shift = run_shift(
                    args.data, args.shift_data, args.shift_seqs, epochs, seeds[0], base_opts, args.prompt_opts
                )
            except Exception as exc:
                _failure(failed, "shift", exc)
        result.update(summarize_seeds(streams))
        if streams:
            first = streams[min(streams)]
            for m in METHODS:
                for k in ("ll", "type_err", "rmse"):
                    result[f"{k}_{m}_per_period_seed{min(streams)}"] = [round(v, 4) for v in first["hist"][m][k]]
            try:
                plot(first["hist"], shift, args.out)
                result["plot"] = str(args.out)
            except Exception as exc:
                _failure(failed, "plot", exc)
    except Exception as exc:
        _failure(failed, "setup", exc)
    result.update(shift)
    result["failed"] = failed
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    emit("tpp_continual", result)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
