"""At a size that does not fit: every model-running step on a 1.7B model under a memory limit of half its float32
size, as a machine too small for the float32 model would run it.

The model has SmolLM2-1.7B's shape (1.71B parameters: 24 layers of width 2048, MLP 8192, 32 heads, a tied 49,152
vocabulary) with random bfloat16 weights, made in the test session and never committed, and SmolLM2's tokenizer;
its max_position_embeddings is 64 so that a search at twice the original context is 128 tokens (the length changes
no weight). Its files are dropped from the page cache before each command, so the command's own reads are counted
against the limit. What each step computes is checked against the whole-model path elsewhere (tests of
calibration, placement and training on tiny models and SmolLM2-135M); here the question is only whether it runs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from memory_limit import limits_available, run_limited

pytestmark = pytest.mark.skipif(not limits_available(), reason="needs a cgroup memory controller (root or delegated)")

SMOLLM2_1_7B = {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": True,
                "max_position_embeddings": 64, "rope_theta": 130000.0}
PARAMETERS = 1_711_376_384
LIMIT = PARAMETERS * 4 // 2
"""Half the model's float32 size (3.42 GB): it holds the bf16 weights once, with nothing to spare for a float32
copy of them."""


@pytest.fixture(scope="module")
def big_model(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.common import write_random_checkpoint

    path = tmp_path_factory.mktemp("scale") / "smollm2-1.7b-shape"
    total, _ = write_random_checkpoint(path, SMOLLM2_1_7B, "bfloat16")
    assert total == 2 * PARAMETERS
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, path / name)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def retrofit_limited(model: Path, *args: str) -> None:
    """`retrofit ARGS` under LIMIT, the model read from the disk; fails with its stderr unless it succeeds."""
    from benchmarks.common import evict_from_page_cache

    evict_from_page_cache(model)
    result, peak = run_limited([sys.executable, "-m", "llm_retrofit", *args], LIMIT)
    killed = " (killed: out of memory)" if result.returncode == -9 else ""
    assert result.returncode == 0, f"exit {result.returncode}{killed}, peak {peak / 1e9:.2f} GB:\n{result.stderr[-3000:]}"
    assert peak <= LIMIT


def test_a_gqa_fit_runs_under_half_the_float32_size(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "gqa"
    retrofit_limited(big_model, "patch", str(big_model), "--patch",
                     "gqa:num_key_value_heads=8,method=fit,calibration_tokens=128", "-o", str(out))
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 8


@pytest.mark.slow  # the same layer runner as the GQA fit, which runs by default; this one writes 5.8 GB
def test_a_hidden_moe_router_runs_under_half_the_float32_size(big_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def parse(text): return text.split()", "The river rose after the rain."]))
    out = tmp_path / "moe"
    retrofit_limited(big_model, "patch", str(big_model), "--patch", f"moe:num_experts=2,router=hidden,prompts={prompts}",
                     "-o", str(out))
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2


def test_an_eval_runs_under_half_the_float32_size(big_model: Path, tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    retrofit_limited(big_model, "eval", str(big_model), "--lengths", "64", "--data", "bundled:python-docs",
                     "--max-docs", "1", "--json", str(report))
    assert json.loads(report.read_text())


@pytest.mark.slow  # the same placed loading as the eval, which runs by default; bf16 on a CPU without bf16 is slow
def test_a_search_runs_under_half_the_float32_size(big_model: Path, tmp_path: Path) -> None:
    factors = tmp_path / "factors.json"
    retrofit_limited(big_model, "search-rope", str(big_model), "--target-length", "128", "--data",
                     "bundled:python-docs", "--max-docs", "1", "--population", "2", "--iterations", "0",
                     "--segments", "1", "-o", str(factors))
    assert len(json.loads(factors.read_text())["long_factor"]) == 32
