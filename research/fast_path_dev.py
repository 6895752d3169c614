"""Dev-segment study for issue 20 (ML-100K events 25,000-50,000 only, learners cold at 25,000).

Not part of driftrec: it measures, in one process, what a per-event wide learner would add and how
much the evaluation protocol's lag costs, before either is built into the pipeline. Figures and
the conclusions drawn from them are in ``research/fast_path_dev.md``.

    python research/fast_path_dev.py   # ~5 min on a 2-core machine

FTRL-Proximal (McMahan et al., KDD 2013) over one-hot user, item, category and user x category,
alpha 0.5 (Vowpal Wabbit's default learning rate, the peer it is compared with), beta 1, L1 0,
L2 1. Protocols: ``window W`` scores each window of W events with a state that learned every
earlier window (the harness's); ``lag L s`` scores an event with a state that learned every
event at least L seconds older (event time: a fast path fresh within L); ``@event`` learns each
event right after scoring it.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from driftrec.contract.interaction import Interaction
from driftrec.models import metrics
from driftrec.models.baselines import VWPeer
from driftrec.models.dsl import DSLRecommender
from driftrec.streams.datasets import load_ml100k_interactions


class FTRL:
    """Per-coordinate FTRL-Proximal logistic regression; ``offset`` is a logit it learns on top of."""

    def __init__(self, alpha: float = 0.5, beta: float = 1.0, l1: float = 0.0, l2: float = 1.0) -> None:
        self.alpha, self.beta, self.l1, self.l2 = alpha, beta, l1, l2
        self.z: defaultdict[str, float] = defaultdict(float)
        self.n: defaultdict[str, float] = defaultdict(float)

    def weight(self, f: str) -> float:
        z = self.z[f]
        if abs(z) <= self.l1:
            return 0.0
        return -(z - math.copysign(self.l1, z)) / ((self.beta + math.sqrt(self.n[f])) / self.alpha + self.l2)

    @staticmethod
    def features(x: Interaction) -> list[str]:
        out = ["bias", f"u={x.user_id}", f"i={x.item_id}"]
        if x.category:
            out += [f"c={x.category}", f"uc={x.user_id}|{x.category}"]
        return out

    def logit(self, x: Interaction, offset: float = 0.0) -> float:
        return offset + sum(self.weight(f) for f in self.features(x))

    def learn_one(self, x: Interaction, offset: float = 0.0) -> None:
        g = sigmoid(self.logit(x, offset)) - float(x.label or 0)
        for f in self.features(x):
            w, n = self.weight(f), self.n[f]
            sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / self.alpha
            self.z[f] += g - sigma * w
            self.n[f] = n + g * g


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(t, 35.0), -35.0)))


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def report(name: str, labels: list[int], scores: list[float]) -> None:
    y, p = np.asarray(labels), np.asarray(scores)
    print(f"{name:34s} AUC {metrics.auc(y, p):.4f}  log-loss {metrics.logloss(y, p):.4f}", flush=True)


def windows(segment: list[Interaction], size: int) -> None:
    """The harness's count windows: DSL (micro-batched), FTRL, and FTRL on top of the DSL logit."""
    dsl, alone, on_dsl = DSLRecommender(seed=0), FTRL(), FTRL()
    ys: list[int] = []
    out: defaultdict[str, list[float]] = defaultdict(list)
    for start in range(0, len(segment), size):
        window = segment[start : start + size]
        labelled = [x for x in window if x.label is not None]
        if labelled:
            base = dsl.predict_many(labelled)
            for x, p in zip(labelled, base):
                ys.append(int(x.label or 0))
                out["dsl"].append(float(p))
                out["ftrl"].append(sigmoid(alone.logit(x)))
                out["dsl + ftrl on its logit"].append(sigmoid(on_dsl.logit(x, logit(float(p)))))
            for x, p in zip(labelled, base):
                alone.learn_one(x)
                on_dsl.learn_one(x, logit(float(p)))
        dsl.learn_many(window)
    for name, scores in out.items():
        report(f"window {size}: {name}", ys, scores)


def event_time_lag(segment: list[Interaction], lag_s: float) -> None:
    """Per-event learners that see an event only ``lag_s`` seconds (event time) after it happened
    (``lag_s`` 0: right after it, the ``@event`` reference)."""
    ftrl, vw = FTRL(), VWPeer()
    ys: list[int] = []
    pf: list[float] = []
    pv: list[float] = []
    pending: list[Interaction] = []
    for x in segment:
        if x.label is None:
            continue
        while pending and pending[0].ts <= x.ts - lag_s:
            old = pending.pop(0)
            ftrl.learn_one(old)
            vw.learn_one(old)
        ys.append(int(x.label))
        pf.append(sigmoid(ftrl.logit(x)))
        pv.append(float(vw.predict_many([x])[0]))
        pending.append(x)
    name = f"lag {lag_s:g} s" if lag_s else "@event"  # lag 0: every earlier event learned (the stream is in time order)
    report(f"{name}: ftrl", ys, pf)
    report(f"{name}: vw", ys, pv)


def main() -> None:
    segment = load_ml100k_interactions()[25_000:50_000]
    for lag in (0.0, 1.0, 60.0):
        event_time_lag(segment, lag)
    windows(segment, 25)


if __name__ == "__main__":
    main()
