"""Model cards: metadata the Hub indexes, a body that says what was done and how to load it, and refreshing rules.

Everything here runs without a network; the upload is tested over HTTP in test_hub.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from conftest import png_bytes, read_config, save_adapter, snapshot
from hub_server import validate_card_metadata
from llm_retrofit import PublishError, patch, render_card
from llm_retrofit.publishing.card import card_content, open_model_directory
from llm_retrofit.patchers import registry
from llm_retrofit.publishing.patch_notes import OTHER_RECORDS, patch_info
from llm_retrofit.cli import main

EVALUATION = {
    "model": "tiny-long",
    "dataset": {"name": "PG-19 test", "type": "pg19"},
    "perplexity": {"tiny": {"256": 12.5, "1024": 480.0}, "tiny-long": {"256": 12.75, "1024": 14.0}},
    "passkey": {"tiny": {"1024": 0.0}, "tiny-long": {"1024": 0.9}},
}


def card_of(directory: Path) -> ModelCard:
    return ModelCard.load(directory / "README.md")


def set_history(directory: Path, *records: tuple[str, dict, str]) -> Path:
    """Write patch records (name, params, source) into config.json, as the executor would have."""
    config = read_config(directory)
    config["retrofit_history"] = [
        {"patch": name, "params": params, "source": source, "source_weights_xxh3": "0" * 32,
         "time": "2025-01-01T00:00:00+00:00", "versions": {"llm_retrofit": "0.1.0"}}
        for name, params, source in records
    ]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def tiny_bf16(tiny_llama: Path, tmp_path: Path) -> Path:
    return patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "tiny-bf16")


def test_metadata_names_base_relation_library_tags_and_pipeline(tiny_bf16: Path) -> None:
    render_card(tiny_bf16, base_model="alice/tiny")
    card = card_of(tiny_bf16)
    data = card.data.to_dict()
    assert data["base_model"] == "alice/tiny"
    assert data["base_model_relation"] == "quantized"  # a dtype cast only re-encodes the base's weights
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["llm-retrofit", "dtype"]
    assert validate_card_metadata(str(card)) == [], "the test Hub's independent rules accept it"
    assert "| 1 | `dtype` | to=bfloat16 |" in card.text and "https://arxiv.org/abs/1905.12322" in card.text
    snippet = card.text.split("```python")[1].split("```")[0]
    assert 'AutoModelForCausalLM.from_pretrained("tiny-bf16")' in snippet and "trust_remote_code" not in snippet


@pytest.mark.parametrize(
    ("patches", "relation"),
    [
        (["dtype"], "quantized"),
        (["convert", "dtype"], "quantized"),
        (["dtype", "gqa"], "finetune"),  # pooled heads are changed weights
        (["longrope"], "finetune"),
        (["a-patch-from-the-future"], "finetune"),  # unknown: the claim that promises least
    ],
)
def test_relation_follows_the_patch_chain(tiny_llama: Path, patches: list[str], relation: str) -> None:
    set_history(tiny_llama, *[(name, {}, "alice/base") for name in patches])
    render_card(tiny_llama)
    data = card_of(tiny_llama).data.to_dict()
    assert (data["base_model"], data["base_model_relation"]) == ("alice/base", relation)
    assert data["tags"] == ["llm-retrofit", *dict.fromkeys(patches)]


def test_every_patcher_declares_a_card_with_its_paper() -> None:
    """A patcher without its own card would be described by its docstring alone, with no paper to cite."""
    missing = [name for name, patcher in registry().items() if patcher.card is None or patcher.card.url is None]
    assert not missing, f"patchers without a card naming their paper: {missing}"


def test_every_known_patch_is_explained_with_its_paper_and_unknown_ones_generically(tiny_llama: Path) -> None:
    known = sorted(registry()) + sorted(OTHER_RECORDS)
    set_history(tiny_llama, *[(name, {"factor": 4.0}, "alice/base") for name in [*known, "mystery"]])
    text = card_of(Path(render_card(tiny_llama)).parent).text
    for name in known:
        row = next(line for line in text.splitlines() if line.startswith("| ") and f"`{name}`" in line)
        assert patch_info(name).explanation in row and "factor=4.0" in row
        assert patch_info(name).url is None or patch_info(name).url in row
    assert "has no description of the `mystery` patch" in text
    assert "original_max_position_embeddings" in text, "LongRoPE's factor switch and the KV cache are a limitation"


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("dtype", {"to": "bfloat16"}, "Casting to a narrower type rounds every weight"),
        ("dtype", {"to": "float32"}, None),  # an upcast loses nothing
        ("convert", {"from": "gguf"}, "dequantized from a quantized GGUF file"),
        ("convert", {"dtype": "bfloat16"}, None),  # a re-shard of a checkpoint
        ("moe", {"num_experts": 4}, "Until it is finetuned the experts are identical"),
    ],
)
def test_limitations_depend_on_the_parameters(tiny_llama: Path, name: str, params: dict, expected: str | None) -> None:
    set_history(tiny_llama, (name, params, "alice/base"))
    limitations = card_of(Path(render_card(tiny_llama)).parent).text.split("## Limitations")[1].split("##")[0]
    items = [line for line in limitations.splitlines() if line.startswith("- ")]
    assert len(items) == (3 if expected else 2), "plus: not evaluated, inherits the base's limitations"
    assert expected is None or expected in items[0]


def test_a_registered_patcher_without_a_card_is_described_by_its_docstring(tiny_llama: Path) -> None:
    from llm_retrofit.patchers.dtype import CastDtype
    from llm_retrofit.spec import PATCHERS

    registry()
    PATCHERS["recast"] = type("Recast", (CastDtype,), {"__doc__": "Cast again, differently.", "name": "recast", "card": None})
    try:
        set_history(tiny_llama, ("recast", {"to": "float16"}, "alice/base"))
        text = card_of(Path(render_card(tiny_llama)).parent).text
        assert "| 1 | `recast` | to=float16 | Cast again, differently. |" in text
    finally:
        del PATCHERS["recast"]


def test_base_model_is_the_latest_hub_repo_in_the_history(tiny_llama: Path, tmp_path: Path) -> None:
    set_history(tiny_llama, ("convert", {"from": "gguf"}, str(tmp_path / "gone.gguf")), ("dtype", {}, "alice/parent"),
                ("gqa", {}, str(tmp_path / "local-intermediate")))
    assert card_of(Path(render_card(tiny_llama)).parent).data.base_model == "alice/parent"


def test_base_model_is_read_from_a_hugging_face_cache_path(tiny_llama: Path, tmp_path: Path) -> None:
    snapshot_dir = tmp_path / "hub" / "models--bob--llama-mini" / "snapshots" / ("a" * 40)
    snapshot_dir.mkdir(parents=True)
    set_history(tiny_llama, ("dtype", {}, str(snapshot_dir)))
    assert card_of(Path(render_card(tiny_llama)).parent).data.base_model == "bob/llama-mini"


def test_without_a_known_base_the_card_has_neither_base_nor_relation(tiny_bf16: Path) -> None:
    data = card_of(Path(render_card(tiny_bf16)).parent).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    text = card_of(tiny_bf16).text
    assert "`tiny-llama`, rewritten by llm-retrofit" in text, "a local source is named by its last part"
    assert str(tiny_bf16.parent) not in text, "no local directory names leak into a public card"


def test_license_is_carried_from_the_source_card(tiny_llama: Path, tmp_path: Path) -> None:
    (tiny_llama / "README.md").write_text(
        "---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n# The source model\n"
    )
    patched = patch(tiny_llama, "dtype:to=float16", output=tmp_path / "fp16")  # copies the source's README.md
    render_card(patched)
    data = card_of(patched).data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "llama3", "LICENSE")
    assert "# The source model" not in card_of(patched).text


def test_real_model_card_carries_the_gguf_license_and_the_tokenizer(smollm2: Path) -> None:
    text = card_content(open_model_directory(smollm2))  # rendered, not written: the session's model stays as it is
    card = ModelCard(text)
    assert card.data.license == "apache-2.0", "general.license of the GGUF file"
    assert "AutoTokenizer.from_pretrained" in card.text and "quantization error" in card.text
    assert "| parameters | 134,515,008 |" in card.text


def test_evaluation_becomes_tables_and_model_index(tiny_bf16: Path, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVALUATION))
    render_card(tiny_bf16, eval_results=results, base_model="alice/tiny")
    card = card_of(tiny_bf16)
    assert "| context length | tiny | tiny-long |" in card.text
    assert "| 1,024 | 480.00 | 14.00 |" in card.text and "| 1,024 | 0% | 90% |" in card.text
    metrics = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert metrics == {
        ("perplexity", "context_length=256"): 12.75,
        ("perplexity", "context_length=1024"): 14.0,
        ("accuracy", "context_length=1024"): 0.9,
    }, "model-index holds this model's column only"
    assert {r.dataset_name for r in card.data.eval_results} >= {"PG-19 test"}
    assert validate_card_metadata(str(card)) == []
    assert "no evaluation of this model" not in card.text


def test_evaluation_is_kept_on_refresh_and_dropped_once_the_model_is_patched(tiny_bf16: Path, caplog) -> None:
    render_card(tiny_bf16, eval_results=EVALUATION, base_model="alice/tiny", repo_id="alice/tiny-bf16")
    first = (tiny_bf16 / "README.md").stat().st_mtime_ns
    render_card(tiny_bf16)
    assert (tiny_bf16 / "README.md").stat().st_mtime_ns == first, "an unchanged card is not rewritten"
    assert card_of(tiny_bf16).data.eval_results and card_of(tiny_bf16).data.base_model == "alice/tiny"
    patch(tiny_bf16, "dtype:to=float16", in_place=True)
    with caplog.at_level(logging.WARNING, logger="llm_retrofit.publishing.card"):
        render_card(tiny_bf16)
    card = card_of(tiny_bf16)
    assert card.data.eval_results is None and "no evaluation of this model" in card.text
    assert "describes another state of the model" in caplog.text
    assert 'from_pretrained("tiny-bf16")' in card.text, "the repo id of the other state is not carried either"


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({}, "has no results: expected 'perplexity' and/or 'passkey'"),
        ({"perplexity": [1, 2]}, "'perplexity' must map a model name"),
        ({"perplexity": {"m": {"long": 3}}}, "has a length or value that is not a number"),
        ({"perplexity": {"m": {"1024": 3}}, "model": "other"}, "'model' is 'other', which has no results"),
        ({"chat": {"m": "low"}}, "'chat' must map a model name to its assistant-token perplexity"),
    ],
)
def test_malformed_evaluation_is_refused_with_the_expected_shape(tiny_bf16: Path, results: dict, message: str) -> None:
    before = snapshot(tiny_bf16)
    with pytest.raises(PublishError, match=message):
        render_card(tiny_bf16, eval_results=results)
    assert snapshot(tiny_bf16) == before


def test_chat_perplexity_alone_makes_a_table_and_a_model_index_entry(tiny_bf16: Path) -> None:
    card = render_card(tiny_bf16, eval_results={"chat": {"before": 72.95, "after": 40.5}}).read_text()
    assert "| | before | after |" in card and "| perplexity | 72.95 | 40.50 |" in card
    assert "Assistant-token perplexity" in card and "value: 40.5" in card  # this model's number in model-index


def test_plot_is_copied_beside_the_card_and_embedded(tiny_bf16: Path, tmp_path: Path) -> None:
    (tmp_path / "ppl by length.png").write_bytes(png_bytes())
    render_card(tiny_bf16, plot=tmp_path / "ppl by length.png")
    assert (tiny_bf16 / "ppl by length.png").read_bytes() == png_bytes()
    assert "![Evaluation by context length](ppl%20by%20length.png)" in card_of(tiny_bf16).text
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(PublishError, match="is not a PNG image"):
        render_card(tiny_bf16, plot=tmp_path / "fake.png")


def test_trust_remote_code_appears_only_when_the_config_maps_custom_code(tiny_llama: Path) -> None:
    render_card(tiny_llama)
    assert "trust_remote_code=True" not in card_of(tiny_llama).text
    config = read_config(tiny_llama)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_infini.InfiniLlamaForCausalLM"}
    (tiny_llama / "config.json").write_text(json.dumps(config))
    render_card(tiny_llama)
    assert 'from_pretrained("tiny-llama", trust_remote_code=True)' in card_of(tiny_llama).text


def test_adapter_card_says_peft_adapter_and_shows_the_peft_snippet(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = save_adapter(tiny_llama, tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "alice/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    render_card(adapter, repo_id="alice/tiny-lora")
    card = card_of(adapter)
    data = card.data.to_dict()
    assert (data["library_name"], data["base_model"], data["base_model_relation"]) == ("peft", "alice/tiny-base",
                                                                                     "adapter")
    assert data["tags"] == ["llm-retrofit", "lora"]
    assert "r=4, lora_alpha=8" in card.text and 'target_modules=["q_proj", "v_proj"]' in card.text
    assert 'PeftModel.from_pretrained(base, "alice/tiny-lora")' in card.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-base")' in card.text
    assert validate_card_metadata(str(card)) == []


def test_recipe_in_the_directory_is_shown_in_a_fence_longer_than_its_backticks(tiny_bf16: Path) -> None:
    recipe = "name: long\nsteps:\n  - patch: longrope\n    note: \"```not the end```\"\n"
    (tiny_bf16 / "retrofit_recipe.yaml").write_text(recipe)
    text = card_of(Path(render_card(tiny_bf16)).parent).text
    assert f"````yaml\n{recipe}````" in text


def test_invalid_base_model_is_refused_before_anything_is_written(tiny_bf16: Path) -> None:
    with pytest.raises(PublishError, match="is not a Hub repo id"):
        render_card(tiny_bf16, base_model="/home/me/models/llama")
    assert not (tiny_bf16 / "README.md").exists()


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ("base_model: alice/tiny\nbase_model_relation: upcycled", "base_model_relation 'upcycled' is not one of"),
        ("base_model: /home/me/llama\nbase_model_relation: finetune", "'/home/me/llama' is not a Hub repo id"),
        ("base_model: alice/tiny", "base_model is set without base_model_relation"),
        ("base_model_relation: finetune", "base_model_relation is set but base_model is not"),
    ],
)
def test_card_validation_names_the_problem(metadata: str, problem: str) -> None:
    from llm_retrofit.publishing.card import validate_card

    fine = "library_name: transformers\npipeline_tag: text-generation\ntags: [llm-retrofit]\n"
    validate_card(ModelCard(f"---\n{fine}---\n# ok\n"), adapter=False)
    with pytest.raises(PublishError, match=problem):
        validate_card(ModelCard(f"---\n{fine}{metadata}\n---\n# bad\n"), adapter=False)
    with pytest.raises(PublishError, match="library_name is 'transformers', expected 'peft'"):
        validate_card(ModelCard(f"---\n{fine}---\n# adapter\n"), adapter=True)


def test_card_command(tiny_bf16: Path, tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(EVALUATION))
    (tmp_path / "plot.png").write_bytes(png_bytes())
    result = CliRunner().invoke(main, ["card", str(tiny_bf16), "--eval", str(tmp_path / "results.json"),
                                       "--plot", str(tmp_path / "plot.png"), "--base-model", "alice/tiny"])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {tiny_bf16.resolve() / 'README.md'}\n"
    assert card_of(tiny_bf16).data.eval_results and (tiny_bf16 / "plot.png").is_file()
    result = CliRunner().invoke(main, ["card", "--help"])
    assert "retrofit card smollm2-long/ --eval results.json --plot perplexity.png" in result.output


def test_the_json_of_retrofit_eval_feeds_the_card(tiny_llama_chars: Path, tmp_path: Path) -> None:
    from llm_retrofit import evaluate
    from llm_retrofit.publishing.card import load_evaluation

    results = tmp_path / "results.json"
    evaluate(tiny_llama_chars, ["a long enough document " * 30], lengths=[64, 128]).to_json(results)
    evaluation = load_evaluation(results)
    assert evaluation.model in evaluation.perplexity
    assert sorted(evaluation.perplexity[evaluation.model]) == [64, 128]


def test_two_evaluations_are_two_model_index_results_each_with_its_own_numbers(tiny_bf16: Path) -> None:
    """Issue 25: the Hub keys a model-index result by task and dataset *type*; two evaluations typed alike (as our
    own results are) were one result under the first data set's name, the second's numbers shown as the first's."""
    docs = {"model": "after", "dataset": {"name": "bundled:python-docs[:1]", "type": "long-documents"},
            "perplexity": {"before": {"256": 9.0}, "after": {"256": 8.5, "512": 9.5}}}
    code = {"model": "after", "dataset": {"name": "bundled:python-source[:1]", "type": "long-documents"},
            "perplexity": {"before": {"256": 4.0}, "after": {"256": 3.5, "512": 3.25}}}
    render_card(tiny_bf16, eval_results=[docs, code])
    index = yaml.safe_load(card_of(tiny_bf16).content.split("---")[1])["model-index"]
    assert len(index) == 1
    shown = {result["dataset"]["name"]: {m["config"]: m["value"] for m in result["metrics"]}
             for result in index[0]["results"]}
    assert shown == {"bundled:python-docs[:1]": {"context_length=256": 8.5, "context_length=512": 9.5},
                     "bundled:python-source[:1]": {"context_length=256": 3.5, "context_length=512": 3.25}}
    assert len(index[0]["results"]) == 2, "one result per data set"
    assert validate_card_metadata(str(card_of(tiny_bf16))) == []


def test_the_model_is_named_as_given_and_keeps_that_name_on_refresh(tiny_bf16: Path) -> None:
    render_card(tiny_bf16, eval_results=EVALUATION, name="tiny-long-context")
    card = card_of(tiny_bf16)
    assert card.text.lstrip().startswith("# tiny-long-context\n") and card.data.model_name == "tiny-long-context"
    render_card(tiny_bf16)  # `retrofit card DIR` again: the same state, so the same name
    assert card_of(tiny_bf16).data.model_name == "tiny-long-context"
    render_card(tiny_bf16, repo_id="alice/tiny-16k")  # pushed: named by its repo
    assert card_of(tiny_bf16).data.model_name == "tiny-16k"


def test_a_length_without_a_perplexity_is_left_out_of_the_card(tiny_llama_chars: Path, tmp_path: Path) -> None:
    """`retrofit eval --json` with a length no document reaches (its perplexity is null) feeds the card: that
    length has no number, as in the tables of `retrofit eval` (it failed with 'a value that is not a number')."""
    from llm_retrofit import evaluate

    results = tmp_path / "results.json"
    evaluate(tiny_llama_chars, ["a short document " * 6], lengths=[32, 4096], progress=False).to_json(results)
    assert [r["perplexity"] is None for r in json.loads(results.read_text())["models"][0]["perplexity"]] == [False,
                                                                                                            True]
    directory = patch(tiny_llama_chars, "dtype:to=bfloat16", output=tmp_path / "model")
    render_card(directory, eval_results=results)
    metrics = {r.metric_config for r in card_of(directory).data.eval_results}
    assert metrics == {"context_length=32"}
