"""The product benchmark's dense reference serves exactly the dense model's predictions."""

from __future__ import annotations

import numpy as np

from benchmarks.dsl_product import dense_scorer, resident_bytes
from driftrec.models.dsl import DSLRecommender, SparseScorer


def test_dense_reference_scores_like_the_model_and_holds_every_weight() -> None:
    dense = DSLRecommender(n_rows=512, dim=8, hidden=8, density=1.0, head_density=1.0, seed=1)
    sparse = DSLRecommender(n_rows=512, dim=8, hidden=8, density=0.1, head_density=0.5, seed=1)
    items = [f"i{k}" for k in range(40)]
    scorer = dense_scorer(dense.to_bytes())
    assert np.allclose(scorer.score_candidates("u1", items)[0], dense.score_candidates("u1", items)[0], atol=1e-6)
    assert resident_bytes(scorer) >= 3 * 512 * 8 * 4  # three dense 512 x 8 float32 tables at least
    assert resident_bytes(SparseScorer.from_bytes(sparse.to_bytes())) < resident_bytes(scorer)
