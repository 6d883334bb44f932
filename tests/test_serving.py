"""Serving what we write: a checkpoint that needs shipped code is never served as another model without a word
(docs/ARCHITECTURE.md, "No silent model swap"), and `retrofit serve-check` tells, per engine, whether a checkpoint is
served as patched, served differently, or refused (docs/serving.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from conftest import read_config, save_tiny
from llm_retrofit import patch
from llm_retrofit.cli import main
from llm_retrofit.evaluation.perplexity import load_model
from llm_retrofit.publishing.card import render_card
from llm_retrofit.publishing.serving import ENGINES, KINDS, RULES, markdown_table, rules_markdown, serve_check

SHIPPED = {"sinks": ("attention:pattern=sinks,sinks=2,window=8", "RetrofitLlamaForCausalLM"),
           "block-sparse": ("attention:pattern=block_sparse,block_size=4,window=8", "RetrofitLlamaForCausalLM"),
           "infini": ("infini:segment_length=16", "RetrofitInfiniLlamaForCausalLM")}
IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("serving") / "src")


@pytest.fixture(scope="module")
def patched(source: Path) -> dict[str, Path]:
    return {name: patch(source, spec, output=source.parent / name) for name, (spec, _) in SHIPPED.items()}


# ------------------------------------------------------------------------------------------ no silent model swap


@pytest.mark.parametrize("name", SHIPPED)
def test_a_checkpoint_that_needs_shipped_code_names_its_class_in_architectures(patched: dict, name: str) -> None:
    config = read_config(patched[name])
    causal_lm = SHIPPED[name][1]
    assert config["architectures"] == [causal_lm]
    assert config["auto_map"]["AutoModelForCausalLM"].endswith(f".{causal_lm}")
    assert config["model_type"] == "llama"  # without trust_remote_code, transformers loads the stock class (the limit)


def test_removing_the_pattern_names_the_stock_class_again(patched: dict, tmp_path: Path) -> None:
    config = read_config(patch(patched["sinks"], "attention:pattern=dense", output=tmp_path / "dense"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and "retrofit_attention" not in config


@pytest.mark.parametrize("name", ["sinks", "infini"])
def test_trust_remote_code_loads_the_shipped_class_and_generates(patched: dict, name: str) -> None:
    causal_lm = SHIPPED[name][1]
    plain = AutoModelForCausalLM.from_pretrained(patched[name], trust_remote_code=True).eval()
    ours, _ = load_model(patched[name])
    assert type(plain).__name__ == type(ours).__name__ == causal_lm
    out = plain.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 4)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, ours(IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sinks", "infini"])
def test_save_pretrained_of_the_loaded_model_writes_the_same_architectures(patched: dict, name: str,
                                                                          tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(patched[name], trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["architectures"] == read_config(patched[name])["architectures"]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_class_refuses_the_engines_transformers_backends(patched: dict, name: str) -> None:
    # vLLM's registry (_try_resolve_transformers) and SGLang's resolve_transformers_arch take an auto_map class only
    # when its is_backend_compatible() is true; their backend would then build the stock model with their attention.
    model = AutoModelForCausalLM.from_pretrained(patched[name], trust_remote_code=True)
    assert type(model).is_backend_compatible() is False
    assert AutoModelForCausalLM.from_pretrained(patched[name]).is_backend_compatible() is True  # the stock Llama


# ------------------------------------------------------------------------------------------------ retrofit serve-check

TINY_FACTORS = Path(__file__).parent / "data" / "tiny_longrope_factors.json"
AP, DIFF, REF = "as patched", "differently", "refused"
# patch -> (spec, source, verdicts of transformers, vLLM, SGLang, llama.cpp through retrofit export), as
# docs/serving.md's rules give them. Every config we write mirrors the RoPE base at the top level (ntk's too), and moe
# unties a tied head unless told to keep it.
EXPECTED = {
    "original": (None, "llama", (AP, AP, AP, AP)),
    "linear": ("linear:factor=2", "llama", (AP, DIFF, DIFF, AP)),
    "ntk": ("ntk:factor=2", "llama", (AP, AP, AP, AP)),
    "dynamic": ("dynamic:factor=2", "llama", (AP, DIFF, DIFF, REF)),
    "yarn": ("yarn:factor=2", "llama", (AP, AP, AP, AP)),
    "llama3": ("llama3:factor=8", "llama", (AP, AP, AP, AP)),
    "longrope": (f"longrope:factors={TINY_FACTORS}", "llama", (AP, DIFF, DIFF, DIFF)),
    "gqa": ("gqa:num_key_value_heads=1,method=mean", "llama", (AP, AP, AP, AP)),
    "expand": ("expand:num_new_layers=1", "llama", (AP, AP, AP, AP)),
    "moe (tied source)": ("moe:num_experts=2,top_k=1", "tied", (AP, AP, AP, AP)),
    "moe (head kept tied)": ("moe:num_experts=2,top_k=1,untie_lm_head=false", "tied", (AP, AP, DIFF, AP)),
    "sliding": ("attention:pattern=sliding,window=8", "llama", (AP, AP, DIFF, REF)),
    "ministral": ("attention:pattern=sliding,window=8,full_every=2", "llama", (AP, AP, DIFF, REF)),
    "sinks": (SHIPPED["sinks"][0], "llama", (AP, REF, REF, REF)),
    "block-sparse": (SHIPPED["block-sparse"][0], "llama", (AP, REF, REF, REF)),
    "infini": (SHIPPED["infini"][0], "llama", (AP, REF, REF, REF)),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-check")
    sources = {"llama": save_tiny(root / "llama"), "tied": save_tiny(root / "tied", tie_word_embeddings=True)}
    return {name: sources[source] if spec is None else patch(sources[source], spec, output=root / name)
            for name, (spec, source, _) in EXPECTED.items()}


@pytest.mark.parametrize("name", EXPECTED)
def test_every_patch_has_its_serve_check_row(outputs: dict[str, Path], name: str) -> None:
    report = serve_check(read_config(outputs[name]))
    assert [entry["engine"] for entry in report] == list(ENGINES)
    assert tuple(entry["verdict"] for entry in report) == EXPECTED[name][2]
    for entry in report:  # a verdict other than "as patched" always says how and where the rule comes from
        for rule in entry["rules"]:
            assert rule["how"] and rule["source"]
        assert entry["verdict"] in {rule["verdict"] for rule in entry["rules"]}


def test_every_kind_has_one_rule_per_engine() -> None:
    pairs = [(rule.engine, rule.kind) for rule in RULES]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(engine, kind.name) for engine in ENGINES for kind in KINDS}


def test_the_cli_prints_the_table_and_the_json(outputs: dict[str, Path]) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["serve-check", str(outputs["sinks"])], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "vLLM" in shown.output and "refused" in shown.output and "llama.cpp" in shown.output
    data = runner.invoke(main, ["serve-check", str(outputs["dynamic"]), "--json"])
    assert data.exit_code == 0, data.output
    engines = {entry["engine"]: entry for entry in json.loads(data.output)["engines"]}
    assert engines["llama.cpp"]["verdict"] == REF
    assert engines["vLLM"]["rules"][0]["source"].startswith("vllm/model_executor/layers/rotary_embedding/")


def test_the_model_card_carries_the_same_table(outputs: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "longrope"
    shutil.copytree(outputs["longrope"], model)
    card = render_card(model).read_text()
    assert "## Serving" in card
    assert markdown_table(serve_check(read_config(model))) in card


def test_docs_serving_lists_every_rule_as_the_code_has_it() -> None:
    page = (Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    assert rules_markdown() in page


def test_a_shipped_pattern_written_before_the_fix_is_reported_as_a_silent_swap(outputs: dict[str, Path]) -> None:
    config = {**read_config(outputs["sinks"]), "architectures": ["LlamaForCausalLM"]}  # what older versions wrote
    verdicts = {entry["engine"]: entry["verdict"] for entry in serve_check(config)}
    assert verdicts == {"transformers": AP, "vLLM": DIFF, "SGLang": DIFF, "llama.cpp": REF}
