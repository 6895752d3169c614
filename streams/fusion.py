"""The fusion weights' stream side: turn a served batch into ``FusionSample``s and learn them.

Why its own learner (``models.fusion.FusionWeights``) rather than lines inside the DSL trainer:
λ, μ and the TPP weight are a model of their own (how much to trust each correction), with their
own state and snapshot part. They learn from what was *served*, so the trainer hands over the
served snapshot's predictions and the memories' estimates read before the batch was written;
this module adds the TPP feature from each user's stored propensity and steps the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
from redis.asyncio import Redis

from driftrec.contract.events import Event
from driftrec.contract.settings import Settings
from driftrec.models.fusion import FusionSample, FusionWeights, MemoryLambda, TPPWeight, tpp_log_ratios
from driftrec.storage.error_memory import MemoryEstimates
from driftrec.storage.event_state import StateKeys


def fusion_weights(settings: Settings) -> FusionWeights:
    """The weights the settings ask to learn (a part stays ``None`` where its term is off)."""
    sv, mem = settings.serving, settings.memory
    learn_memory = mem.enabled and mem.learn_lambda
    return FusionWeights(
        tpp=TPPWeight(w=sv.tpp_weight, clip=sv.tpp_clip) if sv.learn_tpp_weight and settings.tpp.enabled else None,
        memory=MemoryLambda(lam=mem.lambda_, eps=sv.eps) if learn_memory else None,
        session=MemoryLambda(lam=mem.session_lambda, eps=sv.eps, key="session")
        if learn_memory and mem.session_capacity > 0
        else None,
        eps=sv.eps,
    )


class FusionLearner:
    """Learns ``FusionWeights`` from served batches; its ``to_dict`` is the snapshot's ``fusion`` part."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.state_keys = StateKeys(settings.key_prefix)
        self.weights = fusion_weights(settings)

    @property
    def enabled(self) -> bool:
        return self.weights.enabled

    async def learn(self, labelled: Sequence[Event], probs: np.ndarray, estimates: MemoryEstimates | None) -> None:
        """One test-then-train step on a batch the served snapshot scored ``probs``."""
        if not labelled or not self.weights.enabled:
            return
        n = len(labelled)
        e_hat = estimates.lsh if estimates is not None else np.zeros(n)
        c_hat = estimates.session if estimates is not None else np.zeros(n)
        feature = await self._tpp_features(labelled) if self.weights.tpp is not None else np.zeros(n)
        self.weights.learn_many(
            [
                FusionSample(base=float(p), label=e.label, memory=float(m), session=float(s), tpp=float(f))
                for e, p, m, s, f in zip(labelled, probs, e_hat, c_hat, feature)
            ]
        )

    async def _tpp_features(self, labelled: Sequence[Event]) -> np.ndarray:
        """The TPP log-ratio feature per event, from the user's propensity *before* the event.

        A user's stored propensity is used only if it was computed before the event (its ``ts``
        is earlier): the TPP agent runs beside the trainer and may already have learned the batch.
        """
        feature = np.zeros(len(labelled))
        users = list(dict.fromkeys(e.user_id for e in labelled if e.category))
        if not users:
            return feature
        pipe = self.redis.pipeline(transaction=False)
        for u in users:
            pipe.get(self.state_keys.user_tpp(u))
        stored: dict[str, tuple[bytes, float]] = {}  # user -> (payload, the propensity's ts)
        for u, raw in zip(users, await pipe.execute()):
            try:
                ts = orjson.loads(raw).get("ts") if raw else None
            except (AttributeError, orjson.JSONDecodeError):
                continue  # an unreadable propensity teaches nothing (serving treats it as absent)
            if isinstance(ts, (int, float)):
                stored[u] = (raw, float(ts))
        tau = self.settings.serving.tpp_tau_s
        for j, e in enumerate(labelled):
            raw_ts = stored.get(e.user_id)
            if e.category and raw_ts is not None and raw_ts[1] < e.ts:
                try:
                    feature[j] = tpp_log_ratios(raw_ts[0], [e.category], e.ts, tau_s=tau)[0]
                except (ValueError, TypeError):
                    continue
        return feature
