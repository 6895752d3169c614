"""The contract every online learner follows (River's verbs, one shape everywhere).

``learn_one(sample)`` / ``learn_many(samples)`` update in place and return ``None`` (River >= 0.19;
a loss, where there is one, is kept on the learner, e.g. ``DSLRecommender.last_loss``).
``predict_one(sample)`` is the learner's prediction for one sample, ``predict_many(samples)`` the
same for many, stacked into an array whose first axis is the sample. Each learner names its own
sample type: ``Interaction`` for the CTR models and peers, ``ServedSample`` for the error memories,
``FusionSample`` for the fusion weights, ``EventSeq`` for the TPPs. Predicting never changes the
learner. ``tests/test_learner_contract.py`` runs every learner through the same checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

SampleT = TypeVar("SampleT", contravariant=True)


@runtime_checkable
class OnlineLearner(Protocol[SampleT]):
    def learn_one(self, sample: SampleT) -> None: ...

    def learn_many(self, samples: Sequence[SampleT]) -> None: ...

    def predict_one(self, sample: SampleT) -> Any: ...

    def predict_many(self, samples: Sequence[SampleT]) -> np.ndarray: ...


@runtime_checkable
class Snapshottable(Protocol):
    """A learner whose state travels as bytes (versioned snapshots in Redis)."""

    def to_bytes(self) -> bytes: ...
