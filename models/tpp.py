"""A small attention-based neural temporal point process (AttNHP/THP-style) for event streams.

Why this shape:
* Events are embedded as ``type_emb(k) + TE(t - t_first)`` (sinusoidal temporal encoding, THP),
  so the model is translation-invariant in time: a user's history means the same whether it
  happened in 2013 or today.
* A causal self-attention encoder turns the history into per-event states ``h_i``. The
  intensity at an arbitrary time ``t`` in ``(t_i, t_{i+1}]`` comes from a *continuous-time
  attention* query ``h_i + TE_gap(t - t_i)`` over the encoded history (AttNHP's idea: the state
  at ``t`` is an attention read-out whose query depends on ``t``), followed by
  ``softplus`` per type, so ``lambda_k(t) > 0`` by construction.
* Every attention layer accepts per-position *prefix tokens* (extra keys/values). The base TPP
  never uses them; ``models.prompt_tpp`` inserts retrieved prompts there, so the prompt method
  and the baselines share one network and differ only in the prefix.
* Log-likelihood follows EasyTPP's convention: the first event of a sequence is conditioning,
  ``LL = sum_{i>=2} log lambda_{k_i}(t_i) - int_{t_1}^{t_n} sum_k lambda_k(t) dt``; the integral
  is by Monte Carlo (uniform samples per inter-event interval), which is exact for a constant
  intensity and unbiased otherwise.
* Times are divided by ``time_scale`` internally (fitted as the mean gap on the first batch) so
  the temporal encodings see O(1) numbers whatever the unit (hours, Unix seconds); reported
  log-likelihoods are converted back to the caller's unit (``- log(time_scale)`` per event).
* Next event: expected gap ``E[tau] = int_0^tau_max S(tau) d tau`` and type
  ``argmax_k int_0^tau_max lambda_k(tau) S(tau) d tau`` on a deterministic quadratic grid
  (denser near 0, where most gaps are), instead of EasyTPP's stochastic thinning: same target,
  reproducible numbers, no sampler to tune.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

EventSeq = tuple[np.ndarray, np.ndarray]
"""(times float64 absolute or since-start, types int64); times non-decreasing."""


def temporal_encoding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal encoding of a time in model units; dot products depend on time *differences*."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    ang = t.unsqueeze(-1) * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


@dataclass
class Batch:
    """Padded sequences in model time units (relative to each sequence's first event)."""

    times: torch.Tensor  # (B, n) float32, 0 at first event
    types: torch.Tensor  # (B, n) int64, padded with 0
    mask: torch.Tensor  # (B, n) bool, True on real events
    lengths: torch.Tensor  # (B,) int64

    @property
    def gaps(self) -> torch.Tensor:
        """Gap to the *next* event, (B, n-1); zero past the end."""
        g = self.times[:, 1:] - self.times[:, :-1]
        return g * self.mask[:, 1:]


def collate(seqs: Sequence[EventSeq], time_scale: float) -> Batch:
    n = max(1, max(len(t) for t, _ in seqs))
    b = len(seqs)
    times = np.zeros((b, n), dtype=np.float64)
    types = np.zeros((b, n), dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    for i, (t, k) in enumerate(seqs):
        m = len(t)
        if m == 0:
            continue
        rel = (np.asarray(t, dtype=np.float64) - float(t[0])) / time_scale
        times[i, :m] = rel
        times[i, m:] = rel[-1]
        types[i, :m] = k
        mask[i, :m] = True
    return Batch(
        torch.from_numpy(times).float(),
        torch.from_numpy(types),
        torch.from_numpy(mask),
        torch.from_numpy(mask.sum(1)),
    )


class PrefixAttention(nn.Module):
    """Multi-head attention whose keys/values may be extended per query position by prefixes.

    ``prefix`` has shape (B, n, P, d) in *input* space: it goes through this layer's key/value
    projections like an event would (prefix-tuning as in the official PromptTPP code), so a
    prompt is read by the same projections as the events it sits next to.
    """

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        assert d % heads == 0
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(
        self,
        query: torch.Tensor,  # (B, n, S, d): S queries share position n's history/prefix
        memory: torch.Tensor,  # (B, m, d)
        allowed: torch.Tensor,  # (B, n, m) bool
        prefix: torch.Tensor | None = None,  # (B, n, P, d)
    ) -> torch.Tensor:
        b, n, s, d = query.shape
        m = memory.shape[1]
        q = self.q(query).view(b, n, s, self.h, self.dh)
        k = self.k(memory).view(b, m, self.h, self.dh)
        v = self.v(memory).view(b, m, self.h, self.dh)
        scale = 1.0 / math.sqrt(self.dh)
        scores = torch.einsum("bnshd,bmhd->bnshm", q, k) * scale
        scores = scores.masked_fill(~allowed[:, :, None, None, :], float("-inf"))
        if prefix is not None:
            pk = self.k(prefix).view(b, n, -1, self.h, self.dh)
            pv = self.v(prefix).view(b, n, -1, self.h, self.dh)
            ps = torch.einsum("bnshd,bnphd->bnshp", q, pk) * scale
            att = torch.softmax(torch.cat([ps, scores], dim=-1), dim=-1)
            att = torch.nan_to_num(att)
            p = pk.shape[2]
            out = torch.einsum("bnshp,bnphd->bnshd", att[..., :p], pv)
            out = out + torch.einsum("bnshm,bmhd->bnshd", att[..., p:], v)
        else:
            att = torch.nan_to_num(torch.softmax(scores, dim=-1))
            out = torch.einsum("bnshm,bmhd->bnshd", att, v)
        result: torch.Tensor = self.o(out.reshape(b, n, s, d))
        return result


class AttnTPPNet(nn.Module):
    """Encoder + continuous-time attention head; ``n_sites`` = number of attention layers."""

    def __init__(
        self, n_types: int, hidden: int = 32, n_layers: int = 1, heads: int = 2, copy_history: bool = False
    ) -> None:
        super().__init__()
        self.n_types, self.d = n_types, hidden
        self.type_emb = nn.Embedding(n_types, hidden)
        self.enc = nn.ModuleList(PrefixAttention(hidden, heads) for _ in range(n_layers))
        self.enc_ff = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            for _ in range(n_layers)
        )
        self.enc_norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2 * n_layers))
        self.gap_proj = nn.Linear(hidden, hidden)
        self.ct_attn = PrefixAttention(hidden, heads)
        self.ct_norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(2 * hidden, n_types)
        # Start near a homogeneous process with total rate 1 per model time unit (= mean gap),
        # so the first epochs fit structure instead of climbing out of a wrong overall rate.
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(math.expm1(1.0 / n_types)))
        # copy_history (our option): a direct path from "which types this sequence has shown" to
        # each type's intensity. Repeating a recent type is the strongest single cue in
        # e-commerce event streams (on Taobao, "repeat the last type" beats our trained nets),
        # and a 32-d attention state learns it only slowly. Zero-init: starts as the plain net.
        self.copy_head: nn.Linear | None = None
        if copy_history:
            self.copy_head = nn.Linear(2 * n_types, n_types, bias=False)
            nn.init.zeros_(self.copy_head.weight)

    @property
    def n_sites(self) -> int:
        return len(self.enc) + 1

    def embed(self, batch: Batch) -> torch.Tensor:
        emb: torch.Tensor = self.type_emb(batch.types)
        return emb + temporal_encoding(batch.times, self.d)

    def gap_encoding(self, gap: torch.Tensor) -> torch.Tensor:
        """Encoding of elapsed time since the last event; short periods because gaps are O(1)."""
        encoded: torch.Tensor = self.gap_proj(temporal_encoding(gap, self.d, max_period=100.0))
        return encoded

    def encode(self, batch: Batch, prefixes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Causal states h_i summarising events 1..i (inclusive)."""
        x = self.embed(batch)
        n = x.shape[1]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed = causal[None] & batch.mask[:, None, :]
        allowed = allowed | torch.eye(n, dtype=torch.bool)[None]  # padded rows stay finite
        for li, (att, ff) in enumerate(zip(self.enc, self.enc_ff)):
            pre = prefixes[li] if prefixes is not None else None
            a = att(x.unsqueeze(2), x, allowed, pre).squeeze(2)
            x = self.enc_norm[2 * li](x + a)
            x = self.enc_norm[2 * li + 1](x + ff(x))
        return x

    def log_likelihood(
        self,
        batch: Batch,
        n_mc: int = 10,
        prefixes: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence LL in model units and the number of scored events (n_i - 1)."""
        h = self.encode(batch, prefixes)
        gaps = batch.gaps  # (B, n-1)
        u = torch.rand(gaps.shape + (n_mc,), generator=generator)
        query = torch.cat([gaps.unsqueeze(-1), u * gaps.unsqueeze(-1)], dim=-1)  # (B, n-1, 1+S)
        hp = h[:, :-1]
        pre = [p[:, :-1] for p in prefixes] if prefixes is not None else None
        lam = self.intensity_at(batch, h, hp, query, pre)
        valid = batch.mask[:, 1:].float()
        nxt = batch.types[:, 1:]
        lam_ev = lam[:, :, 0, :].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        ev = (torch.log(lam_ev) * valid).sum(1)
        integral = (lam[:, :, 1:, :].sum(-1).mean(-1) * gaps * valid).sum(1)
        return ev - integral, valid.sum(1)

    def intensity_at(
        self,
        batch: Batch,
        h_all: torch.Tensor,
        h_pos: torch.Tensor,
        gaps: torch.Tensor,
        prefixes: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """lambda_k at t_i + gaps[:, i, s] for the first ``h_pos.shape[1]`` positions: (B, n, S, K).

        The query ``h_i + TE_gap(gap)`` attends over the encoded history h_1..h_i (and the
        prefix), which is what makes the state a function of continuous time.
        """
        n_pos, n = h_pos.shape[1], h_all.shape[1]
        u = h_pos.unsqueeze(2) + self.gap_encoding(gaps)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[:n_pos]
        allowed = (causal[None] & batch.mask[:, None, :]) | torch.eye(n, dtype=torch.bool)[None, :n_pos]
        pre = prefixes[-1] if prefixes is not None else None
        s = self.ct_norm(u + self.ct_attn(u, h_all, allowed, pre))
        z = torch.cat([s, h_pos.unsqueeze(2).expand_as(s)], dim=-1)
        logits = self.head(z)
        if self.copy_head is not None:
            logits = logits + self.copy_head(self.history_features(batch, n_pos)).unsqueeze(2)
        return F.softplus(logits) + 1e-6

    def history_features(self, batch: Batch, n_pos: int) -> torch.Tensor:
        """(B, n_pos, 2K): one-hot of event i's type and the type frequencies over events 1..i."""
        onehot = F.one_hot(batch.types[:, :n_pos], self.n_types).float() * batch.mask[:, :n_pos, None]
        counts = onehot.cumsum(1)
        freq = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
        return torch.cat([onehot, freq], dim=-1)


class HomogeneousPoisson:
    """Per-type constant rates fitted on training sequences: the baseline any TPP must beat."""

    def __init__(self, n_types: int) -> None:
        self.n_types = n_types
        self.counts = np.zeros(n_types)
        self.duration = 0.0

    def learn_one(self, sequence: EventSeq) -> None:
        self.learn_many([sequence])

    def learn_many(self, sequences: Sequence[EventSeq]) -> None:
        for t, k in sequences:
            if len(t) < 2:
                continue
            self.counts += np.bincount(np.asarray(k[1:]), minlength=self.n_types)[: self.n_types]
            self.duration += float(t[-1] - t[0])

    @property
    def rates(self) -> np.ndarray:
        return (self.counts + 0.5) / max(self.duration, 1e-12)

    def predict_one(self, sequence: EventSeq) -> np.ndarray:
        """P(next type): the fitted rates, normalised (the same for every sequence)."""
        return np.asarray(self.rates / self.rates.sum(), dtype=np.float64)

    def predict_many(self, sequences: Sequence[EventSeq]) -> np.ndarray:
        return np.tile(self.predict_one((np.zeros(0), np.zeros(0, np.int64))), (len(sequences), 1))

    def log_likelihood_many(self, sequences: Iterable[EventSeq]) -> float:
        lr, total, n = np.log(self.rates), 0.0, 0
        for t, k in sequences:
            if len(t) < 2:
                continue
            total += lr[np.asarray(k[1:])].sum() - self.rates.sum() * float(t[-1] - t[0])
            n += len(t) - 1
        return total / max(n, 1)


class NeuralTPP:
    """Estimator wrapper (River/sklearn verbs) around ``AttnTPPNet``: the retrain/finetune baseline.

    Subclasses override ``_prefixes`` (prompt retrieval) and ``_extra_loss``.
    """

    def __init__(
        self,
        n_types: int,
        hidden: int = 32,
        n_layers: int = 1,
        heads: int = 2,
        lr: float = 3e-3,
        batch_size: int = 32,
        n_mc: int = 10,
        grid_size: int = 48,
        time_scale: float | None = None,
        max_gap: float | None = None,
        seed: int = 0,
        copy_history: bool = False,
        copy_lr_scale: float = 1.0,
    ) -> None:
        self.config: dict[str, Any] = dict(
            n_types=n_types,
            hidden=hidden,
            n_layers=n_layers,
            heads=heads,
            lr=lr,
            batch_size=batch_size,
            n_mc=n_mc,
            grid_size=grid_size,
            seed=seed,
            copy_history=copy_history,
            copy_lr_scale=copy_lr_scale,
        )
        self.n_types = n_types
        self.batch_size, self.n_mc, self.grid_size, self.lr = batch_size, n_mc, grid_size, lr
        # The copy head's Adam step size is lr * copy_lr_scale: zero-init, it gets only a few
        # hundred steps per period, too few at the net's lr to reach "repeat the last type".
        self.copy_lr_scale = copy_lr_scale
        torch.manual_seed(seed)
        self.net = AttnTPPNet(n_types, hidden, n_layers, heads, copy_history)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.time_scale = time_scale
        self.max_gap = max_gap  # caller's units; fitted on first data if None
        self.poisson = HomogeneousPoisson(n_types)
        self._opt: torch.optim.Optimizer | None = None

    # -- hooks -----------------------------------------------------------------------------
    def _prefixes(self, batch: Batch) -> list[torch.Tensor] | None:
        return None

    def _extra_loss(self, batch: Batch) -> torch.Tensor:
        return torch.zeros(())

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def _param_groups(self, params: list[nn.Parameter]) -> list[dict[str, object]]:
        """Adam groups over ``params``: the copy head (if trainable) at lr * copy_lr_scale.

        With the default scale 1 this is one group, i.e. exactly the optimizer used before the
        option existed.
        """
        copy = {id(p) for p in self.net.copy_head.parameters()} if self.net.copy_head is not None else set()
        scaled = [p for p in params if id(p) in copy]
        if self.copy_lr_scale == 1.0 or not scaled:
            return [{"params": params, "lr": self.lr}]
        rest = [p for p in params if id(p) not in copy]
        return [{"params": rest, "lr": self.lr}, {"params": scaled, "lr": self.lr * self.copy_lr_scale}]

    def start_period(self) -> None:
        """Stream-period boundary; the base model needs nothing (finetuning just continues)."""

    def end_period(self) -> None:
        """Stream-period boundary; the base model needs nothing."""

    # -- training --------------------------------------------------------------------------
    def _fit_scales(self, sequences: Sequence[EventSeq]) -> None:
        gaps = np.concatenate([np.diff(np.asarray(t, dtype=np.float64)) for t, _ in sequences])
        gaps = gaps[np.isfinite(gaps)] if len(gaps) else np.array([1.0])
        if self.time_scale is None:
            self.time_scale = float(max(gaps.mean(), 1e-9)) if len(gaps) else 1.0
        # The prediction grid must cover the longest gap seen so far, so it grows with the stream.
        seen = float(gaps.max() * 1.1) if len(gaps) else self.time_scale * 10
        self.max_gap = max(seen, self.max_gap or 0.0, 1e-9)

    def learn_one(self, sequence: EventSeq) -> None:
        self.learn_many([sequence])

    def learn_many(self, sequences: Sequence[EventSeq], epochs: int = 1) -> None:
        """One or more shuffled passes of minibatch Adam on the NLL (+ subclass terms)."""
        seqs = [s for s in sequences if len(s[0]) >= 2]
        if not seqs:
            return
        self._fit_scales(seqs)
        self.poisson.learn_many(seqs)
        params = self._trainable()
        if self._opt is None or {id(p) for g in self._opt.param_groups for p in g["params"]} != {id(p) for p in params}:
            self._opt = torch.optim.Adam(self._param_groups(params), lr=self.lr)
        self.net.train()
        scale = self.time_scale or 1.0  # fitted above
        for _ in range(epochs):
            order = self.rng.permutation(len(seqs))
            for s in range(0, len(seqs), self.batch_size):
                batch = collate([seqs[i] for i in order[s : s + self.batch_size]], scale)
                ll, n = self.net.log_likelihood(batch, self.n_mc, self._prefixes(batch), self.gen)
                loss = -ll.sum() / n.sum().clamp(min=1) + self._extra_loss(batch)
                self._opt.zero_grad()
                torch.autograd.backward(loss)
                nn.utils.clip_grad_norm_(params, 5.0)
                self._opt.step()

    # -- inference -------------------------------------------------------------------------
    def _batches(self, sequences: Sequence[EventSeq]) -> Iterable[tuple[list[int], Batch]]:
        idx = list(range(len(sequences)))
        for s in range(0, len(idx), 64):
            part = idx[s : s + 64]
            yield part, collate([sequences[i] for i in part], self.time_scale or 1.0)

    @torch.no_grad()
    def log_likelihood_many(self, sequences: Sequence[EventSeq], n_mc: int = 20) -> float:
        """Mean log-likelihood per scored event, in the caller's time unit."""
        seqs = [s for s in sequences if len(s[0]) >= 2]
        self.net.eval()
        total, count = 0.0, 0.0
        gen = torch.Generator().manual_seed(12345)
        for _, batch in self._batches(seqs):
            ll, n = self.net.log_likelihood(batch, n_mc, self._prefixes(batch), gen)
            total += float(ll.sum())
            count += float(n.sum())
        scale = self.time_scale or 1.0
        return total / max(count, 1.0) - math.log(scale)

    def _grid(self) -> torch.Tensor:
        tau_max = (self.max_gap or 10.0) / (self.time_scale or 1.0)
        return tau_max * torch.linspace(0.0, 1.0, self.grid_size) ** 2

    @torch.no_grad()
    def _next_event_all(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every position i: E[gap] (B, n) in model units, P(next type) (B, n, K) and the
        intensities on the grid (B, n, G, K)."""
        pre = self._prefixes(batch)
        h = self.net.encode(batch, pre)
        grid = self._grid()
        b, n = batch.types.shape
        lam = self.net.intensity_at(batch, h, h, grid.expand(b, n, -1), pre)  # (B,n,G,K)
        total = lam.sum(-1)
        dt = grid[1:] - grid[:-1]
        cum = torch.cat([torch.zeros(b, n, 1), torch.cumsum(0.5 * (total[..., 1:] + total[..., :-1]) * dt, -1)], -1)
        surv = torch.exp(-cum)
        exp_gap = (0.5 * (surv[..., 1:] + surv[..., :-1]) * dt).sum(-1)
        dens = lam * surv.unsqueeze(-1)
        ptype = (0.5 * (dens[..., 1:, :] + dens[..., :-1, :]) * dt[:, None]).sum(-2)
        ptype = ptype / ptype.sum(-1, keepdim=True).clamp(min=1e-12)
        return exp_gap, ptype, lam

    def predict_next_all(self, sequences: Sequence[EventSeq]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Predicted (gap in caller units, type) after each event of each sequence."""
        self.net.eval()
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0, dtype=np.int64))] * len(sequences)
        for part, batch in self._batches(sequences):
            eg, pt, _ = self._next_event_all(batch)
            for j, i in enumerate(part):
                m = len(sequences[i][0])
                out[i] = (eg[j, :m].double().numpy() * (self.time_scale or 1.0), pt[j, :m].argmax(-1).numpy())
        return out

    def predict_next(self, sequences: Sequence[EventSeq]) -> tuple[np.ndarray, np.ndarray]:
        """Expected time (absolute, caller units) and most likely type of each sequence's next event."""
        preds = self.predict_next_all(sequences)
        times = np.array([float(s[0][-1]) + p[0][-1] for s, p in zip(sequences, preds)])
        types = np.array([int(p[1][-1]) for p in preds], dtype=np.int64)
        return times, types

    @torch.no_grad()
    def propensity(self, times: np.ndarray, types: np.ndarray, at_time: float) -> np.ndarray:
        """lambda_k(at_time | events before at_time), per caller time unit, shape (n_types,).

        With no history the fitted homogeneous rates are returned, so unknown users still get a
        sensible prior instead of an error.
        """
        times = np.asarray(times, dtype=np.float64)
        types = np.asarray(types, dtype=np.int64)
        keep = times <= at_time
        times, types = times[keep], types[keep]
        if len(times) == 0 or self.time_scale is None:
            return self.poisson.rates.astype(np.float64)
        self.net.eval()
        batch = collate([(times, types)], self.time_scale)
        pre = self._prefixes(batch)
        h = self.net.encode(batch, pre)
        gap = torch.tensor((at_time - times[-1]) / self.time_scale, dtype=torch.float32)
        n = h.shape[1]
        gaps = torch.zeros(1, n, 1)
        gaps[0, -1, 0] = gap
        lam = self.net.intensity_at(batch, h, h, gaps, pre)[0, -1, 0]
        return lam.double().numpy() / self.time_scale

    @torch.no_grad()
    def intensity_many(self, sequences: Sequence[EventSeq], chunk: int = 64) -> np.ndarray:
        """lambda_k right after each sequence's last event, per caller time unit, shape (B, K).

        Same quantity as ``propensity(times, types, at_time=times[-1])`` but for many sequences in
        a few padded forward passes instead of one pass per sequence; before anything was learned,
        the homogeneous prior.
        """
        if not sequences:
            return np.zeros((0, self.n_types))
        if self.time_scale is None:
            return np.tile(self.poisson.rates.astype(np.float64), (len(sequences), 1))
        self.net.eval()
        out = []
        for s in range(0, len(sequences), chunk):
            batch = collate(list(sequences[s : s + chunk]), self.time_scale)
            pre = self._prefixes(batch)
            h = self.net.encode(batch, pre)
            b, n = batch.types.shape
            lam = self.net.intensity_at(batch, h, h, torch.zeros(b, n, 1), pre)[:, :, 0]  # (B, n, K)
            last = (batch.lengths - 1).clamp(min=0)
            out.append(lam[torch.arange(b), last].double().numpy() / self.time_scale)
        return np.concatenate(out)

    def predict_one(self, sequence: EventSeq) -> np.ndarray:
        """P(next type) right after the sequence's last event, shape (K,)."""
        return np.asarray(self.predict_many([sequence])[0])

    def predict_many(self, sequences: Sequence[EventSeq]) -> np.ndarray:
        """P(next type) right after each sequence's last event, (B, K): ``intensity_many`` normalised
        (rows of zeros where every intensity is 0)."""
        lam = self.intensity_many(sequences)
        total = lam.sum(axis=1, keepdims=True)
        return np.asarray(np.divide(lam, total, out=np.zeros_like(lam), where=total > 0), dtype=np.float64)

    # -- serialisation ---------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def to_bytes(self) -> bytes:
        """torch.save of tensors and plain numbers only, so ``from_bytes`` can use weights_only."""
        state = {
            "config": {k: v for k, v in self.config.items()},
            "net": self.net.state_dict(),
            "time_scale": -1.0 if self.time_scale is None else float(self.time_scale),
            "max_gap": -1.0 if self.max_gap is None else float(self.max_gap),
            "poisson_counts": torch.from_numpy(self.poisson.counts.copy()),
            "poisson_duration": float(self.poisson.duration),
            "extra": self._extra_state(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> NeuralTPP:
        state = torch.load(io.BytesIO(data), weights_only=True)
        config = dict(state["config"])
        if config.pop("gated", False):  # written by 0.1.x with an option since removed
            raise ValueError("this TPP snapshot uses gated prompts, which this version no longer has")
        obj = cls(**config)
        obj.net.load_state_dict(state["net"])
        obj.time_scale = None if state["time_scale"] < 0 else state["time_scale"]
        obj.max_gap = None if state["max_gap"] < 0 else state["max_gap"]
        obj.poisson.counts = state["poisson_counts"].numpy().copy()
        obj.poisson.duration = state["poisson_duration"]
        obj._load_extra_state(state["extra"])
        return obj
