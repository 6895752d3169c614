"""The one settings object: typos fail loudly, and the models' own defaults agree with it."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from driftrec.contract.settings import Settings
from driftrec.models.dsl import DSLRecommender
from driftrec.models.error_memory import ErrorMemory, SessionMemory
from driftrec.models.prompt_tpp import PromptTPP


def _defaults(fn: Any) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("name", ["DRIFTREC_MEMORY__LAMDA", "DRIFTREC_KAFKA_BOOTSRAP", "DRIFTREC_DSL__DENSTY"])
def test_a_misspelt_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(ValueError, match=name):
        Settings()


def test_known_variables_are_read_into_their_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTREC_MEMORY__PRIOR", "0.3")
    monkeypatch.setenv("DRIFTREC_DSL__POSITIVE_KINDS", '["click", "like"]')
    monkeypatch.setenv("DRIFTREC_DEDUP_TTL_S", "60")
    monkeypatch.setenv("DRIFTREC_TEST_ANYTHING", "the test suite's own namespace")
    s = Settings()
    assert s.memory.prior == 0.3 and s.dsl.positive_kinds == {"click", "like"} and s.dedup_ttl_s == 60
    with pytest.raises(ValueError):
        Settings(memory={"priorr": 0.3})  # a section refuses unknown keys given in code too


def test_model_defaults_agree_with_the_settings_defaults() -> None:
    s = Settings()
    dsl = _defaults(DSLRecommender)
    for key in (
        "n_rows",
        "dim",
        "density",
        "hidden",
        "lr",
        "prune_every",
        "seed",
        "head_density",
        "anneal_steps",
        "bias_lr",
    ):
        assert dsl[key] == getattr(s.dsl, key), key
    tpp = _defaults(PromptTPP)
    for key in ("hidden", "pool_size", "top_n", "prompt_len", "key_weight", "freeze", "lr", "batch_size", "seed"):
        assert tpp[key] == getattr(s.tpp, key), key
    memory = _defaults(ErrorMemory)
    # (λ is left out on purpose: the reference's λ is a fixed weight in the paper's range; the
    # served weight is learned by the fusion layer, models/served.py)
    assert (memory["capacity"], memory["prior"], memory["gamma"], memory["half_life_s"], memory["eps"]) == (
        s.memory.bucket_capacity,
        s.memory.prior,
        s.memory.gamma,
        s.memory.half_life_s,
        s.serving.eps,
    )
    session = _defaults(SessionMemory)
    assert (session["capacity"], session["gamma"]) == (s.memory.session_capacity, s.memory.session_gamma)


def test_the_readme_lists_every_setting_as_generated() -> None:
    """The README's table is ``driftrec settings --markdown``: a new setting without a comment, or
    a README not regenerated, fails here."""
    from driftrec.settings_doc import README_BEGIN, README_END, markdown, rows

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == markdown(), "regenerate the README's 'Every setting' table: driftrec settings --markdown"
    assert all(meaning for _, _, meaning in rows()), [env for env, _, meaning in rows() if not meaning]
