"""The scoring core (no HTTP): the newest DSL snapshot plus one pipelined Redis read, fused by
``models/served.py`` -- the one rule the ingest fusion writer learns with and the evaluation
ablates -- so what is served has one home.

Per request: the DSL scores the candidates in process (``base`` and its hidden vectors; the LSH
memory's key snapshots hash the candidates in their own spaces, ``storage/served_memory.py``),
then one pipelined round trip reads the fusion layer's weights (the term
weights and, with ``wide.enabled``, the ids' weights: one ``MGET`` per slot), the LSH memory's
buckets, the session memory's (one per distinct candidate category) and the user's TPP
propensity. A term switched off by the settings is not read, and neither is a term whose learned
weight was exactly 0 in the last answer (the weights are read on every request, so a term is read
again from the request after its weight moves). ``compensation``, ``tpp`` and ``wide`` are logit
parts: ``logit(score) = logit(base) + compensation + tpp + wide``.

Cold start: before the trainer publishes any snapshot, ``base`` is ``serving.cold_start_base``
and the memories are not read (nothing was written: there was no hidden vector). Item
categories come from the catalog shipped with the snapshot; unknown items have no category (DSL
"unknown category" row, TPP input 0). With the DSL switched off but the memory on, the snapshot is
still used for its hidden vectors and ``base`` is the constant.

If Redis fails, the request is still answered from the in-process model (``base`` alone), flagged
degraded, and the failure is counted: scoring must not go down with the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson
from redis.asyncio import Redis

from driftrec.contract.settings import Settings
from driftrec.models.dsl import SparseScorer
from driftrec.models.error_memory import HiddenStandardizer
from driftrec.models.fusion import tpp_log_ratios
from driftrec.models.served import TermWeights, assemble
from driftrec.models.wide import FTRLParams, features_of_request, id_logits, layer_weights
from driftrec.storage.client import REDIS_ERRORS, MultiGet, connect, is_cluster
from driftrec.storage.event_state import StateKeys
from driftrec.storage.served_memory import Keyed, KeyView, KeyViews, MemoryRead, session_memory_keys
from driftrec.storage.snapshots import SnapshotKeys, load_snapshot
from driftrec.storage.wide import WideStore, unpack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedSnapshot:
    """One immutable snapshot: swapped in whole, so a request sees one version end to end."""

    version: int
    model: SparseScorer
    catalog: dict[str, str]  # item_id → category, the items the trainer has seen
    standardizer: HiddenStandardizer | None = None  # this snapshot's hidden statistics
    # the LSH memory's key snapshots, current first (storage/served_memory.py); () = not read
    key_views: tuple[KeyView, ...] = ()


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


REDIS_DOWN = "redis unreachable: the model's score alone, no fusion layer, memory or TPP term"
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
        self.session_keys = session_memory_keys(settings)
        self.wide_store = WideStore(self.redis, settings.key_prefix, settings.dedup_ttl_s, settings.state_ttl_s)
        self.wide_params = FTRLParams(**settings.wide.ftrl_params())
        self.current: LoadedSnapshot | None = None
        self.key_views = KeyViews(self.redis, settings)
        self.term_weights: TermWeights | None = None  # the fusion weights the last answer read
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
                views = await self.key_views.resolve(version, parts, loaded.model, loaded.standardizer)
                loaded = replace(loaded, key_views=views)
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
        stats = parts.get("hidden_stats")
        standardizer = HiddenStandardizer.from_bytes(stats) if stats else None
        return LoadedSnapshot(version=version, model=model, catalog=catalog, standardizer=standardizer)

    async def redis_answers(self, timeout_s: float = 1.0) -> bool:
        """Whether Redis answers a PING now (the health check's truthful part)."""
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout_s))
        except Exception:  # any failure to answer is "no"
            return False

    # ---- scoring -------------------------------------------------------------------------------
    def _reads_term(self, weight: float) -> bool:
        """Whether to read a term's state: not while its learned weight is exactly 0 (the weights
        of the last answer; the fusion layer at ingest still learns it, so the weight can move)."""
        return self.term_weights is None or weight != 0.0

    async def score(self, user_id: str, candidates: Sequence[str], ts: float | None = None) -> ScoreResult:
        """Fused scores of the distinct candidates, best first (``models/served.py`` has the rule)."""
        started = time.perf_counter()
        now = time.time() if ts is None else float(ts)
        s = self.settings
        eps = s.serving.eps
        snap = self.current
        items = list(dict.fromkeys(candidates))
        n = len(items)
        cats: list[str | None] = [snap.catalog.get(i) for i in items] if snap else [None] * n
        last = self.term_weights or TermWeights()

        use_model = snap is not None and (s.dsl.enabled or s.memory.enabled)
        hidden = None
        if snap is not None and use_model:
            probs, hidden = snap.model.score_candidates(user_id, items, cats)
        base = probs if (use_model and s.dsl.enabled) else np.full(n, s.serving.cold_start_base, dtype=np.float64)

        # one pipelined round trip: the fusion layer's weights, the memory buckets and the user's
        # TPP propensity (on a Redis Cluster one MGET per slot, sent to each node in parallel)
        wide_names, wide_multi = self.wide_store.reads(
            user_id, features_of_request(user_id, items, cats, ids=s.wide.enabled)
        )
        memory_on = s.memory.enabled and snap is not None and n > 0
        keyed: list[Keyed] = []
        if memory_on and snap is not None and hidden is not None and self._reads_term(last.memory):
            for view in snap.key_views:  # each key snapshot's buckets, hashed in its own space
                h = view.keyed(hidden) if view.version == snap.version else view.of_candidates(user_id, items, cats)
                keyed.append((view, h))
        session_on = memory_on and s.memory.session_capacity > 0 and self._reads_term(last.session)
        pairs = [(user_id, c) for c in cats] if session_on else None
        mem = MemoryRead(s, keyed, pairs, self.cluster, self.session_keys)
        tpp_read = s.tpp.enabled and self._reads_term(last.tpp)
        tpp_multi = MultiGet([self.state_keys.user_tpp(user_id)] if tpp_read else [], self.cluster)
        replies: list[Any] = []
        redis_ok = True
        pipe = self.redis.pipeline(transaction=False)
        for read in (wide_multi, mem, tpp_multi):
            read.queue(pipe)
        try:
            replies = await asyncio.wait_for(pipe.execute(), s.serving.redis_deadline_s)
        except READ_FAILURES as exc:
            redis_ok = False
            self.stats.redis_errors += 1
            self.stats.last_redis_error_at = time.time()
            log.warning("redis read failed, scoring with the model alone: %s", exc)

        weights = TermWeights()  # all 0 when nothing could be read: the model's score alone
        ids = np.zeros(n)
        memory = session = None
        ratios = None
        if redis_ok:
            n_wide, n_mem = len(wide_multi), len(mem)
            wide_values = wide_multi.values(replies[:n_wide])
            try:
                weight = layer_weights(
                    self.wide_params, {f: unpack(v) for f, v in zip(wide_names, wide_values) if v is not None}
                )
                weights = self.term_weights = TermWeights.of(weight)  # the next request's read plan too
                if s.wide.enabled:
                    ids = id_logits(weight, user_id, items, cats)
            except ValueError as exc:
                self.stats.wide_parse_errors += 1
                log.warning("unreadable fusion weights for user %r: %s", user_id, exc)
            sums = mem.sums(replies[n_wide : n_wide + n_mem], now=now)
            memory = None if sums.lsh is None else sums.lsh.estimate
            session = None if sums.session is None else sums.session.estimate
            if tpp_read:
                sv = s.serving
                try:
                    ratios = np.clip(
                        tpp_log_ratios(tpp_multi.values(replies[n_wide + n_mem :])[0], cats, now, tau_s=sv.tpp_tau_s),
                        -sv.tpp_clip,
                        sv.tpp_clip,
                    )
                except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
                    self.stats.tpp_parse_errors += 1
                    log.warning("unreadable tpp propensity for user %r: %s", user_id, exc)

        terms = assemble(base, ids, weights, eps, tpp_ratio=ratios, memory=memory, session=session)
        score = terms.score
        order = np.argsort(-score, kind="stable")
        return ScoreResult(
            user_id=user_id,
            model_version=snap.version if snap else None,
            item_ids=[items[j] for j in order.tolist()],
            score=score[order],
            base=base[order],
            compensation=terms.compensation[order],
            tpp=terms.tpp[order],
            wide=terms.wide[order],
            took_ms=(time.perf_counter() - started) * 1000.0,
            redis_ok=redis_ok,
        )
