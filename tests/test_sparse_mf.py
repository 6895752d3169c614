"""``SparseMF``, the offline DSL benchmark's model (``benchmarks/sparse_mf.py``): budget, masks, losses."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
import torch

from benchmarks.sparse_mf import SparseMF, aligned_masks
from driftrec.models.dsl import SupportTable
from driftrec.models.sparse import SparseParameterSet

torch.set_num_threads(1)


def test_sparse_mf_keeps_budget_and_csr_scores_match_dense() -> None:
    rng = np.random.default_rng(0)
    model = SparseMF(30, 50, dim=8, density=0.1, batch_size=64, prune_every=2, total_steps=40, seed=0)
    users, items = rng.integers(0, 30, 600), rng.integers(0, 50, 600)
    n0 = model.n_active_params
    for _ in range(3):
        model.fit_epoch(users, items)
    assert model.n_active_params == n0 and model.last_report is not None
    user_csr, item_csr = model.to_sparse_tables()
    assert item_csr.nnz <= int(model.masks.masks["item"].sum())
    cand = rng.choice(50, 20, replace=False).astype(np.int32)
    dense = model.item.detach().numpy()[cand] @ model.user.detach().numpy()[3]
    np.testing.assert_allclose(item_csr.dot(cand, user_csr.rows_dense(np.array([3]))[0]), dense, atol=1e-6)
    top = model.recommend_topk(np.array([0, 1]), 5, exclude=[np.array([0, 1]), np.array([])])
    assert top.shape == (2, 5) and 0 not in top[0] and 1 not in top[0]


# ---- DSLRecommender ---------------------------------------------------------------------------
def test_aligned_init_keeps_the_exact_budget_and_shares_columns_across_a_group() -> None:
    """init="aligned": exact per-tensor counts, and user/item rows overlap on the same columns."""
    user = torch.nn.Parameter(torch.randn(101, 64))
    item = torch.nn.Parameter(torch.randn(53, 64))
    aligned = SparseParameterSet({"user": user, "item": item}, 0.1, seed=3, mask_init=aligned_masks(None, 0, None))
    assert aligned.active_per_tensor() == {"user": round(0.1 * 101 * 64), "item": round(0.1 * 53 * 64)}
    overlap = aligned.masks["user"].float() @ aligned.masks["item"].float().T
    assert overlap.min() >= 6  # every pair shares the 6 common columns (+ the remainder column)
    uniform = SparseParameterSet({"user": user, "item": item}, 0.1, seed=3)
    assert (uniform.masks["user"].float() @ uniform.masks["item"].float().T).mean() < 1.0
    with pytest.raises(ValueError, match="init"):
        SparseMF(10, 10, dim=4, init="diagonal")


def test_aligned_sparse_mf_keeps_its_budget_through_prune_and_grow() -> None:
    rng = np.random.default_rng(0)
    model = SparseMF(40, 30, dim=16, density=0.25, batch_size=64, prune_every=3, total_steps=50, init="aligned")
    budget = model.n_active_params
    users, items = rng.integers(0, 40, 600), rng.integers(0, 30, 600)
    for _ in range(3):
        model.fit_epoch(users, items)
    assert model.last_report is not None and model.last_report.n_grown > 0
    assert model.n_active_params == budget


def test_aligned_sparse_mf_is_served_over_its_support_columns() -> None:
    rng = np.random.default_rng(1)
    model = SparseMF(80, 120, dim=32, density=0.1, batch_size=64, prune_every=3, total_steps=60, init="aligned")
    users, items = rng.integers(0, 80, 900), rng.integers(0, 120, 900)
    for _ in range(2):
        model.fit_epoch(users, items)
    user_table, item_table = model.to_sparse_tables()
    assert isinstance(item_table, SupportTable) and item_table.columns.size < 32
    cand = rng.choice(120, 50, replace=False).astype(np.int32)
    expected = model.item.detach().numpy()[cand] @ model.user.detach().numpy()[5]
    np.testing.assert_allclose(item_table.dot(cand, user_table.rows_dense(np.array([5]))[0]), expected, atol=1e-6)


def test_grouped_init_gives_each_group_its_own_columns_beside_the_shared_ones() -> None:
    """row_groups: exact budget; same-group rows overlap fully, other groups only on shared columns;
    ranked groups share a block wherever two rows hold the same group at any rank."""
    user = torch.nn.Parameter(torch.randn(60, 32))
    item = torch.nn.Parameter(torch.randn(90, 32))
    groups = {"user": torch.arange(60) % 5, "item": torch.arange(90) % 5}
    masks = SparseParameterSet(
        {"user": user, "item": item}, 5 / 32, seed=4, mask_init=aligned_masks(groups, 2, None)
    ).masks
    assert int(masks["user"].sum()) == round(5 / 32 * 60 * 32) and int(masks["item"].sum()) == round(5 / 32 * 90 * 32)
    overlap = masks["user"].float() @ masks["item"].float().T
    same = groups["user"][:, None] == groups["item"][None, :]
    assert bool((overlap[same] == 5).all()) and bool((overlap[~same] == 2).all())
    assert int(masks["item"].any(0).sum()) == 2 + 5 * 3  # the table spans far more than 5 columns

    with pytest.raises(ValueError, match="do not fit"):
        SparseParameterSet({"user": user}, 0.2, mask_init=aligned_masks({"user": torch.arange(60) % 20}, 2, 3))

    # ranked: each row's nearest group, then its second, all in one space of blocks
    ranked = {
        "user": torch.stack([torch.arange(60) % 5, (torch.arange(60) + 1) % 5], 1),
        "item": torch.stack([torch.arange(90) % 5, (torch.arange(90) + 2) % 5], 1),
    }
    masks = SparseParameterSet(
        {"user": user, "item": item}, 6 / 32, seed=4, mask_init=aligned_masks(ranked, 2, 2)
    ).masks
    assert int(masks["user"].sum()) == 6 * 60 and int(masks["item"].sum()) == 6 * 90
    overlap = masks["user"].float() @ masks["item"].float().T
    blocks_shared = (ranked["user"][:, None, :, None] == ranked["item"][None, :, None, :]).sum((-1, -2))
    assert bool((overlap == 2 + 2 * blocks_shared).all())  # shared columns + 2 per block both rows hold


@pytest.mark.parametrize("kw", [{"n_negatives": 4}, {"loss": "softmax", "n_negatives": 16}])
def test_loss_options_learn_block_structure(kw: dict[str, object]) -> None:
    """BPR over several negatives and the sampled softmax both learn which block of items each
    block of users likes, sparse or dense."""
    rng = np.random.default_rng(0)
    n_users, n_items, blocks = 200, 300, 4
    users = rng.integers(0, n_users, 6000)
    items = (users % blocks) + blocks * rng.integers(0, n_items // blocks, 6000)  # item % 4 == user % 4
    keys = np.unique(users * n_items + items)
    for density in (1.0, 0.25):
        model = SparseMF(
            n_users,
            n_items,
            dim=16,
            density=density,
            init="aligned",
            batch_size=256,
            total_steps=10 * 24,
            prune_every=50,
            seed=1,
            **cast(dict[str, Any], kw),
        )
        losses = [model.fit_epoch(users, items, keys) for _ in range(10)]
        assert losses[-1] < losses[0]
        top = model.recommend_topk(np.arange(n_users), 10)
        in_block = (top % blocks) == (np.arange(n_users) % blocks)[:, None]
        assert in_block.mean() > 0.9, (kw, density, in_block.mean())
    with pytest.raises(ValueError, match="loss"):
        SparseMF(10, 10, dim=4, loss="hinge")


def test_fused_sampled_scores_match_the_row_lookups_in_value_and_gradient() -> None:
    """The fused op that trains the softmax over many negatives must hand the tables the same
    loss terms and the same row-sparse gradients (same rows, same sums) as plain lookups."""
    model = SparseMF(50, 40, dim=8, density=0.5, loss="softmax", n_negatives=6, seed=0)
    rng = np.random.default_rng(0)
    u = torch.from_numpy(rng.integers(0, 50, 32))
    i = torch.from_numpy(rng.integers(0, 40, 32))
    j = rng.integers(0, 40, (32, 6))
    coef = torch.from_numpy(rng.normal(size=(32, 6))).float()
    out: list[tuple[float, np.ndarray, torch.Tensor, torch.Tensor]] = []
    for fused in (True, False):
        model.user.grad = model.item.grad = None
        eu = torch.nn.functional.embedding(u, model.user, sparse=True)
        pos, neg, reg_sq = model._scores(i, eu, j, fused=fused)
        total = 0.3 * pos.sum() + (coef * neg).sum() + 0.7 * reg_sq
        total.backward()
        assert model.item.grad is not None and model.user.grad is not None
        item_grad = model.item.grad.coalesce()
        out.append(
            (
                float(total.detach()),
                item_grad.indices()[0].numpy(),
                item_grad.to_dense(),
                model.user.grad.coalesce().to_dense(),
            )
        )
    (t_fused, rows_fused, item_fused, user_fused), (t_plain, rows_plain, item_plain, user_plain) = out
    assert t_fused == pytest.approx(t_plain, rel=1e-6)
    assert np.array_equal(rows_fused, rows_plain)  # the same rows are "touched" for lazy Adam
    assert torch.allclose(item_fused, item_plain, atol=1e-5)
    assert torch.allclose(user_fused, user_plain, atol=1e-5)
