"""Dev-segment study for issue 32: the LSH memory's readout, the paper's against ours.

Not part of driftrec: one process, no broker, no Redis. ML-100K events 25,000-50,000 only (the
segment set aside for choosing settings), learners cold at event 25,000. Figures and the
decision are in ``research/memory_readout_dev.md``.

    python research/memory_readout_dev.py   # ~10 min on a 2-core machine

What is served, per event, mirrors the product's fast path (``models/served.py``): the DSL's
probability (``DSLRecommender``, micro-batches of 256, scored before it learns a batch), the
fusion layer (FTRL over the ids and the DSL logit, stepped per event on what was served) and the
LSH memory's correction of ``pre`` at the weight the same layer learns. The memory is keyed as
the product keys it (``storage/served_memory.py``): a frozen copy of the DSL and its hidden
statistics, renewed every ``KEY_EVERY`` micro-batches, read with the previous copy's buckets.
Errors are written every ``WRITE_EVERY`` events (ingest's batches), after they are served.
The session memory and the TPP are left out: what changes between the arms is the readout.

The two readouts, over the same buckets (FIFO of 32 entries per bucket, 8 tables × 10 bits):

* ``count`` (driftrec's): every entry of the query's bucket in every table, each counted once
  per table it shares with the query (the SimHash collision kernel), shrunk by a prior of 1:
  ``ê = Σ c_i (y_i − ŷ(x)) / (Σ c_i + 1)`` (γ = 1).
* ``attention`` (ReLoop2's): each table's bucket read out as its means ``(h̄, ȳ, p̄)``; the
  readouts combined by a softmax over the cosine of the query's hidden vector with ``h̄`` at
  temperature τ: ``ê = Σ_k a_k (ȳ_k − ŷ(x))``, ``a = softmax(cos(h, h̄_k) / τ)`` over the tables
  whose bucket is not empty. τ = 0.1 (the paper's example). The paper stores ``Σh`` per bucket;
  this keeps the FIFO's vectors, the same thing for a bucket's mean.

Arms: no memory; ``count`` and ``attention`` at 8 tables; both again at 32 tables (the paper's
"more tables", its ablation's best K being 70-180); and ``count-8-live``, hashed as before 0.7.1
(every batch by the newest model and statistics, into one set of buckets), to see what the key
snapshot itself changes; ``count-8-cold-split``, whose memory input is a separate feature while
the user has fewer than 20 events in the segment (does the memory earn its place where the ids
have not learned yet?). Each arm has its own fusion layer, so each
learns the memory's weight from its own corrections.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings
from driftrec.models import metrics
from driftrec.models.error_memory import HiddenStandardizer, RandomProjectionLSH
from driftrec.models.served import MEMORY_FEATURE, MODEL_FEATURE, REAL_FEATURES, TermWeights, assemble
from driftrec.models.wide import FTRLParams, WideFTRL, features
from driftrec.streams.datasets import load_ml100k_interactions
from driftrec.streams.trainer import new_model

SEGMENT = (25_000, 50_000)
BATCH = 256  # the DSL's micro-batch
WRITE_EVERY = 32  # events per memory write (ingest's batches)
KEY_EVERY = 59  # micro-batches per key copy (~15,000 events: 300 s at ~50 events/s)
CAPACITY = 32
N_BITS = 10
TAU = 0.1
PRIOR = 1.0
EPS = 1e-4
COLD_FEATURE = "e_cold"  # the cold-split arm's memory input while the user has < COLD_EVENTS events
COLD_EVENTS = 20


class Buckets:
    """FIFO buckets of ``(y, p, h)`` per ``(key, table, code)``: the entries both readouts read."""

    def __init__(self, n_tables: int, dim: int) -> None:
        self.lsh = RandomProjectionLSH(dim, n_tables, N_BITS, seed=0)
        self.store: dict[tuple[int, int, int], deque[tuple[float, float, np.ndarray]]] = {}

    def write(self, key: int, hidden: np.ndarray, ys: np.ndarray, ps: np.ndarray) -> None:
        codes = self.lsh.codes(hidden)
        for row in range(hidden.shape[0]):
            for t in range(self.lsh.n_tables):
                b = self.store.setdefault((key, t, int(codes[row, t])), deque(maxlen=CAPACITY))
                b.append((float(ys[row]), float(ps[row]), hidden[row]))

    def read(self, keys: list[tuple[int, np.ndarray]]) -> list[list[tuple[deque, np.ndarray]]]:
        """Per query (one row of each key's hidden), its non-empty buckets over every key and
        table, each with the query's vector in that key's space."""
        n = keys[0][1].shape[0]
        out: list[list[tuple[deque, np.ndarray]]] = [[] for _ in range(n)]
        for key, hidden in keys:
            codes = self.lsh.codes(hidden)
            for row in range(n):
                for t in range(self.lsh.n_tables):
                    b = self.store.get((key, t, int(codes[row, t])))
                    if b:
                        out[row].append((b, hidden[row]))
        return out


Read = list[tuple[deque, np.ndarray]]


def count_readout(reads: Read, q: float) -> float:
    w = sum(len(b) for b, _ in reads)
    if w == 0:
        return 0.0
    ys = sum(y for b, _ in reads for y, _, _ in b)
    return (ys - q * w) / (w + PRIOR)


def attention_readout(reads: Read, q: float) -> float:
    if not reads:
        return 0.0
    sims, outs = [], []
    for b, h in reads:
        hbar = np.mean([e[2] for e in b], axis=0)
        denom = float(np.linalg.norm(hbar) * np.linalg.norm(h)) or 1.0
        sims.append(float(hbar @ h) / denom)
        outs.append(np.mean([e[0] for e in b]) - q)
    a = np.exp((np.array(sims) - max(sims)) / TAU)
    return float((a / a.sum()) @ np.array(outs))


class Arm:
    def __init__(
        self,
        name: str,
        params: FTRLParams,
        buckets: Buckets | None,
        readout,
        live: bool = False,
        cold_split: bool = False,
    ) -> None:
        self.name, self.buckets, self.readout = name, buckets, readout
        self.live = live  # hash with the newest model and statistics, as before 0.7.1 (spaces mix)
        self.cold_split = cold_split
        self.seen: dict[str, int] = {}
        self.ftrl = WideFTRL(params, ids=True)
        self.served: list[float] = []
        self.weights: list[float] = []
        self.last_pre = 0.5

    def serve(self, x: Interaction, base: float, reads: Read | None) -> None:
        feats = [*features(x.user_id, x.item_id, x.category), *REAL_FEATURES]
        weight = {f: self.ftrl.weight(f) for f in feats}
        # cold_split: the memory's input is its own feature while the user is cold (her ids
        # have learned little), so the layer can trust the memory there and not elsewhere
        seen = self.seen.get(x.user_id, 0)
        self.seen[x.user_id] = seen + 1
        e_feature = COLD_FEATURE if self.cold_split and seen < COLD_EVENTS else MEMORY_FEATURE
        weight[MEMORY_FEATURE] = self.ftrl.weight(e_feature)
        ids = sum(w for f, w in weight.items() if f not in REAL_FEATURES)
        memory = None
        if reads is not None:
            memory = lambda pre: np.array([self.readout(reads, float(pre[0]))])  # noqa: E731
        terms = assemble(np.array([base]), np.array([ids]), TermWeights.of(weight), EPS, memory=memory)
        served = float(terms.score[0])
        row = {e_feature: float(terms.inputs[MEMORY_FEATURE][0])}
        dsl_logit = float(terms.inputs[MODEL_FEATURE][0])
        self.ftrl.learn_one(x.user_id, x.item_id, x.category, int(x.label or 0), dsl_logit, row, prediction=served)
        self.served.append(served)
        self.weights.append(self.ftrl.weight(MEMORY_FEATURE))
        self.last_pre = float(terms.pre[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="the segment's first events only (a smoke run)")
    parser.add_argument("--key-every", type=int, default=KEY_EVERY)
    parser.add_argument("--seed", type=int, default=0, help="the DSL's seed (the spread between seeds)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    settings = Settings()
    params = FTRLParams(**settings.wide.ftrl_params())
    stream = [x for x in load_ml100k_interactions()[SEGMENT[0] : SEGMENT[1]] if x.label is not None][: args.limit]
    settings.dsl = settings.dsl.model_copy(update={"seed": args.seed})
    model = new_model(settings)
    dim = settings.dsl.hidden
    arms = [
        Arm("no-memory", params, None, None),
        Arm("count-8-live", params, Buckets(8, dim), count_readout, live=True),
        Arm("count-8", params, Buckets(8, dim), count_readout),
        Arm("attention-8", params, Buckets(8, dim), attention_readout),
        Arm("count-8-cold-split", params, Buckets(8, dim), count_readout, cold_split=True),
        Arm("count-32", params, Buckets(32, dim), count_readout),
        Arm("attention-32", params, Buckets(32, dim), attention_readout),
    ]  # each memory arm has its own buckets: what it stores is its own served pre
    keys: list[tuple[int, object, HiddenStandardizer]] = []  # (key id, frozen model, stats), newest first
    recent: deque[Interaction] = deque(maxlen=2000)
    live_stats: HiddenStandardizer | None = None
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(stream), BATCH)):
        batch = stream[start : start + BATCH]
        probs, _ = model.predict_with_hidden(batch)
        keyed = [(key, stats.transform(frozen.predict_with_hidden(batch)[1])) for key, frozen, stats in keys]
        live = [] if live_stats is None else [(0, live_stats.transform(model.predict_with_hidden(batch)[1]))]
        for lo in range(0, len(batch), WRITE_EVERY):
            rows = list(range(lo, min(lo + WRITE_EVERY, len(batch))))
            for arm in arms:
                spaces = live if arm.live else keyed
                if arm.buckets is None or not spaces:
                    for row in rows:
                        arm.serve(batch[row], float(probs[row]), None if arm.buckets is None else [])
                    continue
                reads = arm.buckets.read([(k, h[rows]) for k, h in spaces])
                pres = []
                for j, row in enumerate(rows):
                    arm.serve(batch[row], float(probs[row]), reads[j])
                    pres.append(arm.last_pre)
                ys = np.array([float(batch[row].label or 0) for row in rows])
                arm.buckets.write(spaces[0][0], spaces[0][1][rows], ys, np.array(pres))
        model.learn_many(batch)
        recent.extend(batch)
        live_stats = HiddenStandardizer.fit(model.predict_with_hidden(list(recent))[1])  # every publish's
        if b % args.key_every == 0:  # as the trainer names a published snapshot the key, with its statistics
            frozen = copy.deepcopy(model)
            stats = HiddenStandardizer.fit(frozen.predict_with_hidden(list(recent))[1])
            keys = [(b // args.key_every, frozen, stats), *keys[:1]]
        if b % 10 == 0:
            done = start + len(batch)
            print(f"{done}/{len(stream)} events, {done / (time.perf_counter() - t0):.0f} ev/s", file=sys.stderr)
    y = np.array([int(x.label or 0) for x in stream])
    out = {}
    for arm in arms:
        p = np.array(arm.served)
        out[arm.name] = {
            "auc": round(metrics.auc(y, p), 4),
            "logloss": round(metrics.logloss(y, p), 4),
            "w_e_final": round(arm.weights[-1], 3),
            "w_e_mean_last_half": round(float(np.mean(arm.weights[len(arm.weights) // 2 :])), 3),
        }
        print(arm.name, out[arm.name], file=sys.stderr)
    doc = {"segment": SEGMENT, "events": len(stream), "key_every_batches": args.key_every, "seed": args.seed}
    print(json.dumps({**doc, "arms": out}))


if __name__ == "__main__":
    main()
