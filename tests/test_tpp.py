"""Fast checks of the neural TPP and PromptTPP math (CPU, one thread, < 60 s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from driftrec.models.prompt_tpp import PromptTPP, TypeVocabulary
from driftrec.models.tpp import HomogeneousPoisson, NeuralTPP, collate
from tests.conftest import SHARED_DATA

torch.set_num_threads(1)

TAOBAO = SHARED_DATA / "tpp-taobao-easytpp"


def random_sequences(n_seq: int, n_types: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_seq):
        m = int(rng.integers(3, 15))
        t = 100.0 + np.cumsum(rng.exponential(0.7, size=m))
        out.append((t, rng.integers(0, n_types, size=m).astype(np.int64)))
    return out


def load_easytpp(path: Path, limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    raw = json.loads(path.read_text())[:limit]
    return [
        (
            np.cumsum(np.asarray(s["time_since_last_event"], dtype=np.float64)),
            np.asarray(s["type_event"], dtype=np.int64),
        )
        for s in raw
    ]


def force_constant(model: NeuralTPP, rates_model_units: np.ndarray) -> None:
    """Zero the head's weights so lambda_k = softplus(b_k) + 1e-6 whatever the history."""
    with torch.no_grad():
        model.net.head.weight.zero_()
        b = torch.tensor(rates_model_units - 1e-6, dtype=torch.float64)
        model.net.head.bias.copy_(torch.log(torch.expm1(b)).float())


@pytest.mark.parametrize("time_scale", [1.0, 2.5])
def test_log_likelihood_matches_constant_intensity_by_hand(time_scale: float) -> None:
    k = 3
    rates = np.array([0.2, 0.5, 1.3])  # per caller time unit
    model = NeuralTPP(k, time_scale=time_scale, max_gap=10.0)
    force_constant(model, rates * time_scale)
    seqs = random_sequences(7, k)
    total, n = 0.0, 0
    for t, types in seqs:  # LL = sum log lambda_{k_i} - (sum_k lambda_k) * (t_n - t_1), first event conditions
        total += np.log(rates[types[1:]]).sum() - rates.sum() * (t[-1] - t[0])
        n += len(t) - 1
    assert model.log_likelihood_many(seqs) == pytest.approx(total / n, rel=1e-4, abs=1e-4)


def test_constant_intensity_predictions_follow_exponential_law() -> None:
    rates = np.array([0.5, 1.5])
    model = NeuralTPP(2, time_scale=1.0, max_gap=40.0, grid_size=400)
    force_constant(model, rates)
    times, types = model.predict_next(random_sequences(3, 2))
    last = np.array([s[0][-1] for s in random_sequences(3, 2)])
    assert np.allclose(times - last, 1.0 / rates.sum(), rtol=1e-2)  # E[gap] = 1 / total rate
    assert (types == 1).all()


def test_intensities_positive_and_finite() -> None:
    model = PromptTPP(5, seed=1)
    seqs = random_sequences(6, 5, seed=3)
    model.learn_many(seqs)
    assert model.time_scale is not None
    batch = collate(seqs, model.time_scale)
    pre = model._prefixes(batch)
    h = model.net.encode(batch, pre)
    gaps = torch.rand(h.shape[0], h.shape[1], 4) * 3
    lam = model.net.intensity_at(batch, h, h, gaps, pre)
    assert torch.isfinite(lam).all() and (lam > 0).all()
    t, k = seqs[0]
    for at in (t[-1], t[-1] + 0.01, t[-1] + 50.0):
        p = model.propensity(t, k, at)
        assert p.shape == (5,) and np.isfinite(p).all() and (p > 0).all()
    assert (model.propensity(np.zeros(0), np.zeros(0, dtype=np.int64), 1.0) > 0).all()


def test_prompts_are_retrieved_and_change_outputs() -> None:
    model = PromptTPP(4, pool_size=6, top_n=2, prompt_len=3, seed=0)
    seqs = random_sequences(5, 4)
    model.learn_many(seqs)
    t, k = seqs[1]
    before = model.propensity(t, k, t[-1] + 0.3)
    sel = model.last_selection
    assert sel is not None and sel.shape == (1, len(t), 2)
    assert int(sel.min()) >= 0 and int(sel.max()) < 6
    with torch.no_grad():
        used = torch.unique(sel)
        model.pool.prompts[:, used] += 1.0
    after = model.propensity(t, k, t[-1] + 0.3)
    assert not np.allclose(before, after)
    with torch.no_grad():  # prompts nobody retrieved must not matter
        unused = [i for i in range(6) if i not in set(sel.flatten().tolist())]
        model.pool.prompts[:, unused] += 5.0
    assert np.allclose(after, model.propensity(t, k, t[-1] + 0.3), atol=1e-6)


def test_second_period_leaves_frozen_parts_unchanged() -> None:
    model = PromptTPP(4, freeze="query", seed=0)
    model.start_period()
    model.learn_many(random_sequences(8, 4, seed=1))
    model.end_period()
    assert torch.equal(model.query_emb.weight, model.net.type_emb.weight)  # snapshot taken
    frozen = {k: v.detach().clone() for k, v in model.frozen_parameters().items()}
    emb = model.net.type_emb.weight.detach().clone()
    head = model.net.head.weight.detach().clone()
    keys = model.pool.keys.detach().clone()
    assert frozen
    model.start_period()
    model.learn_many(random_sequences(8, 4, seed=2), epochs=2)
    model.end_period()
    for name, value in model.frozen_parameters().items():
        assert torch.equal(value, frozen[name]), name
    assert not torch.equal(model.net.head.weight, head)
    assert not torch.equal(model.pool.keys, keys)
    # the TPP's own embedding keeps learning jointly, as in the paper
    assert not torch.equal(model.net.type_emb.weight, emb)


def test_serialisation_round_trip() -> None:
    seqs = random_sequences(6, 4)
    for cls in (NeuralTPP, PromptTPP):
        model = cls(4, seed=0)
        model.learn_many(seqs)
        model.end_period()
        clone = cls.from_bytes(model.to_bytes())
        t, k = seqs[2]
        assert np.allclose(model.propensity(t, k, t[-1] + 0.5), clone.propensity(t, k, t[-1] + 0.5))
        assert model.log_likelihood_many(seqs) == pytest.approx(clone.log_likelihood_many(seqs))
    assert isinstance(clone, PromptTPP) and clone.periods_done == 1
    assert not any(p.requires_grad for p in clone.frozen_parameters().values())


def test_copy_history_starts_as_the_plain_net_and_learns_to_repeat_types() -> None:
    """copy_history: zero-init (same intensities as without it), exact history features, and on
    sequences made of runs of one type it learns to predict "repeat the last type"."""
    rng = np.random.default_rng(3)
    seqs = []
    for _ in range(60):  # runs of one type; the next run's type is random
        m = int(rng.integers(6, 14))
        types = np.repeat(rng.integers(0, 6, size=m), 3)[:m].astype(np.int64)
        seqs.append((100.0 + np.cumsum(rng.exponential(1.0, size=m)), types))
    model = NeuralTPP(6, seed=0, copy_history=True)
    model._fit_scales(seqs)
    assert model.time_scale is not None
    batch = collate(seqs[:4], model.time_scale)
    h = model.net.encode(batch)
    gaps = torch.full(h.shape[:2] + (2,), 0.3)
    with_copy = model.net.intensity_at(batch, h, h, gaps, None)
    head, model.net.copy_head = model.net.copy_head, None
    torch.testing.assert_close(with_copy, model.net.intensity_at(batch, h, h, gaps, None))
    model.net.copy_head = head
    feats = model.net.history_features(batch, batch.types.shape[1])
    t0 = seqs[0][1]
    assert feats[0, 0, t0[0]] == 1 and feats[0, 2, 6 + t0[0]] == pytest.approx(float(np.mean(t0[:3] == t0[0])))
    pad = int(batch.lengths[0])
    if pad < batch.types.shape[1]:
        assert float(feats[0, pad:, :6].sum()) == 0.0  # padded positions carry no type
    model.learn_many(seqs, epochs=2)
    preds = model.predict_next_all(seqs)
    acc = float(np.mean([(p[1][:-1] == s[1][1:]).mean() for s, p in zip(seqs, preds)]))
    repeat_last = float(np.mean([(s[1][:-1] == s[1][1:]).mean() for s in seqs]))
    assert float(model.net.copy_head.weight.detach().abs().sum()) > 0  # the copy path took part
    assert acc >= repeat_last - 0.02, (acc, repeat_last)
    clone = NeuralTPP.from_bytes(model.to_bytes())
    assert clone.net.copy_head is not None
    assert model.log_likelihood_many(seqs) == pytest.approx(clone.log_likelihood_many(seqs))


@pytest.mark.parametrize("cls", [NeuralTPP, PromptTPP])
def test_copy_lr_scale_gives_the_copy_head_its_own_adam_group(cls: type[NeuralTPP]) -> None:
    """copy_lr_scale: the copy head steps at lr x scale, everything else at lr; scale 1 keeps the
    single-group optimizer; the option survives to_bytes/from_bytes."""
    seqs = random_sequences(8, 4, seed=1)
    model = cls(4, seed=0, copy_history=True, copy_lr_scale=10.0, batch_size=len(seqs))
    model.learn_many(seqs, epochs=1)  # one Adam step from the zero init
    assert model._opt is not None
    groups = model._opt.param_groups
    copy_ids = {id(p) for p in model.net.copy_head.parameters()}
    assert [g["lr"] for g in groups] == pytest.approx([3e-3, 3e-2])
    assert {id(p) for p in groups[1]["params"]} == copy_ids
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model._trainable())  # every trainable once
    # Adam's first step moves each weight with a gradient by about its group's lr.
    step = float(model.net.copy_head.weight.detach().abs().max())
    assert step == pytest.approx(3e-2, rel=0.05)
    clone = cls.from_bytes(model.to_bytes())
    assert clone.config["copy_lr_scale"] == 10.0 and clone.copy_lr_scale == 10.0
    plain = cls(4, seed=0, copy_history=True, batch_size=len(seqs))
    plain.learn_many(seqs, epochs=1)
    assert plain._opt is not None and len(plain._opt.param_groups) == 1
    assert float(plain.net.copy_head.weight.detach().abs().max()) == pytest.approx(3e-3, rel=0.05)


def test_copy_head_keeps_learning_after_the_query_freeze() -> None:
    """The default freeze only fixes the query function: the copy head keeps its own step size."""
    query = PromptTPP(4, seed=0, copy_history=True, copy_lr_scale=10.0)  # default freeze: it keeps learning
    query.start_period()
    query.learn_many(random_sequences(8, 4, seed=1))
    query.end_period()
    copy = query.net.copy_head.weight.detach().clone()
    query.learn_many(random_sequences(8, 4, seed=2))
    assert query._opt is not None and len(query._opt.param_groups) == 2
    assert not torch.equal(query.net.copy_head.weight, copy)


def test_type_vocabulary_first_seen_order_overflow_and_round_trip() -> None:
    vocab = TypeVocabulary(3)
    assert [vocab.add(c) for c in ["shoes", "books", "shoes", "toys", None]] == [0, 1, 0, 2, 2]
    assert vocab.lookup("unknown") == vocab.overflow_id == 2 and len(vocab) == 2
    clone = TypeVocabulary.from_bytes(vocab.to_bytes())
    assert clone.ids == vocab.ids and clone.names() == ["shoes", "books", "<other>"]


def test_learns_real_taobao_better_than_poisson() -> None:
    assert TAOBAO.is_dir(), f"shared data missing: {TAOBAO}"
    train = load_easytpp(TAOBAO / "train.json", 160)
    dev = load_easytpp(TAOBAO / "dev.json", 60)
    poisson = HomogeneousPoisson(17)
    poisson.learn_many(train)
    poisson_ll = poisson.log_likelihood_many(dev)
    model = PromptTPP(17, seed=0)
    model.learn_many(train, epochs=4)
    assert model.log_likelihood_many(dev) > poisson_ll
