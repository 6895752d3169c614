"""A small differentiable CTR model with a hidden layer, standing in for the DSL model.

Why it exists: the error memory needs *some* served model exposing ``predict_with_hidden`` to be
tested and benchmarked before ``models/dsl.py`` lands. Shape: hashed user / item / category
embeddings → MLP → ``tanh`` hidden layer → logit. ``tanh`` (not ReLU) on the last hidden layer
keeps the vectors centred around the origin, which is what signed-random-projection hashing
separates well; a ReLU layer would put every vector in one orthant.
It learns the way a deployed model does: one Adagrad step per micro-batch after the batch was
served (Adagrad because most rows are sparse embedding rows seen rarely), i.e. the *slow*
learner of ReLoop2's slow/fast pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from driftrec.contract.interaction import Interaction, stable_hash


class StandinCTR(nn.Module):
    def __init__(
        self,
        n_rows: int = 1 << 15,
        dim: int = 16,
        hidden: int = 16,
        lr: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.n_rows = n_rows
        self.hidden_dim = hidden
        self.emb = nn.Embedding(3 * n_rows, dim)
        nn.init.normal_(self.emb.weight, std=0.05, generator=gen)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 32), nn.ReLU(), nn.Linear(32, hidden), nn.Tanh())
        self.out = nn.Linear(hidden, 1)
        for layer in [*self.mlp, self.out]:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, generator=gen)
                nn.init.zeros_(layer.bias)
        self.opt = torch.optim.Adagrad(self.parameters(), lr=lr)
        self.step = 0

    def _rows(self, interactions: Sequence[Interaction]) -> torch.Tensor:
        n = self.n_rows
        rows = [
            (
                stable_hash(x.user_id, n, "u"),
                n + stable_hash(x.item_id, n, "i"),
                2 * n + stable_hash(x.category or "", n, "c"),
            )
            for x in interactions
        ]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)

    def _forward(self, interactions: Sequence[Interaction]) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.emb(self._rows(interactions)).flatten(1)
        h = self.mlp(e)
        return self.out(h).squeeze(-1), h

    def predict_with_hidden(self, interactions: Sequence[Interaction]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logit, h = self._forward(interactions)
        return torch.sigmoid(logit).double().numpy(), h.float().numpy()

    def predict_many(self, interactions: Sequence[Interaction]) -> np.ndarray:
        return self.predict_with_hidden(interactions)[0]

    def predict_one(self, interaction: Interaction) -> float:
        return float(self.predict_many([interaction])[0])

    def learn_one(self, interaction: Interaction) -> None:
        self.learn_many([interaction])

    def learn_many(self, interactions: Sequence[Interaction]) -> None:
        """One SGD step on the labelled part of the batch (its mean log-loss in ``last_loss``)."""
        batch = [x for x in interactions if x.label is not None]
        if not batch:
            return
        logit, _ = self._forward(batch)
        y = torch.tensor([float(x.label or 0) for x in batch])  # the batch holds labelled samples
        loss = nn.functional.binary_cross_entropy_with_logits(logit, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.step += 1
        self.last_loss = float(loss.detach())
