"""Mask machinery for Dynamic Sparse Learning (DSL, Wang et al., WSDM 2024, arXiv:2402.02855).

DSL never trains a dense model: every masked tensor starts at the target density with a random
mask, and the number of active weights stays exactly constant from the first step to the served
snapshot. Every ``ΔT`` optimiser steps a fraction ``p(t)`` of the active weights with the smallest
magnitude is pruned and the same number of inactive weights with the largest magnitude of the
*dense* gradient of the current batch is grown (the paper's "regret" step: a weight pruned earlier
can come back); grown weights start at zero. ``p(t)`` is cosine-annealed so exploration calms
down as training converges.

What was verified against the authors' code (github.com/shuyao-wang/DSL, ``utils/core.py`` and
``LightGCN/main.py``; the paper's own text and tables could not be retrieved beyond the abstract
with the tools available here, so the numbers below are the code's defaults):

* schedule: ``CosineAnnealingLR`` from ``update_ratio = 0.5`` down to ``eta_min = 0.005`` over the
  total number of training iterations, stepped once per iteration; ``ΔT`` (``update_interval``)
  is 3000 iterations for LightGCN, 2000 for NeuMF, 100 for MultVAE;
* prune by weight magnitude (``death='magnitude'``), grow by the current dense gradient magnitude
  (``growth='gradient'``), no redistribution heuristic (``redistribution='none'``);
* masks initialised uniformly at random at the density (``sparse_init='uniform'``);
* the authors prune/grow *per parameter tensor*. In their LightGCN, users and items live in one
  embedding table, so density flows freely between user and item rows (and between frequent and
  rare rows) while each tensor keeps its own count.

Deviations, with reasons:

* **Groups instead of "per tensor".** ``SparseParameterSet`` compares significance globally within
  a *group* of tensors. Putting the user, item and category tables in one group reproduces the
  authors' single-table LightGCN exactly (we keep separate tables because hashed ids need their
  own salts), and lets density flow between tables. Head weight matrices get a group each, like
  the authors' per-layer behaviour, because their magnitudes live on another scale than
  embeddings and a global comparison would starve the small head.
* **Exact counts.** The authors' Bernoulli init and threshold pruning make the active count drift
  by a few weights; we initialise with an exact random permutation and use ``topk`` so the active
  count is *exactly* constant (a contract the tests check).
* **Ties in growth.** Inactive weights the batch did not touch have gradient 0; ties among them
  are broken uniformly at random rather than by memory order, so growth beyond the batch's rows
  is unbiased.
* **Optimiser state.** Gradients are masked before the optimiser step, so Adam moments of
  inactive weights stay zero and inactive weights never move; on prune/grow the moments of every
  changed position are zeroed (the authors only reset SGD momentum buffers).
* **Caller-made initial masks** (``mask_init``): the paper draws masks uniformly, and so does
  the online model. The offline Gowalla benchmark starts from data-driven masks of its own
  (``benchmarks/sparse_mf.py``), drawn from the set's generator; options that lost on its
  validation split are recorded in ``research/README.md``.
* **Online, unbounded streams.** ``cosine_update_fraction`` holds ``p(t)`` at the floor after
  ``total_steps`` (``CosineAnnealingLR`` would start climbing again), so a long-lived online model
  keeps a small, steady amount of exploration, which also helps it follow drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_INITIAL_FRACTION = 0.5
DEFAULT_FLOOR_FRACTION = 0.005

# (tensor name, parameter, exact active count, the set's generator) -> initial mask, or None for
# the paper's uniform random mask. A caller's own initialisation (e.g. a benchmark's data-driven
# masks) draws from the set's generator so a run is reproducible from one seed.
MaskInit = Callable[[str, torch.nn.Parameter, int, torch.Generator], "torch.Tensor | None"]


def cosine_update_fraction(
    step: int,
    total_steps: int,
    initial: float = DEFAULT_INITIAL_FRACTION,
    floor: float = DEFAULT_FLOOR_FRACTION,
) -> float:
    """Prune/grow fraction p(t): cosine annealing from ``initial`` to ``floor``, then flat.

    Large early updates let the random initial mask be reshaped quickly; small late ones avoid
    throwing away weights that are nearly trained.
    """
    if total_steps <= 0 or step >= total_steps:
        return floor
    cos = 0.5 * (1.0 + math.cos(math.pi * max(step, 0) / total_steps))
    return floor + (initial - floor) * cos


@dataclass(frozen=True, slots=True)
class DSLSchedule:
    """When to explore (every ``prune_every`` steps) and how much (cosine-annealed fraction)."""

    prune_every: int = 100
    total_steps: int = 10_000
    initial_fraction: float = DEFAULT_INITIAL_FRACTION
    floor_fraction: float = DEFAULT_FLOOR_FRACTION

    def due(self, step: int) -> bool:
        return self.prune_every > 0 and step > 0 and step % self.prune_every == 0

    def fraction(self, step: int) -> float:
        return cosine_update_fraction(step, self.total_steps, self.initial_fraction, self.floor_fraction)


@dataclass(slots=True)
class PruneGrowReport:
    """What one exploration step changed; ``active_per_tensor`` shows density flowing between tensors."""

    fraction: float
    n_pruned: int = 0
    n_grown: int = 0
    active_per_tensor: dict[str, int] = field(default_factory=dict)


class SparseParameterSet:
    """Binary masks at a fixed active count over several tensors, with DSL prune-and-grow.

    Invariants (tested): inactive weights are exactly zero and never change between explorations;
    the number of active weights per group never changes; newly grown weights start at zero.
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        density: float | Mapping[str, float],
        groups: Mapping[str, str] | None = None,
        seed: int = 0,
        protect_grown: bool = False,
        mask_init: MaskInit | None = None,
    ) -> None:
        # protect_grown: weights grown in the last exploration cannot be pruned in the next one
        # (RigL-style grace period; they start at zero, so magnitude pruning would remove them
        # before they had any chance to train when explorations are close together).
        self.protect_grown = protect_grown
        self._recent: dict[str, torch.Tensor] = {}
        self.touched_rows: dict[str, torch.Tensor] = {}  # rows the stream has touched (grow_touched_rows)
        self.params: dict[str, torch.nn.Parameter] = dict(params)
        self.groups: dict[str, str] = {name: (groups or {}).get(name, "global") for name in self.params}
        self._gen = torch.Generator().manual_seed(seed)
        self.masks: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            d = float(density[name] if isinstance(density, Mapping) else density)
            if not 0.0 < d <= 1.0:
                raise ValueError(f"density for {name} must be in (0, 1], got {d}")
            n = p.numel()
            n_active = max(1, min(n, round(d * n)))
            given = mask_init(name, p, n_active, self._gen) if mask_init is not None else None
            if given is not None:
                if given.shape != p.shape or int(given.sum()) != n_active:
                    raise ValueError(
                        f"mask_init gave {name} a mask of shape {tuple(given.shape)} with "
                        f"{int(given.sum())} active, expected {tuple(p.shape)} with {n_active}"
                    )
                self.masks[name] = given.to(torch.bool)
                continue
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=self._gen)[:n_active]] = True
            self.masks[name] = mask.view_as(p)
        # Counts never change, so a set that starts dense stays dense: skip its mask arithmetic.
        self._dense = all(bool(m.all()) for m in self.masks.values())
        self.apply_masks()

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def n_active(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def n_total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def active_per_tensor(self) -> dict[str, int]:
        return {name: int(m.sum()) for name, m in self.masks.items()}

    @property
    def is_dense(self) -> bool:
        return self._dense

    # ---- per-step hygiene ----------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self, rows_only: Mapping[str, torch.Tensor] | None = None) -> None:
        """Zero inactive weights (only in ``rows_only[name]`` rows when given: the rows a sparse
        gradient touched, which are the only ones an optimiser step can have changed)."""
        if self._dense:
            return
        for name, p in self.params.items():
            if rows_only is not None and name in rows_only:
                rows = rows_only[name]
                p[rows] = p[rows] * self.masks[name][rows]
            else:
                p.mul_(self.masks[name])

    @torch.no_grad()
    def mask_gradients(self) -> dict[str, torch.Tensor]:
        """Zero inactive gradients so neither weights nor optimiser moments of inactive entries move.

        Row-sparse gradients (``F.embedding(..., sparse=True)``) are coalesced and masked row-wise;
        returns the touched rows of each sparse gradient.
        """
        touched: dict[str, torch.Tensor] = {}
        if self._dense:
            return touched
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce()
                rows = g.indices()[0]
                p.grad = torch.sparse_coo_tensor(
                    g.indices(), g.values() * self.masks[name][rows], g.shape, is_coalesced=True, check_invariants=False
                )
                touched[name] = rows
            else:
                g.mul_(self.masks[name])
        return touched

    def dense_gradients(self) -> dict[str, torch.Tensor]:
        """Full gradients (inactive entries included) for growth; call before masking.

        For an embedding table the dense gradient is nonzero only on the batch's rows, so a
        row-sparse gradient densified here is exactly the paper's dense gradient.
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                out[name] = torch.zeros_like(p)
            elif g.is_sparse:
                out[name] = g.to_dense()
            else:
                out[name] = g.detach().clone()
        return out

    def step(
        self,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        schedule: DSLSchedule,
        step: int,
    ) -> PruneGrowReport | None:
        """One training step after ``loss.backward()``: mask, update, and explore when due.

        ``step`` is the 1-based count of optimiser steps including this one.
        """
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        explore = schedule.due(step) and not self.is_dense
        dense = self.dense_gradients() if explore else None
        touched = self.mask_gradients()
        for opt in opts:
            opt.step()
        self.apply_masks(rows_only=touched)
        if dense is None:
            return None
        return self.prune_and_grow(dense, schedule.fraction(step), opts)

    # ---- exploration ---------------------------------------------------------------------------
    @torch.no_grad()
    def prune_and_grow(
        self,
        dense_grads: Mapping[str, torch.Tensor],
        fraction: float,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> PruneGrowReport:
        """Prune the ``fraction`` least-magnitude active weights per group, regrow as many by |grad|.

        Comparison is global inside each group, so a group's fixed budget moves to the tensors and
        rows whose weights matter (magnitude) or would matter (gradient).
        """
        report = PruneGrowReport(fraction=fraction)
        opts = _optimizer_list(optimizer)
        for names in self._group_members():
            pruned, grown = self._explore_group(names, dense_grads, fraction, opts)
            report.n_pruned += pruned
            report.n_grown += grown
        report.active_per_tensor = self.active_per_tensor()
        return report

    def _explore_group(
        self,
        names: list[str],
        dense_grads: Mapping[str, torch.Tensor],
        fraction: float,
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> tuple[int, int]:
        masks = torch.cat([self.masks[n].reshape(-1) for n in names])
        n_active = int(masks.sum())
        k = min(int(math.ceil(fraction * n_active)), n_active)
        protected = None
        if self.protect_grown and all(n in self._recent for n in names):
            protected = torch.cat([self._recent[n].reshape(-1) for n in names]) & masks
            k = min(k, n_active - int(protected.sum()))
        if k <= 0 or n_active == masks.numel():
            return 0, 0
        weights = torch.cat([self.params[n].detach().reshape(-1) for n in names]).abs()
        grads = torch.cat([dense_grads[n].reshape(-1) for n in names]).abs()

        # Prune: k smallest magnitudes among active entries (not the just-grown ones if protected).
        prunable = masks if protected is None else masks & ~protected
        prune_score = torch.where(prunable, weights, torch.full_like(weights, math.inf))
        pruned_idx = torch.topk(prune_score, k, largest=False).indices
        new_masks = masks.clone()
        new_masks[pruned_idx] = False

        # Grow: k largest |dense grad| among inactive entries (just-pruned ones may come back).
        # Untouched entries (grad == 0) get a negative random score: below any real gradient,
        # and in random order among themselves.
        tie_break = -torch.rand(grads.shape, generator=self._gen, dtype=grads.dtype)
        grow_score = torch.where(grads > 0, grads, tie_break)
        grow_score = torch.where(new_masks, torch.full_like(grow_score, -math.inf), grow_score)
        grown_idx = torch.topk(grow_score, k, largest=True).indices
        new_masks[grown_idx] = True

        return self._apply(names, masks, new_masks, optimizers)

    @torch.no_grad()
    def grow_touched_rows(
        self,
        touched: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> tuple[int, int]:
        """Activate every weight of the rows a batch touched; prune as many elsewhere in the group.

        Why: online, a uniform random initial mask spreads the budget over every row of a hashed
        table, most of which the stream never uses, and a used row can only learn in the few
        weights it happened to draw until an exploration reassigns the budget. Growing a row when
        the stream touches it (at zero, like any grown weight) keeps the active count exact and
        moves the budget to live rows at once. Donors are active weights of rows the stream has
        *never* touched, drawn at random: they never received a gradient, so their magnitudes are
        initialisation noise and the paper's magnitude order among them carries no information
        (and a random draw avoids a full-table ``topk`` per batch). Only when no such row is left
        does it fall back to the smallest-magnitude weights outside the batch's rows. ``touched``
        maps a 2-D tensor's name to the batch's row indices; ``self.touched_rows`` remembers them
        (snapshots must keep it). Returns ``(pruned, grown)``.
        """
        opts = _optimizer_list(optimizer)
        pruned = grown = 0
        for names in self._group_members():
            grow: dict[str, torch.Tensor] = {}
            for n in names:
                if n not in touched:
                    continue
                seen = self.touched_rows.setdefault(n, torch.zeros(self.params[n].shape[0], dtype=torch.bool))
                rows = torch.unique(touched[n])
                seen[rows] = True
                cols = self.params[n].shape[1]
                flat = (rows[:, None] * cols + torch.arange(cols)).reshape(-1)
                off = flat[~self.masks[n].reshape(-1)[flat]]
                if off.numel():
                    grow[n] = off
            k = sum(int(v.numel()) for v in grow.values())
            if k == 0:
                continue
            donors = self._untouched_donors(names, k)
            short = k - sum(int(v.numel()) for v in donors.values())
            if short > 0:  # no untouched rows left: smallest magnitudes outside the touched rows
                extra = self._smallest_outside(names, grow, donors, short)
                for n, idx in extra.items():
                    donors[n] = torch.cat([donors[n], idx]) if n in donors else idx
                available = sum(int(v.numel()) for v in donors.values())
                if available < k:  # the budget cannot cover every touched row: grow a random subset
                    grow = self._random_subset(grow, available)
            for n in names:
                on, off = grow.get(n), donors.get(n)
                if on is None and off is None:
                    continue
                self._set(n, on, off, opts)
                grown += 0 if on is None else int(on.numel())
                pruned += 0 if off is None else int(off.numel())
        return pruned, grown

    def _group_members(self) -> list[list[str]]:
        """Tensor names per group, in declaration order."""
        by_group: dict[str, list[str]] = {}
        for name, g in self.groups.items():
            by_group.setdefault(g, []).append(name)
        return list(by_group.values())

    def _random_subset(self, positions: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """``k`` of the flat positions (per tensor name), drawn uniformly across tensors."""
        names = list(positions)
        sizes = torch.tensor([0, *(positions[n].numel() for n in names)]).cumsum(0)
        keep = torch.randperm(int(sizes[-1]), generator=self._gen)[:k]
        out = {
            n: positions[n][keep[(keep >= sizes[j]) & (keep < sizes[j + 1])] - sizes[j]] for j, n in enumerate(names)
        }
        return {n: v for n, v in out.items() if v.numel()}

    def _untouched_donors(self, names: list[str], k: int, rounds: int = 8) -> dict[str, torch.Tensor]:
        """Up to ``k`` distinct active positions in rows never touched, drawn uniformly."""
        sizes = [self.params[n].numel() for n in names]
        total = sum(sizes)
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        found = torch.zeros(0, dtype=torch.long)
        for _ in range(rounds):
            draw = torch.randint(total, (max(4 * (k - found.numel()), 1024),), generator=self._gen)
            ok = torch.zeros(draw.numel(), dtype=torch.bool)
            for j, n in enumerate(names):
                inside = (draw >= offsets[j]) & (draw < offsets[j + 1])
                local = draw[inside] - offsets[j]
                cols = self.params[n].shape[1]
                seen = self.touched_rows.get(n)
                good = self.masks[n].reshape(-1)[local]
                if seen is not None:
                    good &= ~seen[local // cols]
                ok[inside] = good
            found = torch.unique(torch.cat([found, draw[ok]]))
            if found.numel() >= k:
                found = found[torch.randperm(found.numel(), generator=self._gen)[:k]]
                break
        out: dict[str, torch.Tensor] = {}
        for j, n in enumerate(names):
            idx = found[(found >= offsets[j]) & (found < offsets[j + 1])] - offsets[j]
            if idx.numel():
                out[n] = idx
        return out

    def _smallest_outside(
        self, names: list[str], grow: Mapping[str, torch.Tensor], taken: Mapping[str, torch.Tensor], k: int
    ) -> dict[str, torch.Tensor]:
        """The ``k`` smallest-magnitude active weights outside the rows being grown."""
        scores = []
        for n in names:
            p = self.params[n]
            sc = torch.where(self.masks[n], p.detach().abs(), torch.full_like(p, math.inf)).reshape(-1)
            if n in grow:
                cols = p.shape[1]
                rows = torch.unique(grow[n] // cols)
                sc[(rows[:, None] * cols + torch.arange(cols)).reshape(-1)] = math.inf
            if n in taken:
                sc[taken[n]] = math.inf
            scores.append(sc)
        flat = torch.cat(scores)
        k = min(k, int(torch.isfinite(flat).sum()))
        if k <= 0:
            return {}
        idx = torch.topk(flat, k, largest=False).indices
        sizes = torch.tensor([0, *[self.params[n].numel() for n in names]]).cumsum(0)
        return {
            n: idx[(idx >= sizes[j]) & (idx < sizes[j + 1])] - sizes[j]
            for j, n in enumerate(names)
            if bool(((idx >= sizes[j]) & (idx < sizes[j + 1])).any())
        }

    def _set(
        self, name: str, on: torch.Tensor | None, off: torch.Tensor | None, optimizers: Sequence[torch.optim.Optimizer]
    ) -> None:
        """Switch flat positions of one tensor on (at zero) / off, resetting their optimiser moments."""
        p = self.params[name]
        mask = self.masks[name].reshape(-1)
        data = p.data.reshape(-1)
        changed = torch.cat([t for t in (on, off) if t is not None])
        if on is not None:
            mask[on] = True
        if off is not None:
            mask[off] = False
        data[changed] = 0.0  # grown weights start at zero, pruned ones leave
        for opt in optimizers:
            for value in opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.reshape(-1)[changed] = 0.0

    def _apply(
        self,
        names: list[str],
        masks: torch.Tensor,
        new_masks: torch.Tensor,
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> tuple[int, int]:
        """Install a group's new masks: grown weights start at zero, pruned ones leave, and the
        optimiser moments of every changed position are reset."""
        newly_on = new_masks & ~masks
        turned_off = masks & ~new_masks
        changed = newly_on | turned_off
        offset = 0
        for n in names:
            p = self.params[n]
            size = p.numel()
            m_new = new_masks[offset : offset + size].view_as(p)
            ch = changed[offset : offset + size].view_as(p)
            on = newly_on[offset : offset + size].view_as(p)
            offset += size
            self.masks[n] = m_new.clone()
            if self.protect_grown:
                self._recent[n] = on.clone()
            p.data.masked_fill_(on, 0.0)  # grown weights start at zero
            p.data.mul_(self.masks[n])  # pruned weights leave
            for opt in optimizers:
                for value in opt.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        value.masked_fill_(ch, 0.0)
        return int(turned_off.sum()), int(newly_on.sum())


def _optimizer_list(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)


def _row_gradient(p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, their gradient rows) of ``p.grad``, sparse or dense."""
    g = p.grad
    if g is None:
        raise ValueError("the parameter has no gradient (call backward first)")
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0], g.values()
    return torch.arange(p.shape[0]), g


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Element-wise square root by numpy: correctly rounded, and on CPU ~20x faster than
    ``torch.sqrt`` on the zeros that fill a sparse table's moments (the second moment of every
    inactive weight is exactly 0, and torch 2.x takes a slow path for them)."""
    if t.device.type != "cpu":
        return t.sqrt()
    return torch.from_numpy(np.sqrt(t.numpy()))


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for row-sparse embedding gradients: a step touches only the batch's rows.

    ``torch.optim.SparseAdam`` does the same maths but was ~2x slower per step here (it rebuilds
    sparse tensors for every moment); serving an online stream on shared CPUs makes that matter.
    State ``exp_avg``/``exp_avg_sq`` is table-shaped so ``prune_and_grow`` can zero the moments of
    changed entries like any other optimiser's. Dense gradients are accepted too.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: one lazy step per batch
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                rows, gv = _row_gradient(p)
                m = state["exp_avg"][rows].mul_(b1).add_(gv, alpha=1 - b1)
                v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(gv, gv, value=1 - b2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                p[rows] = p[rows] - step_size * m / (_sqrt(v) + eps)


class RowAdagrad(torch.optim.Optimizer):
    """Lazy Adagrad for row-sparse gradients (the classic per-coordinate online learner).

    Why beside :class:`RowAdam`: a first-order weight (a user's or item's bias) must move fast on
    the user's first few events and settle as evidence piles up. Adam's step is ~``lr`` whatever
    the evidence, so a bias trained with the embeddings' small ``lr`` needs dozens of micro-batches
    to learn a user's leniency; Adagrad's ``lr / sqrt(Σ g²)`` takes a large first step and
    anneals per row (as FTRL / Vowpal Wabbit do for their linear terms). State ``sum_sq`` is
    table-shaped, so prune-and-grow resets it for changed entries like any other moment.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: one lazy step per batch
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum_sq"] = torch.zeros_like(p)
                rows, gv = _row_gradient(p)
                s = state["sum_sq"][rows].addcmul_(gv, gv)
                state["sum_sq"][rows] = s
                p[rows] = p[rows] - lr * gv / (_sqrt(s) + eps)
