"""``DSLRecommender``: the online CTR model driftrec serves, trained by Dynamic Sparse Learning.

``DSLRecommender`` is the online CTR model driftrec serves: hashed user/item/category embeddings
(so unknown ids are scored, never refused), a small interaction head whose last hidden layer ``h``
feeds the ReLoop2 error memory, trained by micro-batches from the stream with DSL masks, and
snapshots holding only active parameters. ``SparseScorer`` serves such a snapshot from sparse
storage (CSR head matrices; each embedding table over its support columns, ``SupportTable``, or
as ELL with a CSR overflow, ``models.ell.EllTable``, whichever is smaller) without
materialising dense weights.

Deviations from the paper (see ``models/sparse.py`` for the mask machinery's own):

* ``ΔT`` is much shorter than the authors' 3000 iterations: our runs are a few epochs on CPU
  (the authors train LightGCN for 1000 epochs), so ``ΔT`` is scaled (benchmark default 200
  steps, ~16 explorations over 8 epochs). Online, ``prune_every`` counts micro-batches.
* The online model anneals ``p(t)`` over ``anneal_steps`` micro-batches and then keeps the floor
  fraction (a stream has no "end of training").
* The authors report the best test-epoch result; we report the last epoch (no test-set selection).
* Embedding tables are optimised by a lazy, row-sparse Adam (``models.sparse.RowAdam``; the
  authors use dense Adam): moments of rows absent from a batch are not decayed. This makes a
  step O(batch) instead of O(table), which decides whether online training keeps up with the
  stream on a CPU. The gradient used for growth is still the full dense gradient of the batch.
* The benchmark trains for a few epochs (6 with its sampled softmax, 8 with BPR; the authors
  train LightGCN for 1000) to fit a 2-core CPU budget, with the authors' lr 1e-2 cosine-decayed
  to 1e-4 and L2 reg 1e-4.
* ``DSLRecommender`` adds first-order terms (a bias per user/item/category row, in the
  same global sparsity group as the embeddings). Chosen on ML-100K events 25,000-50,000 (the demo
  reports events 0-25,000): prequential AUC 0.661 -> 0.669, log-loss 0.648 -> 0.643, at +3 % of
  the parameter budget. On that segment a higher lr (0.03, 0.1) or smaller micro-batches (16-64)
  did not help consistently, so lr 0.01 and batch 256 stay. On the same segment, exploring more
  often helps an online model that starts sparse (a row can only learn once its weights are
  grown): ``prune_every`` (ΔT, in micro-batches) 100 -> 20 gave AUC 0.669 -> 0.684 (5: 0.686;
  the same net dense: 0.701). The default stays 100 all the same: with ΔT = 20 the error memory's
  gain after a shift (``tests/test_shift_through_kafka.py``) turned into a loss (post-flip
  log-loss, base 0.672 / memory 0.678, vs 0.681 / 0.678 at ΔT = 100) -- frequent prune-and-grow
  moves the hidden space between snapshots, so a query's LSH codes drift away from those its
  neighbours were written under. Keying the memory on a representation that is stable across
  snapshots would let both gains add up; not done yet.
* **Grow on touch** (``grow_on_touch``, default on; our addition for online training). A uniform
  random mask over hashed tables of 65,536 rows spends ~96 % of the budget on rows ML-100K never
  uses, and a used row starts with ~3 of 32 weights and a 10 % chance of a bias; only an
  exploration (every ΔT micro-batches) moves budget to it. So when a micro-batch touches a row,
  all its weights are grown (at zero, as the paper grows weights) and as many active weights of
  never-touched rows are pruned at random (they never had a gradient: their magnitudes are init
  noise), falling back to the smallest magnitudes once no untouched row is left. The active count
  stays exact and the periodic prune-and-grow still runs. On events 25,000-50,000: AUC 0.669 ->
  0.702 and log-loss 0.643 -> 0.620, level with the same network trained dense (0.701 / 0.621).
  It also restored the error memory's gain on the shifted genre through Kafka, where ΔT = 20 had
  cost it.
* **First-order weights by Adagrad** (``bias_lr``, default 0.3; our choice, as FTRL / Vowpal
  Wabbit train their linear terms). With the embeddings' Adam at lr 0.01 a user's bias moves at
  most ~0.01 logit per micro-batch, so a rating session is over before the model has learned the
  user's leniency; Adagrad (``models.sparse.RowAdagrad``) takes a large first step per row and
  anneals as evidence accumulates. Chosen on ML-100K events 25,000-50,000 with every window
  scored before it is learned (250 events, as ``driftrec evaluate`` runs): AUC / log-loss 0.701 /
  0.621 (biases in Adam) -> 0.708 / 0.616 (bias_lr 0.1), 0.714 / 0.610 (0.3), 0.714 / 0.612
  (0.5), 0.703 / 0.636 (1.0); micro-batches of 64 or 128 instead of 256 changed AUC by < 0.002.
* Head matrices of ``DSLRecommender`` default to ``head_density=0.5``: they are <0.1 % of the
  parameters, and at 10 % density the 32-weight output layer would keep 3 weights. The reported
  ``n_active_params / n_total_params`` covers every parameter (biases are dense and counted).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from driftrec.contract.interaction import Interaction, stable_hash
from driftrec.models.ell import EllTable
from driftrec.models.sparse import (
    DSLSchedule,
    PruneGrowReport,
    RowAdagrad,
    RowAdam,
    SparseParameterSet,
)

SNAPSHOT_FORMAT = "driftrec.dsl.v1"


# =============================================================================================
# Sparse storage
# =============================================================================================
class CSRTable:
    """An embedding table in CSR: only active values and their column indices are stored.

    ``rows_dense`` gathers candidate rows without any dense table behind it; ``dot`` scores rows
    against one dense vector (a vectorised row gather and ``reduceat``, no Python loop).
    """

    __slots__ = ("_lens", "data", "indices", "indptr", "shape")

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int]) -> None:
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(indices, dtype=np.int32)
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.shape = (int(shape[0]), int(shape[1]))
        self._lens = np.diff(self.indptr).astype(np.int32)

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> CSRTable:
        rows, cols = np.nonzero(dense)
        return cls.from_flat(rows.astype(np.int64) * dense.shape[1] + cols, dense[rows, cols], dense.shape)

    @classmethod
    def from_flat(cls, flat_idx: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> CSRTable:
        """From row-major flat indices of active entries (the snapshot layout)."""
        order = np.argsort(flat_idx, kind="stable")
        flat_idx, values = flat_idx[order], values[order]
        rows, cols = np.divmod(flat_idx, shape[1])
        indptr = np.zeros(shape[0] + 1, dtype=np.int64)
        np.add.at(indptr, rows + 1, 1)
        return cls(np.cumsum(indptr), cols, values, shape)

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored entries of ``rows`` as CSR ``(indptr, columns, values)`` of a len(rows)-row matrix."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self._lens[rows]
        bp = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=bp[1:])
        flat = np.repeat(self.indptr[rows].astype(np.int64) - bp[:-1], lens) + np.arange(int(bp[-1]))
        return bp, self.indices[flat], self.data[flat]

    def dot(self, rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """``table[rows] @ vector`` touching only the stored entries of those rows."""
        bp, bj, bx = self._gather(rows)
        products = bx * np.asarray(vector, dtype=np.float32)[bj]
        out = np.add.reduceat(products, bp[:-1]) if products.size else np.zeros(bp.size - 1, dtype=np.float32)
        out = np.where(np.diff(bp) > 0, out, 0.0)  # reduceat repeats a neighbour's value for an empty row
        return np.asarray(out, dtype=np.float32)

    def rows_dense(self, rows: np.ndarray) -> np.ndarray:
        bp, bj, bx = self._gather(rows)
        out = np.zeros((bp.size - 1, self.shape[1]), dtype=np.float32)
        out[np.repeat(np.arange(bp.size - 1), np.diff(bp)), bj] = bx
        return out


class SupportTable:
    """An embedding table stored over its *support*: the columns active in at least one row.

    Each row keeps one value per support column, in order; a support column inactive in that row
    is stored as 0 (padding, as in ELLPACK). Nothing outside the support is stored, and the
    snapshot still carries only active entries; this layout is built from them at load time.

    Why: DSL's masks on a factorisation concentrate on few columns (a weight can only grow where
    the other side is active, see ``models/sparse.py``), so a table's support is often a small
    fraction of ``dim``. Then a candidate row is a few contiguous floats with no index per entry:
    scoring 1,000 candidates is one small gather and one matvec, and the table is smaller than
    CSR. ``sparse_table`` picks this layout only when it takes fewer bytes than ELL.
    """

    __slots__ = ("columns", "nnz", "shape", "values")

    def __init__(self, columns: np.ndarray, values: np.ndarray, shape: tuple[int, int], nnz: int) -> None:
        self.columns = np.ascontiguousarray(columns, dtype=np.int64)
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.shape = (int(shape[0]), int(shape[1]))
        self.nnz = int(nnz)  # stored non-padding entries (active and non-zero)

    @classmethod
    def from_csr(cls, table: CSRTable) -> SupportTable:
        columns = np.unique(table.indices)
        slot = np.full(table.shape[1], -1, dtype=np.int64)
        slot[columns] = np.arange(columns.size)
        values = np.zeros((table.shape[0], columns.size), dtype=np.float32)
        rows = np.repeat(np.arange(table.shape[0]), np.diff(table.indptr))
        values[rows, slot[table.indices]] = table.data
        return cls(columns, values, table.shape, table.nnz)

    @staticmethod
    def nbytes_for(table: CSRTable) -> int:
        n_support = int(np.unique(table.indices).size)
        return table.shape[0] * n_support * 4 + n_support * 8

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.columns.nbytes)

    @property
    def padding(self) -> float:
        """Share of stored slots that are padding zeros."""
        return 1.0 - self.nnz / max(self.values.size, 1)

    def dot(self, rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """``table[rows] @ vector``: only the support columns of the vector are read."""
        return np.take(self.values, rows, axis=0) @ np.asarray(vector, dtype=np.float32)[self.columns]

    def rows_dense(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((np.size(rows), self.shape[1]), dtype=np.float32)
        out[:, self.columns] = np.take(self.values, rows, axis=0)
        return out


SparseTable = SupportTable | EllTable


def sparse_table(table: CSRTable) -> SparseTable:
    """The serving layout of an embedding table: rows over its support columns when that is the
    smaller, else ELL with a CSR overflow (``models/ell.py``), whose compiled kernel reads each
    candidate row in one contiguous access. CSR itself stays the exchange format."""
    ell_bytes = EllTable.nbytes_for(table.indptr, table.shape[1])
    if SupportTable.nbytes_for(table) < ell_bytes:
        return SupportTable.from_csr(table)
    return EllTable.from_csr(table.indptr, table.indices, table.data, table.shape)


# =============================================================================================
# DSLRecommender: the online CTR model
# =============================================================================================
_SALTS = {"user": "u", "item": "i", "cat": "c"}
_UNKNOWN_CATEGORY = ""


class RowHasher:
    """Id -> hashed table row for one table (``stable_hash`` with the table's salt), memoised.

    Why: ranking 1,000 candidates hashes 2,000 ids (items and categories); blake2b per id, or an
    ``lru_cache`` keyed on ``(text, n_rows, salt)`` tuples, cost more than the whole model on a
    request (0.23 ms of 0.7, ``benchmarks/dsl_product.py``). A plain dict per table answers a
    known id in one lookup; an unknown id is hashed once. ``None`` is the unknown category's row.
    The memo is dropped when it reaches ``max_ids`` (a bound on memory, not an LRU: ids come back
    within a request's lifetime, so a rare full reset costs one re-hash per id).
    """

    __slots__ = ("_known", "max_ids", "n_rows", "salt")

    def __init__(self, n_rows: int, salt: str, max_ids: int = 1 << 20) -> None:
        self.n_rows, self.salt, self.max_ids = n_rows, salt, max_ids
        self._known: dict[str | None, int] = {}

    def row(self, text: str | None) -> int:
        known = self._known.get(text)
        if known is None:
            known = stable_hash(text if text is not None else _UNKNOWN_CATEGORY, self.n_rows, self.salt)
            if len(self._known) >= self.max_ids:
                self._known.clear()
            self._known[text] = known
        return known

    def rows(self, texts: Sequence[str | None]) -> np.ndarray:
        """Rows of ``texts`` as int32 (one dict lookup each once every id is known)."""
        try:
            return np.fromiter(map(self._known.__getitem__, texts), dtype=np.int32, count=len(texts))
        except KeyError:
            return np.fromiter(map(self.row, texts), dtype=np.int32, count=len(texts))


@lru_cache(maxsize=64)
def row_hashers(n_rows: int) -> dict[str, RowHasher]:
    """The user, item and category hashers of tables with ``n_rows`` rows (shared per process)."""
    return {name: RowHasher(n_rows, salt) for name, salt in _SALTS.items()}


class _Head(torch.nn.Module):
    """[u⊙i, u, i, c] → hidden → hidden (= h, the representation ReLoop2 keys on) → logit."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4 * dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, u: torch.Tensor, i: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u * i, u, i, c], dim=1)
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        # The u·i term gives the head a direct MF path, so collaborative signal does not have to
        # pass through a sparse MLP before it helps.
        return self.out(h).squeeze(1) + (u * i).sum(1), h


class DSLRecommender:
    """Online CTR model trained with Dynamic Sparse Learning from the first event.

    Hashed tables mean a fixed memory budget whatever the number of ids, and unseen users/items
    land on (possibly shared) rows instead of raising; category ``None`` maps to one
    "unknown category" row.
    """

    def __init__(
        self,
        n_rows: int = 65536,
        dim: int = 32,
        density: float = 0.1,
        hidden: int = 32,
        lr: float = 0.01,
        prune_every: int = 100,
        seed: int = 0,
        *,
        head_density: float = 0.5,
        anneal_steps: int = 10_000,
        init_std: float = 0.01,
        first_order: bool = True,
        grow_on_touch: bool = True,
        bias_lr: float = 0.3,
    ) -> None:
        self.config: dict[str, Any] = {
            "n_rows": n_rows,
            "dim": dim,
            "density": density,
            "hidden": hidden,
            "lr": lr,
            "prune_every": prune_every,
            "seed": seed,
            "head_density": head_density,
            "anneal_steps": anneal_steps,
            "init_std": init_std,
            "first_order": first_order,
            "grow_on_touch": grow_on_touch,
            "bias_lr": bias_lr,
        }
        torch.manual_seed(seed)
        self.n_rows, self.dim, self.hidden = n_rows, dim, hidden
        # Small init: untrained rows then have the smallest magnitudes and are pruned first, so the
        # budget flows to rows the stream actually uses.
        self.tables = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(torch.randn(n_rows, dim) * init_std) for name in _SALTS}
        )
        # First-order terms (a bias per user, item and category row), as in FM / Wide & Deep: a
        # rating stream is dominated by user leniency and item quality, which an online MLP over
        # embeddings learns slowly. They are (n_rows × 1) tables masked and budgeted with the
        # embeddings in the same global group, so DSL decides which rows keep a bias.
        self.biases = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(torch.zeros(n_rows, 1)) for name in (_SALTS if first_order else ())}
        )
        self.head = _Head(dim, hidden)
        sparse = {f"emb.{k}": v for k, v in self.tables.items()}
        sparse.update({f"emb.bias_{k}": v for k, v in self.biases.items()})
        sparse.update({f"head.{k}": v for k, v in self.head.named_parameters() if k.endswith("weight")})
        densities = {name: (density if name.startswith("emb.") else max(head_density, density)) for name in sparse}
        groups = {name: ("emb" if name.startswith("emb.") else name) for name in sparse}
        self.masks = SparseParameterSet(sparse, densities, groups=groups, seed=seed)
        self._dense_params = {f"head.{k}": v for k, v in self.head.named_parameters() if not k.endswith("weight")}
        # Tables: row-sparse gradients + lazy row Adam so a micro-batch costs O(batch), not O(table).
        self.opts: list[torch.optim.Optimizer] = [
            RowAdam(list(self.tables.parameters()), lr=lr),
            torch.optim.Adam(list(self.head.parameters()), lr=lr),
        ]
        if self.biases:
            # first-order weights anneal per row (see RowAdagrad for why not Adam's fixed-size steps)
            self.opts.append(RowAdagrad(list(self.biases.parameters()), lr=bias_lr))
        self.schedule = DSLSchedule(prune_every=prune_every, total_steps=anneal_steps)
        self.step = 0
        self.last_report: PruneGrowReport | None = None
        self.last_loss = math.nan  # binary cross-entropy of the last step

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def n_active_params(self) -> int:
        return self.masks.n_active + sum(p.numel() for p in self._dense_params.values())

    @property
    def n_total_params(self) -> int:
        return self.masks.n_total + sum(p.numel() for p in self._dense_params.values())

    # ---- encoding ----------------------------------------------------------------------------
    def _rows(self, users: Sequence[str], items: Sequence[str], cats: Sequence[str | None]) -> tuple[torch.Tensor, ...]:
        hashers = row_hashers(self.n_rows)
        return tuple(
            torch.from_numpy(hashers[name].rows(ids).astype(np.int64))
            for name, ids in (("user", users), ("item", items), ("cat", cats))
        )

    def _forward(self, u: torch.Tensor, i: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # sparse=True: row-sparse gradients, so a micro-batch never touches the whole table
        user = F.embedding(u, self.tables["user"], sparse=True)
        item = F.embedding(i, self.tables["item"], sparse=True)
        cat = F.embedding(c, self.tables["cat"], sparse=True)
        logit, h = self.head(user, item, cat)
        for name, rows in (("user", u), ("item", i), ("cat", c)):
            if name in self.biases:
                logit = logit + F.embedding(rows, self.biases[name], sparse=True)[:, 0]
        return logit, h

    # ---- learning ----------------------------------------------------------------------------
    def learn_many(self, interactions: Sequence[Interaction]) -> None:
        """One DSL step of binary cross-entropy on the labelled interactions (loss in ``last_loss``).

        Interactions without a label (bare impressions) are skipped; an all-unlabelled batch does
        not count as a step.
        """
        batch = [x for x in interactions if x.label is not None]
        if not batch:
            return
        u, i, c = self._rows([x.user_id for x in batch], [x.item_id for x in batch], [x.category for x in batch])
        if self.config.get("grow_on_touch"):
            touched = {"user": u, "item": i, "cat": c}
            self.masks.grow_touched_rows(
                {
                    **{f"emb.{k}": r for k, r in touched.items()},
                    **{f"emb.bias_{k}": r for k, r in touched.items() if k in self.biases},
                },
                self.opts,
            )
        y = torch.tensor([float(x.label) for x in batch if x.label is not None])
        logit, _ = self._forward(u, i, c)
        loss = F.binary_cross_entropy_with_logits(logit, y)
        for opt in self.opts:
            opt.zero_grad()
        torch.autograd.backward(loss)
        self.step += 1
        report = self.masks.step(self.opts, self.schedule, self.step)
        if report is not None:
            self.last_report = report
        self.last_loss = float(loss.detach())

    def learn_one(self, interaction: Interaction) -> None:
        self.learn_many([interaction])

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict_with_hidden(self, interactions: Sequence[Interaction]) -> tuple[np.ndarray, np.ndarray]:
        if not interactions:
            return np.zeros(0, dtype=np.float64), np.zeros((0, self.hidden), dtype=np.float32)
        rows = self._rows(
            [x.user_id for x in interactions], [x.item_id for x in interactions], [x.category for x in interactions]
        )
        logit, h = self._forward(*rows)
        return torch.sigmoid(logit).double().numpy(), h.float().numpy()

    def predict_many(self, interactions: Sequence[Interaction]) -> np.ndarray:
        return self.predict_with_hidden(interactions)[0]

    def predict_one(self, interaction: Interaction) -> float:
        return float(self.predict_many([interaction])[0])

    @torch.no_grad()
    def score_candidates(
        self,
        user_id: str,
        item_ids: Sequence[str],
        categories: Sequence[str | None] | None = None,
        ts: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and hidden vectors for one user's candidates, in one batched call.

        ``ts`` is accepted for API symmetry with the serving contract; the base model is not
        time-aware (time enters through the TPP and the error memory).
        """
        cats = list(categories) if categories is not None else [None] * len(item_ids)
        rows = self._rows([user_id] * len(item_ids), list(item_ids), cats)
        logit, h = self._forward(*rows)
        return torch.sigmoid(logit).double().numpy(), h.float().numpy()

    # ---- snapshots ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Only active parameters and their flat indices (+ dense biases, config, version)."""
        arrays: dict[str, np.ndarray] = {}
        for name, p in self.masks.params.items():
            mask = self.masks.masks[name].reshape(-1).numpy()
            idx = np.flatnonzero(mask).astype(np.int64)
            arrays[f"{name}.idx"] = idx
            arrays[f"{name}.val"] = p.detach().reshape(-1).numpy()[idx].astype(np.float32)
            arrays[f"{name}.shape"] = np.asarray(p.shape, dtype=np.int64)
        for name, p in self._dense_params.items():
            arrays[f"{name}.dense"] = p.detach().numpy().astype(np.float32)
        for name, rows in self.masks.touched_rows.items():  # a resumed trainer must not prune live rows
            arrays[f"{name}.touched"] = np.flatnonzero(rows.numpy()).astype(np.int64)
        meta = {
            "format": SNAPSHOT_FORMAT,
            "config": self.config,
            "step": self.step,
            "n_active_params": self.n_active_params,
            "n_total_params": self.n_total_params,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> DSLRecommender:
        """Rebuild a trainable model (masks from the stored indices; optimiser state starts fresh)."""
        meta, arrays = _read_snapshot(blob)
        model = cls(**{"first_order": False, **meta["config"]})  # snapshots from before first-order terms
        with torch.no_grad():
            for name, p in model.masks.params.items():
                idx = torch.from_numpy(arrays[f"{name}.idx"])
                flat = torch.zeros(p.numel())
                flat[idx] = torch.from_numpy(arrays[f"{name}.val"])
                mask = torch.zeros(p.numel(), dtype=torch.bool)
                mask[idx] = True
                p.copy_(flat.view_as(p))
                model.masks.masks[name] = mask.view_as(p)
            for name, p in model._dense_params.items():
                p.copy_(torch.from_numpy(arrays[f"{name}.dense"]))
            for name, p in model.masks.params.items():
                if f"{name}.touched" in arrays:
                    rows = torch.zeros(p.shape[0], dtype=torch.bool)
                    rows[torch.from_numpy(arrays[f"{name}.touched"])] = True
                    model.masks.touched_rows[name] = rows
        model.step = int(meta["step"])
        return model


def _dense_t(matrix: CSRTable) -> np.ndarray:
    """A head matrix, dense and transposed (``x @ W.T`` as one contiguous BLAS operand)."""
    return np.ascontiguousarray(matrix.rows_dense(np.arange(matrix.shape[0], dtype=np.int32)).T)


def _read_snapshot(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"unsupported snapshot format {meta.get('format')!r}")
    return meta, arrays


class SparseScorer:
    """Inference-only scorer over a snapshot, its embedding tables in sparse storage.

    Embedding tables take the smaller of the support-column and ELL layouts (``sparse_table``);
    candidate rows are gathered into small dense blocks (the only dense memory is proportional to
    the request), so the served footprint follows the active-parameter count, not the table size.
    The head's matrices are held dense (transposed, for one BLAS call each): they are < 0.1 % of
    the parameters, and a CSR product at serving sizes cost 9x a dense one (1,000 candidates:
    0.49 vs 0.054 ms for the first layer), more than every table gather together
    (``benchmarks/dsl_product.py``).
    """

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        cfg = meta["config"]
        self.n_rows, self.dim, self.hidden = int(cfg["n_rows"]), int(cfg["dim"]), int(cfg["hidden"])
        self.step = int(meta["step"])
        self.n_active_params = int(meta["n_active_params"])

        def csr(name: str) -> CSRTable:
            rows, cols = (int(s) for s in arrays[f"{name}.shape"])
            return CSRTable.from_flat(arrays[f"{name}.idx"], arrays[f"{name}.val"], (rows, cols))

        self.tables = {k: sparse_table(csr(f"emb.{k}")) for k in _SALTS}
        self.biases = {k: sparse_table(csr(f"emb.bias_{k}")) for k in _SALTS} if cfg.get("first_order") else {}
        self.w_t = {k: _dense_t(csr(f"head.{k}.weight")) for k in ("fc1", "fc2", "out")}
        self.b = {k: arrays[f"head.{k}.bias.dense"] for k in ("fc1", "fc2", "out")}
        for table in (*self.tables.values(), *self.biases.values()):  # compile (or load) kernels now,
            table.rows_dense(np.zeros(0, dtype=np.int32))  # not on the first scored request

    @classmethod
    def from_bytes(cls, blob: bytes) -> SparseScorer:
        return cls(*_read_snapshot(blob))

    def _score_rows(self, u: np.ndarray, i: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        eu, ei, ec = (self.tables[k].rows_dense(r) for k, r in (("user", u), ("item", i), ("cat", c)))
        ui = eu * ei
        x = np.concatenate([ui, eu, ei, ec], axis=1)
        h = np.maximum(x @ self.w_t["fc1"] + self.b["fc1"], 0.0)
        h = np.maximum(h @ self.w_t["fc2"] + self.b["fc2"], 0.0)
        logit = (h @ self.w_t["out"])[:, 0] + self.b["out"][0] + ui.sum(1)
        for name, rows in (("user", u), ("item", i), ("cat", c)):
            if name in self.biases:
                logit = logit + self.biases[name].rows_dense(rows)[:, 0]
        return 1.0 / (1.0 + np.exp(-logit.astype(np.float64))), h.astype(np.float32)

    def score_user_rows(self, u: int, i: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_score_rows`` for one user's candidates, with the user's part computed once.

        Why: the first layer sees ``[u⊙i, u, i, c]``; with one user, ``W_ui (u⊙i) + W_i i`` is
        ``(W_ui diag(u) + W_i) i``, so the user folds into one ``dim × hidden`` matrix per request
        and ``W_u u`` into the bias; each distinct category row's term is computed once. A
        candidate then costs a ``dim``-wide first layer instead of a ``4·dim``-wide one. The
        result equals ``_score_rows`` (same hidden vectors, the ReLoop2 keys).
        """
        d = self.dim
        w1 = self.w_t["fc1"]  # (4·dim, hidden): rows [u⊙i | u | i | c]
        eu = self.tables["user"].rows_dense(np.asarray([u], dtype=np.int32))[0]
        folded = w1[:d] * eu[:, None] + w1[2 * d : 3 * d]
        base = eu @ w1[d : 2 * d] + self.b["fc1"]
        cat_rows, cat_of = np.unique(c, return_inverse=True)
        cat_terms = self.tables["cat"].rows_dense(cat_rows) @ w1[3 * d :]
        ei = self.tables["item"].rows_dense(i)
        pre = ei @ folded + base
        pre += cat_terms[0] if cat_rows.size == 1 else cat_terms[cat_of.reshape(-1)]
        h = np.maximum(pre, 0.0, out=pre)
        h = np.maximum(h @ self.w_t["fc2"] + self.b["fc2"], 0.0)
        logit = h @ self.w_t["out"][:, 0] + (self.b["out"][0] + ei @ eu)
        if self.biases:
            user_bias = self.biases["user"].rows_dense(np.asarray([u], dtype=np.int32))[0, 0]
            cat_bias = self.biases["cat"].rows_dense(cat_rows)[:, 0]
            logit += user_bias + self.biases["item"].rows_dense(i)[:, 0]
            logit += cat_bias[0] if cat_rows.size == 1 else cat_bias[cat_of.reshape(-1)]
        return 1.0 / (1.0 + np.exp(-logit.astype(np.float64))), h.astype(np.float32, copy=False)

    def score_candidates(
        self,
        user_id: str,
        item_ids: Sequence[str],
        categories: Sequence[str | None] | None = None,
        ts: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        hashers = row_hashers(self.n_rows)
        cats = categories if categories is not None else [None] * len(item_ids)
        if len(item_ids) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros((0, self.hidden), dtype=np.float32)
        items, cat_rows = hashers["item"].rows(item_ids), hashers["cat"].rows(cats)
        return self.score_user_rows(hashers["user"].row(user_id), items, cat_rows)

    def predict_with_hidden(self, interactions: Sequence[Interaction]) -> tuple[np.ndarray, np.ndarray]:
        hashers = row_hashers(self.n_rows)
        u = hashers["user"].rows([x.user_id for x in interactions])
        i = hashers["item"].rows([x.item_id for x in interactions])
        c = hashers["cat"].rows([x.category for x in interactions])
        return self._score_rows(u, i, c)

    def predict_many(self, interactions: Sequence[Interaction]) -> np.ndarray:
        return self.predict_with_hidden(interactions)[0]


# =============================================================================================
# Negative sampling for implicit streams
# =============================================================================================
def sample_negatives(
    interaction: Interaction,
    n: int,
    rng: np.random.Generator,
    item_pool: Sequence[str],
    exclude: set[str] | None = None,
    categories: dict[str, str] | None = None,
) -> list[Interaction]:
    """``n`` label-0 copies of an implicit (positive-only) event with items drawn from the pool.

    Why: click/check-in streams carry only positives; a CTR model needs negatives. Items are
    drawn uniformly from ``item_pool`` (pass the items seen so far to stay causal), skipping the
    positive itself and anything in ``exclude`` (e.g. the user's known positives) with a bounded
    number of retries, so an exhausted pool yields fewer than ``n`` negatives rather than a loop.
    The negatives keep the user, time and features of the positive; their category comes from
    ``categories`` when given, else unknown.
    """
    if not item_pool or n <= 0:
        return []
    banned = {interaction.item_id} | (exclude or set())
    out: list[Interaction] = []
    for _ in range(4 * n):
        if len(out) == n:
            break
        item = item_pool[int(rng.integers(len(item_pool)))]
        if item in banned:
            continue
        out.append(
            Interaction(
                user_id=interaction.user_id,
                item_id=item,
                ts=interaction.ts,
                label=0,
                category=(categories or {}).get(item),
                kind="negative-sample",
                event_id=f"{interaction.event_id}#neg{len(out)}",
                features=dict(interaction.features),
            )
        )
    return out
