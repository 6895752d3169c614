"""PromptTPP: continual learning of a neural TPP with a continuous-time retrieval prompt pool.

Paper: Xue et al., "Prompt-augmented Temporal Point Process for Streaming Event Sequence",
NeurIPS 2023 (arXiv 2310.04993); official code github.com/yanyanSann/PromptTPP, on EasyTPP.

What we take from the paper / official code (``torch_pro_anhp.py``, ``torch_baselayer.py``,
``example_config/model_config.yaml``, read for this module):
* Base TPP: attention-based AttNHP (hidden 32, 2 layers, 2 heads in the official config); the
  paper also reports an NHP variant. Ours is the small AttNHP/THP-style net of ``models.tpp``.
* Pool (``ContTPromptPool``): M (key, prompt) pairs, prompt length L_p; official defaults
  M = 10, top-N = 5, L_p = 5, keys and prompts initialised U(-1, 1). Same defaults here.
* Retrieval: cosine similarity between the L2-normalised query and keys, top-N selected, their
  prompts concatenated and *prepended to the attention keys/values* (prefix tuning) of every
  attention layer; the output keeps only the event positions.
* Time enters the prompts: each prompt token is [learned type part ; temporal encoding of an
  estimated time], the official estimate being the sequence's mean inter-event gap
  (``time_delta[:, 0] + mean(time_delta)``). We add ``TE(mean gap so far)`` to every prompt token
  (our embeddings add TE to the type embedding instead of concatenating, THP-style).
* Loss: NLL - 0.1 * sum(cos(q, k_selected)) in the code, i.e. NLL + lambda * (1 - cos) up to a
  constant; lambda = 0.1 here, averaged over events and selected keys.
* No replay buffer, no task id: retrieval is driven by the data itself, at train and test time.

Deviations, and why:
1. Causal, per-event retrieval. The official query is the mean over the *whole* input sequence
   and ``batchwise_prompt=True`` then picks the prompts most frequent in the minibatch. Both let
   an event's prediction see later events of its own sequence and other users in the batch,
   which would leak labels in our next-event evaluation and make a user's propensity depend on
   who else is being scored. Our query for position i uses events 1..i only:
   ``q_i = [mean_{j<=i} type_emb(k_j) ; TE(mean gap up to i)]`` ("sequence encoding + time
   encoding"), and each position retrieves its own top-N.
2. Query is detached (as in L2P, where the query comes from a frozen model): the surrogate pulls
   keys toward queries and must not distort the embedding that defines the queries.
3. Freezing. The paper says prompts are "jointly optimised with the base TPP" and the official
   code never freezes the backbone (``freeze_backbone`` is a no-op; prompt pools are updated on
   alternate batches instead). A retrieval pool is only stable if the query function is, so by
   default (``freeze="query"``) the query function gets its own copy of the type embedding,
   snapshotted and frozen at the end of the first period (L2P's frozen query model), while the
   whole TPP (its own embedding included) keeps learning jointly with the prompts, as in the
   paper. (A first version froze the TPP's shared type embedding itself; on the Taobao stream
   that cost type accuracy.) ``freeze="none"`` is the official code. We do not reproduce the
   alternate-batch prompt updates (undocumented in the paper, no stated purpose).
4. Next-event prediction by deterministic numerical integration instead of thinning (see
   ``models.tpp``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from driftrec.models.tpp import Batch, NeuralTPP, temporal_encoding

FreezeMode = Literal["query", "none"]


class PromptPool(nn.Module):
    """M keys (for retrieval) and M prompts per attention site (for prefix tuning)."""

    def __init__(self, n_sites: int, pool_size: int, prompt_len: int, d: int, key_dim: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim).uniform_(-1.0, 1.0))
        self.prompts = nn.Parameter(torch.empty(n_sites, pool_size, prompt_len, d).uniform_(-1.0, 1.0))

    def retrieve(self, query: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, n, N) of the top-N keys and their cosine similarities (B, n, N)."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T  # (B, n, M)
        val, idx = torch.topk(sim, k=top_n, dim=-1)
        return idx, val


class PromptTPP(NeuralTPP):
    """Streaming TPP that learns period after period without storing past sequences.

    ``start_period``/``end_period`` only mark stream boundaries (they trigger the freeze after
    the first period); inference never needs to know which period a sequence came from.
    """

    def __init__(
        self,
        n_types: int,
        hidden: int = 32,
        pool_size: int = 10,
        top_n: int = 5,
        prompt_len: int = 5,
        key_weight: float = 0.1,
        freeze: FreezeMode = "query",
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
        super().__init__(
            n_types,
            hidden=hidden,
            n_layers=n_layers,
            heads=heads,
            lr=lr,
            batch_size=batch_size,
            n_mc=n_mc,
            grid_size=grid_size,
            time_scale=time_scale,
            max_gap=max_gap,
            seed=seed,
            copy_history=copy_history,
            copy_lr_scale=copy_lr_scale,
        )
        if top_n > pool_size:
            raise ValueError("top_n must be <= pool_size")
        self.config.update(
            pool_size=pool_size,
            top_n=top_n,
            prompt_len=prompt_len,
            key_weight=key_weight,
            freeze=freeze,
        )
        self.top_n, self.key_weight, self.freeze = top_n, key_weight, freeze
        self.pool = PromptPool(self.net.n_sites, pool_size, prompt_len, hidden, 2 * hidden)
        # The query function's own copy of the type embedding: tied to the TPP's embedding during
        # the first period, then snapshotted and frozen, so keys keep matching the same query
        # space while the TPP's embedding goes on learning (L2P's frozen query model).
        self.query_emb = nn.Embedding(n_types, hidden)
        self.query_emb.weight.requires_grad_(False)
        self.periods_done = 0
        self._surrogate = torch.zeros(())
        self.last_selection: torch.Tensor | None = None  # (B, n, N) prompt ids, for inspection

    # -- retrieval -------------------------------------------------------------------------
    def query(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal query per position and the gap encoding used to time-stamp prompts."""
        d = self.net.d
        # freeze="none" (the official code) keeps reading the live TPP embedding; before this
        # check, "none" also switched to the frozen snapshot and so behaved exactly like "query".
        live = self.periods_done == 0 or self.freeze == "none"
        table = self.net.type_emb if live else self.query_emb
        emb = table(batch.types) * batch.mask.unsqueeze(-1)
        count = torch.arange(1, batch.types.shape[1] + 1, dtype=torch.float32).view(1, -1, 1)
        content = emb.cumsum(1) / count
        mean_gap = batch.times / (count.squeeze(-1) - 1).clamp(min=1)
        te = temporal_encoding(mean_gap, d, max_period=100.0)
        return torch.cat([content, te], dim=-1).detach(), te

    def _prefixes(self, batch: Batch) -> list[torch.Tensor]:
        q, te = self.query(batch)
        idx, sim = self.pool.retrieve(q, self.top_n)
        self.last_selection = idx
        b, n, k = idx.shape
        prefixes = []
        for site in range(self.net.n_sites):
            p = self.pool.prompts[site][idx]  # (B, n, N, L_p, d)
            prefixes.append(p.reshape(b, n, -1, self.net.d) + te.unsqueeze(2))
        valid = batch.mask.float().unsqueeze(-1)
        self._surrogate = ((1.0 - sim) * valid).sum() / (valid.sum() * k).clamp(min=1.0)
        return prefixes

    def _extra_loss(self, batch: Batch) -> torch.Tensor:
        return self.key_weight * self._surrogate

    # -- periods / freezing ----------------------------------------------------------------
    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters that stay fixed once the first period has ended (by freeze mode)."""
        if self.freeze == "none":
            return {}
        return {"query_emb.weight": self.query_emb.weight}

    def _apply_freeze(self) -> None:
        for p in self.frozen_parameters().values():
            p.requires_grad_(False)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad] + list(self.pool.parameters())

    def end_period(self) -> None:
        self.periods_done += 1
        if self.periods_done == 1:
            with torch.no_grad():
                self.query_emb.weight.copy_(self.net.type_emb.weight)
            self._apply_freeze()

    # -- serialisation ---------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "pool": self.pool.state_dict(),
            "query_emb": self.query_emb.state_dict(),
            "periods_done": torch.tensor(self.periods_done),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])
        self.query_emb.load_state_dict(state["query_emb"])
        self.periods_done = int(state["periods_done"])
        if self.periods_done >= 1:
            self._apply_freeze()


class TypeVocabulary:
    """Live category strings -> TPP type ids, first-seen order, capped with an overflow id.

    Ids must never move once handed out (the TPP's intensity heads are indexed by them), so new
    categories are appended and, once ``n_types - 1`` are taken, everything else (and a missing
    category) shares the last id ``overflow_id``.
    """

    def __init__(self, n_types: int) -> None:
        if n_types < 2:
            raise ValueError("need at least one real type and the overflow type")
        self.n_types = n_types
        self.ids: dict[str, int] = {}

    @property
    def overflow_id(self) -> int:
        return self.n_types - 1

    def add(self, category: str | None) -> int:
        """Id for ``category``, assigning the next free id on first sight."""
        if category is None:
            return self.overflow_id
        got = self.ids.get(category)
        if got is not None:
            return got
        if len(self.ids) < self.n_types - 1:
            self.ids[category] = len(self.ids)
            return self.ids[category]
        return self.overflow_id

    def lookup(self, category: str | None) -> int:
        """Id without assigning (for read-only callers such as the scoring service)."""
        if category is None:
            return self.overflow_id
        return self.ids.get(category, self.overflow_id)

    def names(self) -> list[str]:
        """Category per id (the overflow slot is named ``"<other>"``)."""
        out = [""] * self.n_types
        for k, v in self.ids.items():
            out[v] = k
        out[self.overflow_id] = "<other>"
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def to_bytes(self) -> bytes:
        return json.dumps({"n_types": self.n_types, "ids": list(self.ids)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TypeVocabulary:
        raw = json.loads(data.decode())
        vocab = cls(int(raw["n_types"]))
        for name in raw["ids"]:
            vocab.add(str(name))
        return vocab


def encode_types(vocab: TypeVocabulary, categories: list[str | None]) -> np.ndarray:
    """Vectorised ``vocab.add`` for a user's event categories."""
    return np.array([vocab.add(c) for c in categories], dtype=np.int64)
