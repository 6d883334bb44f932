"""The LongRoPE factor search: it scores exactly what transformers runs, only improves, and resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import char_tokenizer, read_config
from llm_retrofit import patch
from llm_retrofit.evaluation.perplexity import token_nll
from llm_retrofit.modeling.rope import RopeShape
from llm_retrofit.modeling.rope_search import FactorEvaluator, SearchError, SearchSettings, search, segment_nll, write_factors

TARGET = 512  # the tiny model was trained (well, initialised) for 256 positions


@pytest.fixture
def documents() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (TARGET + 40,), generator=generator) for _ in range(2)]


@pytest.fixture
def evaluator(tiny_llama: Path, documents: list[torch.Tensor]) -> FactorEvaluator:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    shape = RopeShape.of(model.config.to_dict())
    return FactorEvaluator(model, documents, shape, TARGET, segments=3)


SMALL = SearchSettings(target_length=TARGET, population=4, iterations=3, mutations=3, crossovers=2, parents=2, segments=3)


def test_segments_add_up_to_one_forward_pass(evaluator: FactorEvaluator, documents: list[torch.Tensor]) -> None:
    ids = documents[0][:TARGET]
    whole = token_nll(evaluator.model, ids).double().sum().item()
    assert sum(segment_nll(evaluator.model, ids, segments=3)) == pytest.approx(whole, rel=1e-5)


def test_the_search_scores_what_transformers_runs_from_the_saved_config(
    evaluator: FactorEvaluator, tiny_llama: Path, documents: list[torch.Tensor], tmp_path: Path
) -> None:
    state = search(evaluator, SearchSettings(target_length=TARGET, population=3, iterations=0, parents=2, segments=3))
    factors = tmp_path / "factors.json"
    reported = write_factors(factors, state, evaluator, str(tiny_llama))["perplexity_at_target"]
    patched = AutoModelForCausalLM.from_pretrained(patch(tiny_llama, f"longrope:factors={factors}", output=tmp_path / "long"))
    nll = torch.cat([token_nll(patched, ids[:TARGET]) for ids in documents]).double().mean().item()
    assert math.exp(nll) == pytest.approx(reported, rel=1e-4)  # same frequencies, same attention factor


def test_the_best_fitness_only_improves(evaluator: FactorEvaluator) -> None:
    state = search(evaluator, SMALL)
    best = state.best_per_generation
    assert len(best) == SMALL.iterations + 1
    assert all(later <= earlier for earlier, later in zip(best, best[1:]))
    assert [c.nll for c in state.population] == sorted(c.nll for c in state.population)
    for candidate in state.population:
        assert candidate.factors == sorted(candidate.factors) and min(candidate.factors) >= 1.0


def test_bad_candidates_are_rejected_before_the_end_of_their_pass(evaluator: FactorEvaluator) -> None:
    state = search(evaluator, SearchSettings(target_length=TARGET, population=2, iterations=2, mutations=4, crossovers=0, parents=1, segments=3, reject_margin=0.0))
    rejected = [c for c in state.evaluated.values() if c.nll is None]
    assert state.rejected_early == len(rejected)
    assert all(len(c.checkpoints) < 3 * len(evaluator.documents) for c in rejected)


def test_resume_gives_what_an_uninterrupted_run_gives(evaluator: FactorEvaluator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uninterrupted = search(evaluator, SMALL)

    import llm_retrofit.modeling.rope_search as rope_search

    finish = rope_search._finish_generation

    def crash_after_generation_one(state, *args):
        finish(state, *args)
        if state.generation == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(rope_search, "_finish_generation", crash_after_generation_one)
    state_file = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        search(evaluator, SMALL, state_path=state_file)
    monkeypatch.setattr(rope_search, "_finish_generation", finish)
    resumed = search(evaluator, SMALL, state_path=state_file, resume=True)

    assert resumed.population[0].factors == uninterrupted.population[0].factors
    assert resumed.best_per_generation == uninterrupted.best_per_generation
    assert json.loads(state_file.read_text())["generation"] == SMALL.iterations


def test_resume_refuses_a_state_from_other_settings(evaluator: FactorEvaluator, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    search(evaluator, SearchSettings(target_length=TARGET, population=2, iterations=0, parents=2, segments=3), state_path=state_file)
    with pytest.raises(SearchError, match="other settings"):
        search(evaluator, SMALL, state_path=state_file, resume=True)


def test_documents_shorter_than_the_target_are_refused(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(SearchError, match="no document has 512 tokens"):
        FactorEvaluator(model, [torch.arange(100)], RopeShape.of(model.config.to_dict()), TARGET)


def test_longrope_can_search_while_patching(tiny_llama: Path, tmp_path: Path) -> None:
    char_tokenizer().save_pretrained(tiny_llama)
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 20))  # ~880 characters = tokens
    output = patch(tiny_llama, f"longrope:target_length={TARGET},data={text}", output=tmp_path / "long")
    rope = read_config(output)["rope_parameters"]
    assert rope["rope_type"] == "longrope" and len(rope["long_factor"]) == 8
    assert rope["long_factor"] == sorted(rope["long_factor"])


def test_a_search_while_patching_takes_its_budget_and_attention_factor_from_the_spec(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llm_retrofit.modeling.rope_search as rope_search

    searches = []

    def spy(evaluator: FactorEvaluator, settings: SearchSettings, *args, **kwargs):  # type: ignore[no-untyped-def]
        state = search(evaluator, settings, *args, **kwargs)
        searches.append((evaluator.attention_factor, settings, state.population[0].factors))
        return state

    monkeypatch.setattr(rope_search, "search", spy)
    char_tokenizer().save_pretrained(tiny_llama)
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 20))
    spec = f"longrope:target_length={TARGET},data={text},population=2,iterations=1,attention_factor=1.0"
    rope = read_config(patch(tiny_llama, spec, output=tmp_path / "long"))["rope_parameters"]

    [(attention_factor, settings, best)] = searches
    assert attention_factor == 1.0, "candidates were scored with the attention factor the saved model uses"
    assert (settings.population, settings.iterations, settings.mutations + settings.crossovers) == (2, 1, 2)
    assert rope["attention_factor"] == 1.0 and rope["long_factor"] == best


def test_a_search_budget_without_data_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from llm_retrofit import PatchSpecError

    with pytest.raises(PatchSpecError, match="population and iterations set the search's budget; they need data=DOCS"):
        patch(tiny_llama, "longrope:factors=f.json,population=4", output=tmp_path / "out")
