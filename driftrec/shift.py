"""Injected distribution shift and the prequential (test-then-train) loop that measures it.

Why plain functions: the same shift must be replayed directly against Redis (tests, benchmark)
and later through Kafka and the worker (the lead's end-to-end test); only the transport differs,
the injection and the scoring of the shifted segment must not.

The shift: from time ``after_ts`` on, the labels of one category (an ML-100K genre) flip. A slow
gradient learner needs many steps to invert what it learned; the error memory sees the new, large
errors of that region of hidden space at once.
"""

from __future__ import annotations

import copy
import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from redis.asyncio import Redis

from driftrec.contract.interaction import Interaction
from driftrec.models import metrics
from driftrec.models.error_memory import (
    DEFAULT_EPS,
    DEFAULT_GAMMA,
    DEFAULT_LAMBDA,
    DEFAULT_PRIOR,
    ErrorSums,
    HiddenPredictor,
    RandomProjectionLSH,
    compensate,
)
from driftrec.models.served import (
    MEMORY_FEATURE,
    MODEL_FEATURE,
    SESSION_FEATURE,
    TermWeights,
    assemble,
    logit,
    sigmoid,
)
from driftrec.models.wide import WideFTRL
from driftrec.storage.client import mget
from driftrec.storage.error_memory import (
    BucketNames,
    MemoryKeys,
    plan_buckets,
    plan_session_buckets,
    sums_from_values,
    write_errors,
    write_session_errors,
)


class ServedLearner(HiddenPredictor, Protocol):
    """A base model the harness can serve (probability + hidden layer) and then train."""

    def learn_many(self, interactions: Sequence[Interaction]) -> Any: ...


@dataclass(frozen=True)
class GenreFlip:
    category: str
    after_ts: float


def pick_genre_flip(interactions: Sequence[Interaction], at_fraction: float = 0.5) -> GenreFlip:
    """The most frequent category, flipped from the event at ``at_fraction`` of the stream on."""
    counts = Counter(x.category for x in interactions if x.category is not None)
    category = counts.most_common(1)[0][0]
    ts = sorted(x.ts for x in interactions)
    return GenreFlip(category=category, after_ts=ts[min(int(len(ts) * at_fraction), len(ts) - 1)])


def inject_genre_flip(interactions: Sequence[Interaction], flip: GenreFlip) -> list[Interaction]:
    """Copy of the stream with ``label → 1 − label`` for the flipped category after the flip time."""
    return [
        replace(x, label=1 - x.label)
        if x.label is not None and x.category == flip.category and x.ts >= flip.after_ts
        else x
        for x in interactions
    ]


def shifted_mask(interactions: Sequence[Interaction], flip: GenreFlip, horizon_events: int | None = None) -> np.ndarray:
    """Events of the flipped category after the flip, limited to the first ``horizon_events``
    stream events after the flip: the window in which fast adaptation must show."""
    ts = np.array([x.ts for x in interactions])
    cat = np.array([x.category == flip.category for x in interactions])
    after = ts >= flip.after_ts
    if horizon_events is not None and after.any():
        first = int(np.argmax(after))
        window = np.zeros(len(ts), dtype=bool)
        window[first : first + horizon_events] = True
        after &= window
    return after & cat


@dataclass
class PrequentialTrace:
    """Per-event record of a test-then-train run (labelled events only)."""

    y: list[int] = field(default_factory=list)
    p_base: list[float] = field(default_factory=list)
    p_memory: list[float] = field(default_factory=list)
    write_s: float = 0.0
    read_s: float = 0.0
    learn_s: float = 0.0
    written: int = 0
    memory_weight: list[float] = field(default_factory=list)  # the learned weight after each batch
    session_weight: list[float] = field(default_factory=list)  # the session memory's (session_capacity)
    # the served score without the LSH memory's part, and without the session memory's (fusion only)
    p_no_lsh: list[float] = field(default_factory=list)
    p_no_session: list[float] = field(default_factory=list)
    key_versions: list[MemoryKeys] = field(default_factory=list)  # the key snapshots' buckets (key_every)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array(self.y), np.array(self.p_base), np.array(self.p_memory)


async def prequential_with_memory(
    redis: Redis,
    keys: MemoryKeys,
    lsh: RandomProjectionLSH,
    model: ServedLearner,
    interactions: Sequence[Interaction],
    *,
    batch_size: int = 256,
    capacity: int = 32,
    ttl_s: int = 0,
    lam: float = DEFAULT_LAMBDA,
    gamma: float = DEFAULT_GAMMA,
    prior: float = DEFAULT_PRIOR,
    half_life_s: float = 0.0,
    eps: float = DEFAULT_EPS,
    write_from: int = 0,
    progress: Callable[[int, PrequentialTrace], None] | None = None,
    fusion: WideFTRL | None = None,
    key_every: int = 0,
    session_capacity: int = 0,
    session_gamma: float = 0.0,
) -> PrequentialTrace:
    """Score each micro-batch with the served state (model + memory), then write its errors, then
    let the model learn it. ``model`` needs ``predict_with_hidden`` and ``learn_many``.
    ``write_from`` skips memory writes (not scoring) for the first events, to save time where a
    caller only evaluates a later segment.

    ``fusion``: serve as the product does (``models/served.py``) -- the memory's weight and the
    weight on the model's logit learned per event by this FTRL (ids off), the memory holding the
    errors of the score served before its correction -- instead of a fixed ``lam``. ``p_base`` is
    then that score before the memory, ``p_memory`` the served one.

    ``key_every``: key the memory as the product does (``storage/served_memory.py``): by a frozen
    copy of ``model`` taken every ``key_every`` batches, reading the current and the previous
    copy's buckets (each hashed by its own copy) and writing the current one's; the keys it used
    are ``trace.key_versions`` (under ``keys.prefix``, space ``k``). 0 hashes every batch with
    the live model, which mixes hidden spaces as the model learns.

    ``session_capacity`` (with ``fusion``): the session memory too, in ``keys``' session buckets,
    with its own learned weight; ``p_no_lsh`` / ``p_no_session`` are the served score less each
    memory's part (the leave-one-out the evaluation reports), so the two are measured apart."""
    trace = PrequentialTrace()
    keyers: list[_Keyer] = []
    live = _Keyer(model, BucketNames(keys, lsh))
    for batch_no, start in enumerate(range(0, len(interactions), batch_size)):
        batch = [x for x in interactions[start : start + batch_size] if x.label is not None]
        if not batch:
            continue
        if key_every <= 0:  # hash with the live model: every batch in another space
            keyers = [live]
        elif batch_no % key_every == 0 or not keyers:  # a frozen copy keys the next key_every batches
            k = len(trace.key_versions) + 1
            names = BucketNames(replace(keys, space="k", version=k), _lsh_version(lsh, k))
            keyers = [_Keyer(copy.deepcopy(model), names), *keyers[:1]]
            trace.key_versions.append(names.keys)
        probs, own_hidden = model.predict_with_hidden(batch)
        t0 = time.perf_counter()
        zeros = np.zeros(len(batch))
        weights = (
            None
            if fusion is None
            else TermWeights.of({f: fusion.weight(f) for f in (MODEL_FEATURE, MEMORY_FEATURE, SESSION_FEATURE)})
        )
        pre = probs if weights is None else assemble(probs, zeros, weights, eps).pre  # what the memory corrects
        hidden = [own_hidden if keyer.model is model else keyer.model.predict_with_hidden(batch)[1] for keyer in keyers]
        sums = [
            sums_from_values(
                await mget(redis, plan.names), plan, gamma=gamma, prior=prior, half_life_s=half_life_s, now=batch[0].ts
            )
            for plan in (plan_buckets(keyer.names, h) for keyer, h in zip(keyers, hidden))
        ]
        e_hat = functools.reduce(ErrorSums.plus, sums).estimate(pre)
        session = fusion is not None and session_capacity > 0
        c_hat = None
        if session:
            splan = plan_session_buckets(keys, [(x.user_id, x.category) for x in batch])
            ssums = sums_from_values(await mget(redis, splan.names), splan, gamma=session_gamma, prior=prior)
            c_hat = ssums.estimate(pre)
        terms = (
            None
            if weights is None
            else assemble(
                probs, zeros, weights, eps, memory=_known(e_hat), session=None if c_hat is None else _known(c_hat)
            )
        )
        served = compensate(probs, e_hat, lam, eps) if terms is None else terms.score
        if terms is not None and weights is not None:
            logit_served = logit(served, eps)
            trace.p_no_lsh.extend(sigmoid(logit_served - weights.memory * terms.inputs[MEMORY_FEATURE]).tolist())
            trace.p_no_session.extend(sigmoid(logit_served - weights.session * terms.inputs[SESSION_FEATURE]).tolist())
        t1 = time.perf_counter()
        if start + batch_size > write_from:
            names = keyers[0].names
            trace.written += await write_errors(
                redis, names.keys, names.lsh, batch, pre, hidden[0], capacity=capacity, ttl_s=ttl_s
            )
            if session:
                trace.written += await write_session_errors(redis, keys, batch, pre, capacity=session_capacity)
        t2 = time.perf_counter()
        if fusion is not None and terms is not None:
            inputs = zip(
                batch, terms.inputs[MODEL_FEATURE], terms.inputs[MEMORY_FEATURE], terms.inputs[SESSION_FEATURE]
            )
            for x, lb, e, c in inputs:
                row = {MEMORY_FEATURE: float(e), SESSION_FEATURE: float(c)} if session else {MEMORY_FEATURE: float(e)}
                fusion.learn_one(x.user_id, x.item_id, None, int(x.label or 0), float(lb), row)
            trace.memory_weight.append(fusion.weight(MEMORY_FEATURE))
            trace.session_weight.append(fusion.weight(SESSION_FEATURE))
        model.learn_many(batch)
        t3 = time.perf_counter()
        trace.read_s += t1 - t0
        trace.write_s += t2 - t1
        trace.learn_s += t3 - t2
        trace.y.extend(int(x.label or 0) for x in batch)  # the batch holds labelled events only
        trace.p_base.extend(pre.tolist())
        trace.p_memory.extend(served.tolist())
        if progress is not None:
            progress(start + len(batch), trace)
    return trace


@dataclass(frozen=True)
class _Keyer:
    """A model whose hidden space keys buckets ``names``."""

    model: HiddenPredictor
    names: BucketNames


def _lsh_version(lsh: RandomProjectionLSH, version: int) -> RandomProjectionLSH:
    return RandomProjectionLSH(lsh.dim, lsh.n_tables, lsh.n_bits, seed=lsh.seed, version=version)


def _known(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """An estimate already read for the served ``pre`` (the query it was read with)."""
    return lambda _pre: values


def segment_metrics(y: np.ndarray, p_base: np.ndarray, p_memory: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {
        "n": int(mask.sum()),
        "logloss_base": metrics.logloss(y[mask], p_base[mask]),
        "logloss_memory": metrics.logloss(y[mask], p_memory[mask]),
        "auc_base": metrics.auc(y[mask], p_base[mask]),
        "auc_memory": metrics.auc(y[mask], p_memory[mask]),
    }
