"""Metric math, the external baselines, and the prequential harness end to end.

The integration test drives the real path: ML-100K slice → real broker → real worker process
(ingest, DSL trainer, error memory, TPP) → real Redis → real scoring service process, scored
test-then-train by ``driftrec.evaluate.run_evaluation``; then it checks every component
contributed and that the report's numbers are the ones computed from what was served.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import redis

from driftrec.contract.interaction import Interaction
from driftrec.contract.settings import Settings, get_settings
from driftrec.evaluate import EvalOptions, run_evaluation, served_variants
from driftrec.models import metrics
from driftrec.report import load_served
from driftrec.storage.error_memory import KEY_SPACE
from driftrec.streams.datasets import ml100k_events

# ---------------------------------------------------------------------------------------------
# metrics: hand-worked cases


def test_auc_hand_worked_with_ties() -> None:
    # pairs (pos, neg): (0.8,0.3) win, (0.8,0.5) win, (0.5,0.3) win, (0.5,0.5) tie → 3.5 / 4
    assert metrics.auc([1, 1, 0, 0], [0.8, 0.5, 0.3, 0.5]) == pytest.approx(0.875)
    assert metrics.auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_logloss_hand_worked_and_clipped() -> None:
    expected = -(math.log(0.8) + math.log(1 - 0.4)) / 2
    assert metrics.logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)
    # a certain miss is clipped to eps, not infinite
    assert metrics.logloss([1], [0.0]) == pytest.approx(-math.log(metrics.LOGLOSS_EPS))
    assert metrics.logloss([0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_ranking_hand_worked() -> None:
    # rank 1 → NDCG 1; rank 3 → 1/log2(4) = 0.5
    assert metrics.ndcg_at_k(0, 0, 20) == 1.0
    assert metrics.ndcg_at_k(2, 0, 20) == pytest.approx(0.5)
    assert metrics.recall_at_k(19, 0, 20) == 1.0 and metrics.recall_at_k(20, 0, 20) == 0.0
    assert metrics.ndcg_at_k(20, 0, 20) == 0.0
    # all 49 negatives tied with the positive: uniform over ranks 1..50
    assert metrics.recall_at_k(0, 49, 20) == pytest.approx(20 / 50)
    assert metrics.ndcg_at_k(0, 49, 20) == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 21)) / 50)
    # ranks 2..3 equally likely
    assert metrics.ndcg_at_k(1, 1, 20) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    assert metrics.rank_counts(0.5, [0.9, 0.5, 0.1, 0.5]) == (1, 2)
    rec, nd = metrics.ranking([0, 2], [0, 0], k=20)
    assert rec == 1.0 and nd == pytest.approx(0.75)
    assert all(math.isnan(x) for x in metrics.ranking([], []))


def test_metrics_match_sklearn() -> None:
    from sklearn import metrics as sklearn_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000) * 0.5 + 0.4 * y, 2)  # rounded: many ties
    assert metrics.auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    p = np.clip(s, 0, 1)
    assert metrics.logloss(y, p) == pytest.approx(
        sklearn_metrics.log_loss(y, np.clip(p, metrics.LOGLOSS_EPS, 1 - metrics.LOGLOSS_EPS)), abs=1e-9
    )


def test_ndcg_matches_sklearn_for_one_positive() -> None:
    from sklearn import metrics as sklearn_metrics

    rng = np.random.default_rng(1)
    for _ in range(50):
        scores = rng.random(50)
        rel = np.zeros(50)
        rel[0] = 1
        g, t = metrics.rank_counts(scores[0], scores[1:])
        assert metrics.ndcg_at_k(g, t, 20) == pytest.approx(sklearn_metrics.ndcg_score([rel], [scores], k=20))


def test_sliding_windows() -> None:
    assert metrics.window_bounds(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert metrics.window_bounds(11, 4, 4) == [(0, 4), (4, 8), (7, 11)]
    assert metrics.window_bounds(3, 10) == [(0, 3)]
    y = [0, 1, 0, 1, 1, 0, 0, 1]
    s = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]
    out = metrics.sliding_auc(y, s, 4, 4)
    assert [i for i, _ in out] == [3, 7]
    assert out[0][1] == metrics.auc(y[:4], s[:4]) and out[1][1] == metrics.auc(y[4:], s[4:])
    ranked = metrics.sliding_ranking([True, False, True, True], [0, 9, 30, 0], [0, 0, 0, 0], 2, 2)
    assert ranked[0] == (1, 1.0, 1.0) and ranked[1][1] == 0.5


def test_served_variants_are_the_leave_one_out_ablations() -> None:
    base, comp, tpp = np.array([0.3, 0.9]), np.array([0.2, 0.2]), np.array([0.5, -1.0])
    wide = np.array([-0.25, 0.75])
    eps = 1e-4
    lb = np.log(base / (1 - base))

    def sig(z: np.ndarray) -> np.ndarray:
        return np.asarray(1 / (1 + np.exp(-z)))

    v = served_variants(base, comp, tpp, wide, eps)
    assert list(v) == ["base", "full-no-memory", "full-no-tpp", "full-no-wide", "full"]
    assert v["full"] == pytest.approx(sig(lb + comp + tpp + wide))
    assert v["full-no-memory"] == pytest.approx(sig(lb + tpp + wide))
    assert v["full-no-tpp"] == pytest.approx(sig(lb + comp + wide))
    assert v["full-no-wide"] == pytest.approx(sig(lb + comp + tpp))
    assert v["base"] == pytest.approx(base)


# ---------------------------------------------------------------------------------------------
# baselines learn something on a real stream


@pytest.mark.integration  # ML-100K comes from the package registry on first use
@pytest.mark.parametrize("name", ["river-lr", "river-fm", "vw"])
def test_baselines_learn_ml100k(name: str) -> None:
    from driftrec.models.baselines import make_peer

    peer = make_peer(name)
    events = ml100k_events(get_settings().data_cache, limit=6000)
    ys: list[int] = []
    ps: list[float] = []
    for e in events:
        x = e.to_interaction()
        ps.append(peer.predict_one(x))
        ys.append(int(e.label or 0))
        peer.learn_one(x)
    assert all(0.0 <= p <= 1.0 for p in ps)
    later_auc = metrics.auc(ys[3000:], ps[3000:])
    assert later_auc > 0.6, f"{name} should beat chance after learning (AUC {later_auc:.3f})"
    assert metrics.logloss(ys[3000:], ps[3000:]) < math.log(2)


def test_unknown_baseline_is_refused() -> None:
    from driftrec.models.baselines import make_peer

    with pytest.raises(ValueError, match="unknown baseline"):
        make_peer("xgboost")


# ---------------------------------------------------------------------------------------------
# the replay harness: real broker + worker + scoring service


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_prequential_harness_end_to_end(isolated: Settings, tmp_path) -> None:
    from driftrec.streams.learners import default_learners

    out = tmp_path / "report"
    opts = EvalOptions(namespace=False, progress=False, window=250, rank_fraction=0.5)
    html = run_evaluation(isolated, "ml-100k", out, limit=3000, options=opts)
    assert html.is_file() and html.read_text().count("data:image/png;base64,") == 4
    report = orjson.loads((out / "report.json").read_bytes())
    run = report["run"]

    # every event went through the worker, each learner contributed
    wm = run["worker_metrics"]
    assert wm["driftrec_events_processed_total"] == 3000
    assert wm['driftrec_learner_events_total{learner="trainer"}'] == 3000
    # the error memory is written by the trainer (see streams/memory_agent.py): its keys and the
    # non-zero served compensation below are what prove it contributed
    r = redis.Redis.from_url(isolated.redis_url)
    assert int(r.get(f"{isolated.key_prefix}:{{snap:dsl}}:latest") or 0) >= 1, "no DSL snapshot published"
    assert any(True for _ in r.scan_iter(match=f"{isolated.key_prefix}:{KEY_SPACE}:*", count=1000)), (
        "no error-memory keys"
    )
    if "tpp" in default_learners(isolated):
        assert wm.get('driftrec_learner_events_total{learner="tpp"}', 0) > 0
        assert any(True for _ in r.scan_iter(match=f"{isolated.key_prefix}:{{u:*}}:tpp", count=1000))
        assert run["events_with_tpp"] > 0

    # scores were served from a real snapshot, with the memory's correction on some events
    records = load_served(out / "served.jsonl")
    assert len(records) == run["n_scored"] == 3000
    assert any(rec["model_version"] is not None for rec in records)
    assert sum(1 for rec in records if rec["served"]["compensation"] != 0.0) > 0
    # test-then-train: each event was scored while exactly the windows before its own were published
    for i, rec in enumerate(records):  # every ML-100K event is labelled, so record i is event i
        assert rec["published_before"] == (i // opts.window) * opts.window <= i

    # the report's numbers are computed from what was served
    y = [rec["label"] for rec in records]
    full = [rec["served"]["score"] for rec in records]
    assert report["variants"]["full"]["auc"] == pytest.approx(metrics.auc(y, full), abs=1e-6)
    base = [rec["served"]["base"] for rec in records]
    assert report["variants"]["base"]["logloss"] == pytest.approx(metrics.logloss(y, base), abs=1e-6)
    ranked = [rec for rec in records if rec["ranked"]]
    assert ranked and all(rec["n_candidates"] == 50 for rec in ranked)
    rec20, _ = metrics.ranking([x["rank"]["full"][0] for x in ranked], [x["rank"]["full"][1] for x in ranked])
    assert report["variants"]["full"]["recall20"] == pytest.approx(rec20, abs=1e-6)
    for v in (
        "base",
        "full-no-memory",
        "full-no-tpp",
        "full-no-wide",
        "full",
        "river-lr",
        "river-fm",
        "vw",
        "river-lr@event",
        "river-fm@event",
        "vw@event",
    ):
        assert set(report["variants"][v]) == {"auc", "logloss", "recall20", "ndcg20", "events_per_s"}
        assert len(report["series"][v]["auc"]) == len(report["series"]["end_index"]) >= 2

    # synchronous: all of a window is scored by one snapshot, and the next window by a newer one
    # (the trainer publishes after every batch and the run waits until the service serves it)
    # every window was waited for until learned (lag 0) before the next one was published, so the
    # largest lag the run saw is one window's worth, and it did see one (the waits happened)
    assert run["synchronous"] is True and run["max_lag"] == 0
    assert 0 < run["max_observed_lag"] <= opts.window
    by_window: dict[int, set] = {}
    for rec in records:
        by_window.setdefault(rec["published_before"], set()).add(rec["model_version"])
    assert all(len(v) == 1 for v in by_window.values()), "a window was scored by more than one snapshot"
    versions = [next(iter(by_window[k])) for k in sorted(by_window)]
    assert versions[0] is None and all(v is not None for v in versions[1:])
    assert all(b > a for a, b in zip(versions[1:], versions[2:])), "a window was scored by a stale snapshot"

    # the peers: "<peer>" learns each window after scoring it, "<peer>@event" each event
    from driftrec.models.baselines import make_peer

    window_peer, event_peer = make_peer("river-lr"), make_peer("river-lr")
    for start in range(0, len(records), opts.window):
        chunk = records[start : start + opts.window]
        for rec in chunk:
            cat = rec["category"]
            query = Interaction(rec["user_id"], rec["item_id"], 0.0, category=cat)
            learned = Interaction(rec["user_id"], rec["item_id"], 0.0, label=rec["label"], category=cat)
            assert rec["scores"]["river-lr"] == pytest.approx(window_peer.predict_one(query), abs=1e-9)
            assert rec["scores"]["river-lr@event"] == pytest.approx(event_peer.predict_one(query), abs=1e-9)
            event_peer.learn_one(learned)
        window_peer.learn_many(
            [Interaction(r["user_id"], r["item_id"], 0.0, label=r["label"], category=r["category"]) for r in chunk]
        )


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fast_path_lag_waits_for_ingest_alone(isolated: Settings, tmp_path) -> None:
    """``fast_path_only``: after each window only ingest is awaited (the memories are current),
    while the model keeps its real cadence, so several windows share one served snapshot."""
    out = tmp_path / "report"
    opts = EvalOptions(
        namespace=False, progress=False, window=50, rank_fraction=0.0, fast_path_only=True, per_event_baselines=False
    )
    run_evaluation(isolated, "ml-100k", out, limit=1500, options=opts)
    report = orjson.loads((out / "report.json").read_bytes())
    run = report["run"]
    assert run["fast_path_only"] is True and run["synchronous"] is False and run["max_lag"] == 0
    assert run["worker_metrics"]["driftrec_events_processed_total"] == 1500
    assert 0 < run["max_observed_lag"] <= opts.window  # ingest was waited for after every window
    records = load_served(out / "served.jsonl")
    by_window: dict[int, set] = {}
    for rec in records:
        by_window.setdefault(rec["published_before"], set()).add(rec["model_version"])
    served = [v for versions in by_window.values() for v in versions if v is not None]
    assert served, "no snapshot was served at all"
    # the trainer publishes on its own cadence (5 s / 50 steps), not after every 50-event window
    assert len(set(served)) < len(by_window) - 1
    r = redis.Redis.from_url(isolated.redis_url)  # ingest wrote the served errors (the fast path)
    assert any(True for _ in r.scan_iter(match=f"{isolated.key_prefix}:{KEY_SPACE}:*", count=1000))
    assert "fast path synchronous" in (out / "report.html").read_text()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_event_time_lag_scores_each_event_with_what_was_due(isolated: Settings, tmp_path) -> None:
    """``lag_s``: each event is scored once the fast path (in this process, the worker's ingest
    code) has learned exactly the events at least ``lag_s`` older, and the peers learned the same;
    the worker only trains."""
    out = tmp_path / "report"
    opts = EvalOptions(
        namespace=False, progress=False, rank_fraction=0.0, lag_s=1.0, baselines=("ftrl",), per_event_baselines=True
    )
    run_evaluation(isolated, "ml-100k", out, limit=1500, options=opts)
    report = orjson.loads((out / "report.json").read_bytes())
    run = report["run"]
    assert run["lag_s"] == 1.0 and run["synchronous"] is False
    wm = run["worker_metrics"]
    assert wm.get("driftrec_events_processed_total", 0) == 0  # ingest ran here, not in the worker
    assert wm['driftrec_learner_events_total{learner="trainer"}'] == 1500
    records = load_served(out / "served.jsonl")
    assert len(records) == 1500  # every ML-100K event is labelled: record i is event i
    ts = [rec["ts"] for rec in records]
    for i, rec in enumerate(records):
        due = sum(1 for t in ts[:i] if t <= ts[i] - 1.0)
        assert rec["published_before"] == due, f"event {i} saw {rec['published_before']} events, {due} were due"
    # the peer learned exactly those events when the fast path did
    from driftrec.models.baselines import make_peer

    peer, event_peer, learned = make_peer("ftrl"), make_peer("ftrl"), 0
    for rec in records:
        while learned < rec["published_before"]:
            old = records[learned]
            peer.learn_one(
                Interaction(old["user_id"], old["item_id"], 0.0, label=old["label"], category=old["category"])
            )
            learned += 1
        query = Interaction(rec["user_id"], rec["item_id"], 0.0, category=rec["category"])
        assert rec["scores"]["ftrl"] == pytest.approx(peer.predict_one(query), abs=1e-12)
        assert rec["scores"]["ftrl@event"] == pytest.approx(event_peer.predict_one(query), abs=1e-12)
        event_peer.learn_one(
            Interaction(rec["user_id"], rec["item_id"], 0.0, label=rec["label"], category=rec["category"])
        )
    # the fast path wrote the wide layer and the memories; the served score used the layer
    client = redis.Redis.from_url(isolated.redis_url)
    assert any(True for _ in client.scan_iter(match=f"{isolated.key_prefix}:*:wide:*", count=1000))
    assert any(True for _ in client.scan_iter(match=f"{isolated.key_prefix}:{KEY_SPACE}:*", count=1000))
    assert sum(1 for rec in records if rec["served"]["wide"] != 0.0) > 1000
    assert "event-time lag of 1.0 s" in (out / "report.html").read_text()
