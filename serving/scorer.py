"""The scoring core (no HTTP): newest DSL snapshot + ReLoop2 error memory + TPP propensity.

Fusion rule (per candidate ``i`` of user ``u`` at request time ``ts``)
----------------------------------------------------------------------
::

    base_i = DSL probability of (u, i, category(i))            if settings.dsl.enabled and a snapshot
           = settings.serving.cold_start_base (0.5)            otherwise
    comp_i = clip(base_i + λ·ê_i + μ·ĉ_i, eps, 1 − eps) − base_i
                                                               if settings.memory.enabled and a snapshot
           = 0                                                 otherwise           (probability space)
    tpp_i  = clip(w · exp(−max(ts − tpp.ts, 0)/τ) · ln(K · p_u(category(i))), −c, c)
                                                               if settings.tpp.enabled, the user has a
                                                               propensity and it names category(i)
           = 0                                                 otherwise                 (logit space)
    wide_i = layer_i − (logit(clip(base_i + comp_i, eps, 1 − eps)) + tpp_i)
                                                               if settings.wide.enabled (0 otherwise)
    layer_i = logit(base_i) + w_m·logit(base_i) + w_e·e_i + w_s·s_i + w_t·t_i + Σ_f w_f(u, i, category(i))
    score_i = sigmoid(logit(clip(base_i + comp_i, eps, 1 − eps)) + tpp_i + wide_i)

with ``λ`` the error memory's weight the trainer learned and published with the snapshot
(``models/fusion.MemoryLambda``; ``memory.lambda`` before any is learned or when
``memory.learn_lambda`` is off), ``ê`` the memory's shrunk error estimate (see
``models/error_memory.py``), ``ĉ`` the session memory's estimate from this user's recent served
errors in category(i) and ``μ`` its learned weight (``models/error_memory.py``; ``memory.session_lambda``
before any is learned), ``w`` the TPP weight, learned likewise (``serving.tpp_weight`` before
any is learned or when ``serving.learn_tpp_weight`` is off), ``τ = serving.tpp_tau_s``,
``c = serving.tpp_clip``, ``K`` the TPP's number of event types.

Why these spaces: the error memory estimates ``y − ŷ`` in probability units, so its correction is
added there (ReLoop2's formulation). The TPP says how much *more likely than uniform* the user's
next event is of this category (``K·p`` = 1 for a uniform guess, so ``ln`` is 0 then); that is a
likelihood ratio, which composes additively with a logit. The decay forgets a propensity as the
user's last event recedes, and the clip keeps one confident TPP from overriding the CTR model.
With the wide layer on (the default), the served score is the layer's: a per-event FTRL that
ingest steps on the DSL logit (``models/wide.py``). Its one-hot weights carry what the user's
session and the item did in the last seconds; ``w_m``, ``w_e``, ``w_s``, ``w_t`` weigh the DSL
logit and, with ``wide.term_inputs`` (off by default: it lost on the dev segment), the two
memories' estimates ``ê``, ``ĉ`` (as logit deltas ``e``, ``s`` at unit weight) and the TPP log
ratio ``t``, learned per event, so what the ids already carry is not counted twice.
``compensation`` and ``tpp`` stay the terms as the trainer's weights fuse them (the
``full-wide`` ablation), and ``wide`` is what the layer changes beyond them, so the four parts
still add up to the score. Until the layer has learned anything the score is ``base``.
``score`` is a probability by construction whatever the inputs (each term is bounded and the
logit argument is kept in ``[eps, 1 − eps]``).

Cold start: before the trainer publishes any snapshot, ``base`` is a constant, so the ranking
comes from the TPP alone (and is flat for unknown users). Item categories come from the catalog
shipped with the snapshot; unknown items have no category (DSL "unknown category" row, tpp 0).
With the DSL switched off but the memory on, the snapshot is still used for its hidden vectors
(the memory is keyed by them) and ``base`` is the constant.

Per request the Redis work is one pipelined round trip: the error-memory ``MGET``, the session
memory's ``MGET`` (one bucket per distinct candidate category), the user's TPP ``GET`` and the
wide model's features (``MGET`` per slot: the user's, and the item shards'). If
Redis fails, the request is still answered from the in-process model
(compensation and tpp 0) and the failure is counted; scoring must not go down with the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from redis.asyncio import Redis

from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import HiddenStandardizer, RandomProjectionLSH, compensation_delta
from driftrec.models.fusion import MemoryLambda, TPPWeight, read_fusion, tpp_log_ratios
from driftrec.models.wide import FTRLParams, features_of_request, offset_logit, term_inputs, wide_terms
from driftrec.storage.client import REDIS_ERRORS, MultiGet, connect, is_cluster
from driftrec.storage.error_memory import (
    BucketNames,
    MemoryKeys,
    estimates_from_values,
    plan_buckets,
    plan_session_buckets,
)
from driftrec.storage.event_state import StateKeys
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot
from driftrec.storage.wide import WideStore, unpack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedSnapshot:
    """One immutable snapshot: swapped in whole, so a request sees one version end to end."""

    version: int
    model: SparseScorer
    catalog: dict[str, str]  # item_id → category, the items the trainer has seen
    names: BucketNames | None  # error-memory key table for this model's hidden dim
    standardizer: HiddenStandardizer | None = None  # hidden statistics the memory was hashed with
    tpp_weight: float | None = None  # learned by the trainer (models/fusion.py); None: use the setting
    memory_lambda: float | None = None  # likewise for the error memory's λ
    session_lambda: float | None = None  # and for the session memory's μ


@dataclass
class ScoreResult:
    """Scores in response order (descending ``score``); ``to_json`` is the API body."""

    user_id: str
    model_version: int | None
    item_ids: list[str]
    score: np.ndarray
    base: np.ndarray
    compensation: np.ndarray
    tpp: np.ndarray
    wide: np.ndarray
    took_ms: float
    redis_ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        items = [
            {"item_id": i, "score": s, "base": b, "compensation": c, "tpp": t, "wide": w}
            for i, s, b, c, t, w in zip(
                self.item_ids,
                self.score.tolist(),
                self.base.tolist(),
                self.compensation.tolist(),
                self.tpp.tolist(),
                self.wide.tolist(),
            )
        ]
        return {
            "user_id": self.user_id,
            "model_version": self.model_version,
            "items": items,
            "took_ms": self.took_ms,
            "degraded": bool(self.degraded_reasons),
            "degraded_reasons": self.degraded_reasons,
        }

    @property
    def degraded_reasons(self) -> list[str]:
        """What this answer lacks (empty: nothing); a caller may prefer its own fallback then."""
        return [] if self.redis_ok else [REDIS_DOWN]

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


REDIS_DOWN = "redis unreachable: no error-memory or TPP correction"
READ_FAILURES: tuple[type[BaseException], ...] = (*REDIS_ERRORS, TimeoutError)  # a failed or too slow read


@dataclass
class ScorerStats:
    """Counters the HTTP layer exports; plain ints so the core stays free of Prometheus."""

    reloads: int = 0
    reload_failures: int = 0
    redis_errors: int = 0
    tpp_parse_errors: int = 0
    wide_parse_errors: int = 0
    loaded_at: float | None = None
    last_redis_error_at: float | None = None  # a score request's or a snapshot poll's Redis failure
    last_bad_snapshot_at: float | None = None

    def degraded(self, now: float, window_s: float = 60.0) -> list[str]:
        """Why scoring is degraded now (empty: it is not), from failures within ``window_s``."""
        reasons = []
        if self.last_redis_error_at is not None and now - self.last_redis_error_at < window_s:
            reasons.append("redis unreachable: scores carry no memory or tpp correction, snapshots do not reload")
        if self.last_bad_snapshot_at is not None and now - self.last_bad_snapshot_at < window_s:
            reasons.append("the newest snapshot is unusable: an older one is served")
        return reasons


def fuse(
    base: np.ndarray, compensation: np.ndarray, tpp: np.ndarray, eps: float, wide: np.ndarray | float = 0.0
) -> np.ndarray:
    """``sigmoid(logit(clip(base + compensation)) + tpp + wide)``, a probability for any finite inputs."""
    p = np.clip(base + compensation, eps, 1.0 - eps)
    z = np.log(p) - np.log1p(-p) + tpp + wide
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free sigmoid


class Scorer:
    """Holds the newest snapshot and scores candidate lists with one Redis round trip each.

    Why a plain class: the HTTP app and the Kafka agent share it, and tests drive it directly.
    """

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis if redis is not None else connect(settings)
        self._owns_redis = redis is None
        self.cluster = is_cluster(self.redis)
        self.snapshot_keys = SnapshotKeys(settings.key_prefix, "dsl")
        self.state_keys = StateKeys(settings.key_prefix)
        self.memory_keys = MemoryKeys.from_settings(
            settings.key_prefix, settings.dsl.generation, settings.memory.n_shards
        )
        self.wide_store = WideStore(self.redis, settings.key_prefix, settings.dedup_ttl_s, settings.state_ttl_s)
        self.wide_params = FTRLParams(**settings.wide.ftrl_params())
        self.current: LoadedSnapshot | None = None
        self.stats = ScorerStats()
        self._bad_version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()

    # ---- lifecycle -----------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        return self.current.version if self.current else None

    def contributions(self) -> dict[str, bool]:
        s = self.settings
        return {"dsl": s.dsl.enabled, "memory": s.memory.enabled, "tpp": s.tpp.enabled, "wide": s.wide.enabled}

    async def start(self) -> None:
        """Load what is there now and keep polling for newer snapshots in the background."""
        try:
            await self.refresh()
        except REDIS_ERRORS as exc:
            log.warning("initial snapshot load failed (will retry): %s", exc)
        if self.settings.serving.reload_every_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._reload_loop(), name="driftrec-snapshot-reload")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_redis:
            await self.redis.aclose()

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.serving.reload_every_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.stats.last_redis_error_at = time.time()
                log.warning("snapshot reload failed: %s", exc)
            except Exception as exc:
                log.warning("snapshot reload failed: %s", exc)

    async def refresh(self) -> bool:
        """Swap in the newest snapshot if there is a newer one; True if the version changed."""
        async with self._refresh_lock:
            found = await load_snapshot(self.redis, self.snapshot_keys, newer_than=self.version)
            if found is None or found[0] == self._bad_version:
                return False
            version, parts = found
            try:
                loaded = await asyncio.to_thread(self._build, version, parts)
            except Exception as exc:
                self._bad_version = version
                self.stats.last_bad_snapshot_at = time.time()
                self.stats.reload_failures += 1
                log.error("snapshot %s is unusable, keeping %s: %s", version, self.version, exc)
                return False
            self.current = loaded
            self.stats.reloads += 1
            self.stats.loaded_at = time.time()
            log.info("loaded DSL snapshot %s (%d catalog items)", version, len(loaded.catalog))
            return True

    def _build(self, version: int, parts: dict[str, bytes]) -> LoadedSnapshot:
        model = SparseScorer.from_bytes(parts["model"])
        catalog_raw = orjson.loads(parts["catalog"]) if parts.get("catalog") else {}
        if not isinstance(catalog_raw, dict):
            raise ValueError("catalog must be a JSON object item_id → category")
        catalog = {str(k): str(v) for k, v in catalog_raw.items() if v is not None}
        names = self.current.names if self.current and self.current.model.hidden == model.hidden else None
        if names is None:
            m = self.settings.memory
            lsh = RandomProjectionLSH(
                dim=model.hidden,
                n_tables=m.n_tables,
                n_bits=m.n_bits,
                seed=m.seed,
                version=self.settings.dsl.generation,
            )
            names = BucketNames(self.memory_keys, lsh)
        stats = parts.get("hidden_stats")
        standardizer = HiddenStandardizer.from_bytes(stats) if stats else None
        fusion = read_fusion(parts.get("fusion"))
        tpp = TPPWeight.from_dict(fusion) if self.settings.serving.learn_tpp_weight else None
        lam = MemoryLambda.from_dict(fusion) if self.settings.memory.learn_lambda else None
        mu = MemoryLambda.from_dict(fusion, key="session") if self.settings.memory.learn_lambda else None
        return LoadedSnapshot(
            version=version,
            model=model,
            catalog=catalog,
            names=names,
            standardizer=standardizer,
            tpp_weight=tpp.w if tpp else None,
            memory_lambda=lam.lam if lam else None,
            session_lambda=mu.lam if mu else None,
        )

    async def redis_answers(self, timeout_s: float = 1.0) -> bool:
        """Whether Redis answers a PING now (the health check's truthful part)."""
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout_s))
        except Exception:  # any failure to answer is "no"
            return False

    # ---- scoring -------------------------------------------------------------------------------
    async def score(self, user_id: str, candidates: Sequence[str], ts: float | None = None) -> ScoreResult:
        """Fused scores of the distinct candidates, best first (see the module doc for the rule)."""
        started = time.perf_counter()
        now = time.time() if ts is None else float(ts)
        s = self.settings
        eps = s.serving.eps
        snap = self.current
        items = list(dict.fromkeys(candidates))
        n = len(items)
        cats: list[str | None] = [snap.catalog.get(i) for i in items] if snap else [None] * n

        use_model = snap is not None and (s.dsl.enabled or s.memory.enabled)
        hidden = None
        if snap is not None and use_model:
            probs, hidden = snap.model.score_candidates(user_id, items, cats)
        base = probs if (use_model and s.dsl.enabled) else np.full(n, s.serving.cold_start_base, dtype=np.float64)

        # one pipelined round trip: memory buckets + the user's TPP propensity (on a Redis Cluster
        # one MGET per slot, sent to each node in parallel by the cluster pipeline)
        plan = None
        reads: list[MultiGet] = []
        if s.memory.enabled and snap is not None and snap.names is not None and hidden is not None and n:
            keyed = snap.standardizer.transform(hidden) if snap.standardizer is not None else hidden
            plan = plan_buckets(snap.names, keyed)
            reads.append(MultiGet(plan.names, self.cluster))
        session_plan = None
        if plan is not None and s.memory.session_capacity > 0:
            session_plan = plan_session_buckets(self.memory_keys, [(user_id, c) for c in cats])
            reads.append(MultiGet(session_plan.names, self.cluster))
        tpp_read = None
        if s.tpp.enabled:
            tpp_read = len(reads)
            reads.append(MultiGet([self.state_keys.user_tpp(user_id)], self.cluster))
        wide_read: int | None = None
        wide_names: list[str] = []
        if s.wide.enabled and n:
            wide_read = len(reads)
            wide_names, wide_multi = self.wide_store.reads(user_id, features_of_request(user_id, items, cats))
            reads.append(wide_multi)
        replies: list[list[bytes | None]] = []
        redis_ok = True
        if reads:
            pipe = self.redis.pipeline(transaction=False)
            for read in reads:
                read.queue(pipe)
            try:
                raw = await asyncio.wait_for(pipe.execute(), s.serving.redis_deadline_s)
            except READ_FAILURES as exc:
                redis_ok = False
                self.stats.redis_errors += 1
                self.stats.last_redis_error_at = time.time()
                log.warning("redis read failed, scoring without memory/tpp: %s", exc)
            else:
                at = 0
                for read in reads:
                    replies.append(read.values(raw[at : at + len(read)]))
                    at += len(read)

        compensation = np.zeros(n)
        tpp = np.zeros(n)
        wide = np.zeros(n)
        e_hat, c_hat, ratios = np.zeros(n), np.zeros(n), np.zeros(n)  # the wide layer's term inputs
        if replies:
            if plan is not None and snap is not None:  # a plan is only made from a snapshot's hidden vectors
                m = s.memory
                e_hat, _ = estimates_from_values(
                    replies[0], plan, base, gamma=m.gamma, prior=m.prior, half_life_s=m.half_life_s, now=now
                )
                lam = snap.memory_lambda if snap.memory_lambda is not None else m.lambda_
                correction = lam * e_hat
                if session_plan is not None:
                    c_hat, _ = estimates_from_values(
                        replies[1], session_plan, base, gamma=m.session_gamma, prior=m.prior
                    )
                    mu = snap.session_lambda if snap.session_lambda is not None else m.session_lambda
                    correction = correction + mu * c_hat
                compensation = compensation_delta(base, correction, 1.0, eps)
            if tpp_read is not None:
                try:
                    weight = (
                        snap.tpp_weight if snap is not None and snap.tpp_weight is not None else s.serving.tpp_weight
                    )
                    sv = s.serving
                    ratios = np.clip(
                        tpp_log_ratios(replies[tpp_read][0], cats, now, tau_s=sv.tpp_tau_s), -sv.tpp_clip, sv.tpp_clip
                    )
                    tpp = np.clip(weight * ratios, -sv.tpp_clip, sv.tpp_clip)  # = tpp_terms(...)
                except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
                    self.stats.tpp_parse_errors += 1
                    log.warning("unreadable tpp propensity for user %r: %s", user_id, exc)

            if wide_read is not None:
                try:
                    values = {f: unpack(v) for f, v in zip(wide_names, replies[wide_read]) if v is not None}
                    terms = term_inputs(base, e_hat, c_hat, ratios, eps) if s.wide.term_inputs else None
                    dsl_logits = offset_logit(base, eps)
                    layer = dsl_logits + wide_terms(self.wide_params, values, user_id, items, cats, dsl_logits, terms)
                    # reported beyond the other terms as the trainer's weights fuse them, so the
                    # parts still add up to the score (module doc)
                    wide = layer - (offset_logit(base + compensation, eps) + tpp)
                except ValueError as exc:
                    self.stats.wide_parse_errors += 1
                    log.warning("unreadable wide features for user %r: %s", user_id, exc)

        score = fuse(base, compensation, tpp, eps, wide)
        order = np.argsort(-score, kind="stable")
        return ScoreResult(
            user_id=user_id,
            model_version=snap.version if snap else None,
            item_ids=[items[j] for j in order.tolist()],
            score=score[order],
            base=base[order],
            compensation=compensation[order],
            tpp=tpp[order],
            wide=wide[order],
            took_ms=(time.perf_counter() - started) * 1000.0,
            redis_ok=redis_ok,
        )
