"""``SparseMF``: the DSL paper's offline setting (implicit-feedback MF, full-ranking Recall@20) for
``benchmarks/dsl.py``; not part of the served product, which trains ``models.dsl.DSLRecommender``.

User and item tables share one DSL budget (one global group), as the authors' LightGCN keeps
users and items in one table. Density 1.0 gives the dense baseline trained by exactly the same
code path. The training loss is BPR (the paper's) or a sampled softmax over per-positive uniform
negatives; lr is cosine-decayed to ``lr_floor`` as in the authors' runs.

Mask initialisation (``init``): ``"random"`` is the paper's; ``"aligned"`` starts every row of a
table on the same columns (``_aligned_mask``), and with ``row_groups`` (a co-clustering of users
and items, ranked: a row's nearest groups first) each group also gets its own block of columns
beside ``shared_columns`` common ones (``_grouped_mask``). The options that lost on the
benchmark's validation split (mixing, history, user_share, shared negatives, row weights,
window growth, hierarchical groups, other co-clusterings) are listed in ``research/README.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix

from driftrec.models.dsl import CSRTable, SparseTable, sparse_table
from driftrec.models.sparse import (
    DEFAULT_FLOOR_FRACTION,
    DEFAULT_INITIAL_FRACTION,
    DSLSchedule,
    MaskInit,
    PruneGrowReport,
    RowAdam,
    SparseParameterSet,
)


class SparseMF:
    """MF whose user and item tables share one DSL budget (see the module docstring)."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        density: float = 1.0,
        lr: float = 1e-2,
        reg: float = 1e-4,
        batch_size: int = 2048,
        prune_every: int = 100,
        total_steps: int = 10_000,
        seed: int = 0,
        lr_floor: float = 1e-4,
        initial_fraction: float = DEFAULT_INITIAL_FRACTION,
        floor_fraction: float = DEFAULT_FLOOR_FRACTION,
        protect_grown: bool = False,
        init: str = "random",
        row_groups: tuple[np.ndarray, np.ndarray] | None = None,
        shared_columns: int = 0,
        group_block: int | None = None,
        loss: str = "bpr",
        n_negatives: int = 1,
    ) -> None:
        if loss not in ("bpr", "softmax") or n_negatives < 1:
            raise ValueError("loss must be 'bpr' or 'softmax', with n_negatives >= 1")
        if init not in ("random", "aligned"):
            raise ValueError("init must be 'random' (the paper) or 'aligned'")
        self.loss, self.n_negatives = loss, n_negatives
        torch.manual_seed(seed)
        self.lr, self.lr_floor, self.total_steps = lr, lr_floor, total_steps
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.reg, self.batch_size = reg, batch_size
        self.user = torch.nn.Parameter(torch.randn(n_users, dim) * 0.1)
        self.item = torch.nn.Parameter(torch.randn(n_items, dim) * 0.1)
        # Row-sparse gradients + lazy row Adam: a step costs O(batch rows), not O(table); the
        # dense gradient DSL grows from is recovered exactly at exploration steps (see sparse.py).
        self.opt = RowAdam([self.user, self.item], lr=lr)
        groups = (
            None
            if row_groups is None
            else {"user": torch.as_tensor(row_groups[0]), "item": torch.as_tensor(row_groups[1])}
        )
        mask_init = aligned_masks(groups, shared_columns, group_block) if init == "aligned" else None
        self.masks = SparseParameterSet(
            {"user": self.user, "item": self.item}, density, seed=seed, protect_grown=protect_grown, mask_init=mask_init
        )
        self.schedule = DSLSchedule(
            prune_every=prune_every,
            total_steps=total_steps,
            initial_fraction=initial_fraction,
            floor_fraction=floor_fraction,
        )
        self.step = 0
        self._rng = np.random.default_rng(seed)
        self.last_report: PruneGrowReport | None = None

    @property
    def n_active_params(self) -> int:
        return self.masks.n_active

    @property
    def n_total_params(self) -> int:
        return self.masks.n_total

    def fit_epoch(
        self,
        users: np.ndarray,
        items: np.ndarray,
        positive_keys: np.ndarray | None = None,
        log: Callable[[str], None] | None = None,
    ) -> float:
        """One shuffled pass over (user, item) pairs (BPR or sampled softmax); returns the mean loss.

        ``positive_keys`` (sorted ``user * n_items + item``) lets negatives that are actually
        positives be resampled once, like LightGCN's sampler; without it negatives are uniform.
        """
        order = self._rng.permutation(len(users))
        u_all, i_all = users[order], items[order]
        k = self.n_negatives
        j_all = self._rng.integers(0, self.n_items, (len(users), k))
        if positive_keys is not None:
            hit = _is_member(u_all.astype(np.int64)[:, None] * self.n_items + j_all, positive_keys)
            j_all[hit] = self._rng.integers(0, self.n_items, int(hit.sum()))
        total, n_batches, t0 = 0.0, 0, time.perf_counter()
        for start in range(0, len(users), self.batch_size):
            u = torch.from_numpy(u_all[start : start + self.batch_size])
            i = torch.from_numpy(i_all[start : start + self.batch_size])
            eu = F.embedding(u, self.user, sparse=True)
            # many item rows a step (the softmax's 64 negatives per positive): the fused op
            fused = len(u) * (k + 1) >= self.n_items
            pos, neg, reg_sq = self._scores(i, eu, j_all[start : start + self.batch_size], fused)
            if self.loss == "bpr":
                loss = F.softplus(neg - pos[:, None]).mean()
            else:
                logits = torch.cat([pos[:, None], neg], dim=1)
                loss = F.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long))
            loss = loss + self.reg * 0.5 * reg_sq / len(u)
            self.opt.zero_grad()
            loss.backward()
            self.step += 1
            # Cosine learning-rate decay, as in the authors' LightGCN runs (1e-2 -> 1e-4).
            progress = min(self.step / max(self.total_steps, 1), 1.0)
            lr_now = self.lr_floor + (self.lr - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in self.opt.param_groups:
                group["lr"] = lr_now
            report = self.masks.step([self.opt], self.schedule, self.step)
            if report is not None:
                self.last_report = report
            total += float(loss.detach())
            n_batches += 1
        if log is not None:
            dt = time.perf_counter() - t0
            log(f"  {n_batches} steps, {len(users) / max(dt, 1e-9):,.0f} pairs/s, loss {total / n_batches:.4f}")
        return total / max(n_batches, 1)

    def _scores(
        self, i: torch.Tensor, eu: torch.Tensor, j_batch: np.ndarray, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positive scores (B,), negative scores (B, k) and the batch's L2 sum (its item rows'
        negatives weighted 1/k).

        ``fused`` computes the same values and gradients by ``_SampledScores`` in fewer passes
        over the (B, k, dim) rows; otherwise by row lookups.
        """
        k = self.n_negatives
        if fused:
            weights = torch.full((k + 1,), 1.0 / k)
            weights[0] = 1.0
            rows = torch.cat([i[:, None], torch.from_numpy(j_batch)], 1)
            logits, item_sq = _SampledScores.apply(eu, self.item, rows, weights)
            return logits[:, 0], logits[:, 1:], eu.pow(2).sum() + item_sq
        ei = F.embedding(i, self.item, sparse=True)
        pos = (eu * ei).sum(1)
        ej = F.embedding(torch.from_numpy(j_batch), self.item, sparse=True)  # (B, k, dim)
        neg = torch.einsum("bd,bkd->bk", eu, ej)
        return pos, neg, eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum() / k

    @torch.no_grad()
    def score_all(self, users: np.ndarray) -> torch.Tensor:
        return self.user[torch.from_numpy(np.asarray(users, dtype=np.int64))] @ self.item.T

    def recommend_topk(self, users: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Top-k item ids per user over the full catalogue, excluding each user's train items."""
        scores = self.score_all(users)
        if exclude is not None:
            for row, seen in enumerate(exclude):
                if len(seen):
                    scores[row, torch.from_numpy(np.asarray(seen))] = -math.inf
        return torch.topk(scores, k, dim=1).indices.numpy()

    def to_sparse_tables(self) -> tuple[SparseTable, SparseTable]:
        """Export both tables in the serving layout (``sparse_table``: support columns or ELL)."""
        return (
            sparse_table(CSRTable.from_dense(self.user.detach().numpy())),
            sparse_table(CSRTable.from_dense(self.item.detach().numpy())),
        )


class _SampledScores(torch.autograd.Function):
    """Scores of each user against her own item rows, and their weighted L2 sum, in one op.

    ``rows[b, c]`` is the c-th item of user b (her positive, then her sampled negatives). With
    64 negatives per positive a step looks up more rows than the item table holds; by plain
    lookups (``F.embedding(sparse=True)``) the (B, k, dim) gradient passed through a product,
    a square, a sum and a sparse coalesce of its duplicate rows, which took most of the step.
    Here the L2 term is taken once per distinct row (weighted by its lookups), and the backward
    sums each row's score gradients by one sparse (rows x B) product with the queries. The item
    table receives the same coalesced row-sparse gradient (the looked-up rows, sums up to float
    order), so lazy Adam and the DSL masks see what they saw before.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        table: torch.Tensor,
        rows: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = rows.reshape(-1)
        # numpy's take gathers rows ~2x faster than index_select on one CPU thread
        emb = torch.from_numpy(np.take(table.detach().numpy(), flat.numpy(), axis=0)).view(
            *rows.shape, table.shape[1]
        )  # (B, C, dim)
        # the distinct looked-up rows, sorted, by counting (linear time, no sort); the L2 term
        # Σ_bc w_c |emb_bc|² is then each distinct row's |row|² times its total lookup weight
        flat_np = flat.numpy()
        touched_np = np.flatnonzero(np.bincount(flat_np, minlength=table.shape[0]))
        position = np.zeros(table.shape[0], dtype=np.int64)
        position[touched_np] = np.arange(len(touched_np))
        inverse = torch.from_numpy(position[flat_np])
        touched = torch.from_numpy(touched_np)
        row_weight = torch.zeros(len(touched_np), dtype=table.dtype).index_add_(
            0, inverse, weights.expand(rows.shape).reshape(-1)
        )
        touched_rows = table.detach()[touched]
        ctx.save_for_backward(query, emb, inverse, touched, row_weight, touched_rows)
        ctx.table_shape = table.shape
        scores = torch.bmm(emb, query.unsqueeze(2)).squeeze(2)  # (B, C)
        return scores, (touched_rows.pow(2).sum(1) * row_weight).sum()

    @staticmethod
    def backward(
        ctx: Any,
        g_scores: torch.Tensor,
        g_sq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        query, emb, inverse, touched, row_weight, touched_rows = ctx.saved_tensors
        g_query = torch.bmm(g_scores.unsqueeze(1), emb).squeeze(1)
        # a touched row's gradient is Σ over its lookups (b, c) of g_bc · query_b: one sparse
        # (touched x B) matrix times the queries, never the (B, C, dim) outer product
        n_users, n_cols = g_scores.shape
        lookups = coo_matrix(
            (g_scores.detach().numpy().ravel(), (inverse.numpy(), np.repeat(np.arange(n_users), n_cols))),
            shape=(len(touched), n_users),
        ).tocsr()  # sums duplicates, no sort
        values = torch.from_numpy(np.asarray(lookups @ query.detach().numpy(), dtype=np.float32))
        values.addcmul_(touched_rows, (2 * g_sq * row_weight).unsqueeze(1))
        g_table = torch.sparse_coo_tensor(
            touched[None], values, ctx.table_shape, is_coalesced=True, check_invariants=False
        )
        return g_query, g_table, None, None


def _is_member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == len(sorted_keys)] = 0
    return sorted_keys[pos] == keys


# ---- mask initialisation ------------------------------------------------------------------------
def aligned_masks(row_groups: dict[str, torch.Tensor] | None, shared: int, block: int | None) -> MaskInit:
    """``SparseParameterSet(mask_init=...)`` for aligned masks: one column order per table width
    (drawn from the set's generator when first needed), per-group blocks where ``row_groups`` has
    the table."""
    orders: dict[int, torch.Tensor] = {}

    def init(name: str, p: torch.nn.Parameter, n_active: int, gen: torch.Generator) -> torch.Tensor | None:
        if p.dim() != 2 or p.shape[1] <= 1:
            return None
        width = int(p.shape[1])
        if width not in orders:  # drawn once per width, in table order (as the runs of 0.1.x drew it)
            orders[width] = torch.randperm(width, generator=gen)
        order = orders[width]
        if row_groups is not None and name in row_groups:
            return _grouped_mask(p.shape, n_active, order, row_groups[name], shared, gen, block)
        return _aligned_mask(p.shape, n_active, order, gen)

    return init


def _aligned_mask(shape: torch.Size, n_active: int, column_order: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every row active on the same leading columns of ``column_order``; the remainder of the
    exact budget (fewer than one column's worth) goes to random rows on the next column.

    Why (``init="aligned"``, our option; the paper draws masks uniformly): a factorisation scores
    with ``u · v``, which only counts dimensions active on *both* sides. Uniform masks at density
    ``d`` overlap on ``d²·dim`` dimensions in expectation (0.64 of 64 at 10 %), so almost every
    score starts at 0 and a user row is grown only where item rows happen to be active. Shared
    columns make every pair overlap fully from the first step; prune-and-grow then moves the
    budget between rows and columns as the paper does.
    """
    rows, cols = int(shape[0]), int(shape[1])
    full, rest = divmod(n_active, rows)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[:, column_order[:full]] = True
    if rest:
        mask[torch.randperm(rows, generator=gen)[:rest], column_order[full]] = True
    return mask


def _grouped_mask(
    shape: torch.Size,
    n_active: int,
    column_order: torch.Tensor,
    row_groups: torch.Tensor,
    shared: int,
    gen: torch.Generator,
    block: int | None = None,
) -> torch.Tensor:
    """Aligned masks per row group, ranked: every row is active on the first ``shared`` columns of
    the order, then its nearest group's block, then its second group's, then every other column in
    the shared order; it takes the first ``k`` (``k`` per row as in ``_aligned_mask``: the
    remainder of the exact budget goes to random rows).

    Why (in the spirit of SparseRec's data-driven mask init): aligned masks make the whole table a
    rank-``d·dim`` model; with groups from a co-clustering of the interaction graph each group gets
    its own directions (a mixture of local low-rank models, as LLORMA) at the same per-row budget,
    and a row next to a group boundary also shares columns with its second group.
    ``row_groups`` holds each row's groups, nearest first (one column per rank).
    """
    rows, cols = int(shape[0]), int(shape[1])
    if row_groups.numel() == 0 or row_groups.shape[0] != rows or int(row_groups.min()) < 0:
        raise ValueError(f"row_groups needs non-negative group ids for each of {rows} rows")
    groups = row_groups.to(torch.long).reshape(rows, -1)
    n_groups = int(groups.max()) + 1
    b = block if block else (cols - shared) // n_groups
    if b < 1 or shared + n_groups * b > cols:
        raise ValueError(f"{n_groups} groups x blocks of {b} do not fit in {cols} - {shared} shared columns")
    full, rest = divmod(n_active, rows)
    lengths = torch.full((rows,), full, dtype=torch.long)
    if rest:
        lengths[torch.randperm(rows, generator=gen)[:rest]] += 1
    combos, inverse = torch.unique(groups, dim=0, return_inverse=True)
    preference = torch.empty(len(combos), cols, dtype=torch.long)  # the column order as each combo ranks it
    for c, ids in enumerate(combos.tolist()):
        own = [column_order[shared + g * b : shared + (g + 1) * b] for g in ids]
        first = torch.cat([column_order[:shared], *own])
        _, at = np.unique(first.numpy(), return_index=True)  # a column in two ranked blocks counts once
        first = first[np.sort(at)]
        used = torch.zeros(cols, dtype=torch.bool)
        used[first] = True
        preference[c] = torch.cat([first, column_order[~used[column_order]]])
    taken = torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)  # (rows, cols) in preference order
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask.scatter_(1, preference[inverse.reshape(-1)], taken)
    return mask
