"""The LongRoPE factor search: it scores exactly what transformers runs, keeps the best candidate it evaluated, stops
losers early, resumes exactly (from the API and the command line), and gives the same answer on 2 processes as on 1."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import char_tokenizer, read_config, save_tiny, tiny_model
from llm_retrofit import patch
from llm_retrofit.modeling.nll import token_nll
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


def save_factors(path: Path, factors: list[float]) -> Path:
    path.write_text(json.dumps({"target_length": TARGET, "long_factor": factors}))
    return path


def vanilla_nll(model: AutoModelForCausalLM, factors: list[float], documents: list[torch.Tensor], tmp_path: Path
                ) -> float:
    """Mean NLL per token at the target length of the model patched with these long factors, as plain transformers
    computes it (`labels=` loss of one forward pass per document): nothing of the search's own scoring is used."""
    patched = patch(model, f"longrope:factors={save_factors(tmp_path / 'candidate.json', factors)}")
    with torch.no_grad():
        losses = [patched(input_ids=ids[None, :TARGET], labels=ids[None, :TARGET]).loss.item() for ids in documents]
    return sum(losses) / len(losses)  # every document has TARGET tokens: the mean of the means is the mean per token


@pytest.fixture
def rope_sensitive(tmp_path: Path) -> Path:
    """The tiny Llama with sharper attention (q and k x4) and logits (x4): at initialisation its NLL barely depends on
    the RoPE factors (candidates differ by ~1e-6 nats), here by ~1e-4 to 1e-3, well above rounding noise."""
    model = tiny_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "lm_head.weight")):
                parameter.mul_(4)
    model.save_pretrained(tmp_path / "sensitive")
    return tmp_path / "sensitive"


def test_the_search_finds_the_best_candidate_it_evaluated(
    rope_sensitive: Path, documents: list[torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brute force: every candidate the search made (rejected ones included) re-scored in full by plain transformers;
    the search's best of each generation is the best of what it had evaluated by then. With no rejection margin,
    some candidates are stopped early: none of them would have beaten the best."""
    import llm_retrofit.modeling.rope_search as rope_search

    model = AutoModelForCausalLM.from_pretrained(rope_sensitive).eval()
    # float32 throughout, as the vanilla reference computes (bf16 autocast would round differently from it)
    evaluator = FactorEvaluator(model, documents, RopeShape.of(model.config.to_dict()), TARGET, segments=3,
                                autocast="off")
    seen_by_generation: list[list[str]] = []
    finish = rope_search._finish_generation

    def record(state, *args):  # type: ignore[no-untyped-def]
        seen_by_generation.append(list(state.evaluated))
        finish(state, *args)

    monkeypatch.setattr(rope_search, "_finish_generation", record)
    settings = dataclasses.replace(SMALL, reject_margin=0.0)
    state = search(evaluator, settings)
    assert len(seen_by_generation) == settings.iterations + 1
    assert state.rejected_early > 0, "the rejected candidates are part of the brute force"

    cut = evaluator.documents
    reference = {key: vanilla_nll(model, c.factors, cut, tmp_path) for key, c in state.evaluated.items()}
    # The search's segmented KV-cached passes and transformers' single pass round float32 differently (here they
    # agree to ~5e-7 nats per token); the candidates are ~1e-4 apart, so 1e-5 cannot mistake one for another.
    tolerance = 1e-5
    for generation, keys in enumerate(seen_by_generation):
        assert state.best_per_generation[generation] == pytest.approx(min(reference[k] for k in keys), abs=tolerance)
    best = state.population[0]
    assert reference[best.key] <= min(reference.values()) + tolerance
    assert best.nll == pytest.approx(reference[best.key], abs=tolerance)
    assert len(set(round(v, 5) for v in reference.values())) > 3, "the candidates really differ: the check can fail"
    for candidate in state.population:
        assert candidate.factors == sorted(candidate.factors) and min(candidate.factors) >= 1.0


def test_bad_candidates_are_rejected_before_the_end_of_their_pass(evaluator: FactorEvaluator) -> None:
    state = search(evaluator, SearchSettings(target_length=TARGET, population=2, iterations=2, mutations=4, crossovers=0, parents=1, segments=3, reject_margin=0.0))
    rejected = [c for c in state.evaluated.values() if c.nll is None]
    assert rejected, "with no margin some child is behind the k-th best at some checkpoint: the test must see one"
    assert state.rejected_early == len(rejected)
    for candidate in rejected:
        assert len(candidate.checkpoints) < 3 * len(evaluator.documents), "it stopped before the end of its pass"
        # What it was judged on is the true running NLL: the beginning of the candidate's full, unrejected pass.
        full = evaluator.score(candidate.factors)
        assert candidate.checkpoints == full.checkpoints[: len(candidate.checkpoints)]


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
        searches.append((evaluator.attention_factor, settings, state.population[0].factors, evaluator.segments))
        return state

    monkeypatch.setattr(rope_search, "search", spy)
    char_tokenizer().save_pretrained(tiny_llama)
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 20))
    spec = f"longrope:target_length={TARGET},data={text},population=2,iterations=1,attention_factor=1.0"
    rope = read_config(patch(tiny_llama, spec, output=tmp_path / "long"))["rope_parameters"]
    patch(tiny_llama, spec + ",segments=3", output=tmp_path / "long-3")

    [(attention_factor, settings, best, segments), (*_, given)] = searches
    assert attention_factor == 1.0, "candidates were scored with the attention factor the saved model uses"
    assert (settings.population, settings.iterations, settings.mutations + settings.crossovers) == (2, 1, 2)
    assert rope["attention_factor"] == 1.0 and rope["long_factor"] == best
    assert (segments, given) == (1, 3), "one pass per candidate on a CPU unless the spec says otherwise"


def test_a_search_budget_without_data_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from llm_retrofit import PatchSpecError

    with pytest.raises(PatchSpecError, match="population, iterations and segments set the search.s budget; they need "
                       "data=DOCS"):
        patch(tiny_llama, "longrope:factors=f.json,population=4", output=tmp_path / "out")
    with pytest.raises(PatchSpecError, match="segments=0 must be at least 1"):
        patch(tiny_llama, "longrope:target_length=512,data=d.txt,segments=0", output=tmp_path / "out")


# ------------------------------------------------------------------------------------ from the command line

SEARCH = ["--target-length", str(TARGET), "--population", "4", "--mutations", "3", "--crossovers", "2",
          "--parents", "2", "--segments", "3"]


@pytest.fixture
def cli_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama of 256 positions with a character tokenizer, and two documents of 600 random characters."""
    import random
    import string

    model = save_tiny(tmp_path / "model")
    char_tokenizer().save_pretrained(model)
    rng = random.Random(0)
    data = tmp_path / "docs.jsonl"
    texts = ["".join(rng.choice(string.ascii_letters + " .,") for _ in range(600)) for _ in range(2)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return model, data


def search_rope(*arguments: str) -> str:
    from click.testing import CliRunner

    from llm_retrofit.cli import main

    done = CliRunner().invoke(main, ["search-rope", *arguments])
    assert done.exit_code == 0, done.output
    return done.output


def what_was_found(path: Path) -> dict:
    """The factors file without the wall-clock time (the one thing two runs of the same search may not share)."""
    found = json.loads(path.read_text())
    del found["search"]["seconds"]
    return found


def test_search_rope_resume_from_the_command_line_continues_where_it_stopped(
    cli_inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = cli_inputs
    common = [str(model), "-d", str(data), *SEARCH]
    search_rope(*common, "--iterations", "3", "-o", str(tmp_path / "whole.json"))

    search_rope(*common, "--iterations", "1", "-o", str(tmp_path / "part.json"))  # stopped after generation 1
    state = tmp_path / "part.json.state.json"
    assert json.loads(state.read_text())["generation"] == 1
    done_before = json.loads((tmp_path / "part.json").read_text())["search"]["evaluations"]

    scored = []
    score = FactorEvaluator.score
    monkeypatch.setattr(FactorEvaluator, "score", lambda self, *a, **k: scored.append(1) or score(self, *a, **k))
    search_rope(*common, "--iterations", "3", "-o", str(tmp_path / "part.json"), "--resume", str(state))

    assert what_was_found(tmp_path / "part.json") == what_was_found(tmp_path / "whole.json")
    whole = json.loads((tmp_path / "whole.json").read_text())["search"]["evaluations"]
    assert len(scored) == whole - done_before > 0, "it continued: only generations 2 and 3 were scored again"
    assert json.loads(state.read_text())["generation"] == 3


COUNTING_SEARCH = """
import os, sys
from llm_retrofit.cli import main
from llm_retrofit.modeling.rope_search import FactorEvaluator

scored, score = [], FactorEvaluator.score
FactorEvaluator.score = lambda self, *args, **kwargs: scored.append(1) or score(self, *args, **kwargs)
main(sys.argv[1:], standalone_mode=False)
print(f"process {os.environ['RANK']} scored {len(scored)}", flush=True)
"""


def test_two_processes_search_exactly_what_one_process_searches(cli_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """Each process scores its share of every generation (4 initial candidates: 2 + 2; then the fresh children) and
    the fitnesses are exchanged; every process then holds the same population, so the search is the 1-process one."""
    import re

    from test_finetune import accelerate_launch

    model, data = cli_inputs
    common = [str(model), "-d", str(data), *SEARCH, "--iterations", "2"]
    search_rope(*common, "-o", str(tmp_path / "one.json"))
    script = tmp_path / "counting_search.py"
    script.write_text(COUNTING_SEARCH)
    done = accelerate_launch("search-rope", *common, "-o", str(tmp_path / "two.json"), program=(str(script),))
    assert done.stdout.count("wrote") == 1, done.stdout  # only the main process writes and reports

    one, two = what_was_found(tmp_path / "one.json"), what_was_found(tmp_path / "two.json")
    assert one == two
    evaluations = one["search"]["evaluations"]
    shares = sorted(int(n) for n in re.findall(r"process \d scored (\d+)", done.stdout))
    assert len(shares) == 2 and sum(shares) == evaluations and 0 < shares[0] <= shares[1] < evaluations, shares
