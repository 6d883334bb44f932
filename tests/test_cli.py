"""The `retrofit` command line: helpful --help, one-line errors, and the commands doing what the API does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from conftest import snapshot, state_of
from llm_retrofit.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_help_teaches_with_examples() -> None:
    code, output = run("--help")
    assert code == 0 and "retrofit convert" in output and "retrofit patch" in output
    code, output = run("patch", "--help")
    assert code == 0 and "dtype:to=bfloat16" in output and "--dry-run" in output and "Patches:" in output


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "llm_retrofit", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "0.1.0" in result.stdout


def test_inspect_json(tiny_mistral: Path) -> None:
    code, output = run("inspect", str(tiny_mistral), "--json")
    assert code == 0
    description = json.loads(output)
    assert description["architecture"] == "MistralForCausalLM"
    assert (description["layers"], description["attention_heads"], description["kv_heads"]) == (3, 4, 2)
    assert description["head_dim"] == 16 and description["sliding_window"] == 64
    assert description["parameters"] == sum(t.numel() for t in state_of(tiny_mistral).values())
    assert description["history"] == [] and description["missing_tensors"] == []


def test_inspect_table_shows_the_history(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert run("patch", str(tiny_llama), "-p", "dtype:to=bfloat16", "-o", str(out))[0] == 0
    code, output = run("inspect", str(out))
    assert code == 0 and "patch history" in output and "to=bfloat16" in output and "bfloat16 (30 tensors)" in output


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_llama: Path) -> None:
    before = snapshot(tiny_llama.parent)
    code, output = run("patch", str(tiny_llama), "-p", "dtype:to=bfloat16", "--dry-run")
    assert code == 0
    assert 'dtype: "float32" -> "bfloat16"' in output and "tensors changed: 30" in output
    assert snapshot(tiny_llama.parent) == before


def test_in_place_from_the_command_line(tiny_llama: Path) -> None:
    code, output = run("patch", str(tiny_llama), "-p", "dtype:to=float16", "--in-place")
    assert code == 0, output
    assert {t.dtype for t in state_of(tiny_llama).values()} == {__import__("torch").float16}


def test_errors_are_one_line_without_traceback(tiny_llama: Path, tmp_path: Path) -> None:
    code, output = run("patch", str(tiny_llama), "-p", "dtype:to=int3", "-o", str(tmp_path / "x"))
    assert code == 1
    assert output.startswith("Error: patch 'dtype': to='int3' is not valid") and "Traceback" not in output
    assert not (tmp_path / "x").exists()
    code, output = run("inspect", str(tmp_path / "missing"))
    assert code == 1 and "does not exist" in output


def test_patch_needs_an_output_or_in_place(tiny_llama: Path) -> None:
    code, output = run("patch", str(tiny_llama), "-p", "dtype:to=bfloat16")
    assert code == 2 and "-o/--output DIR or --in-place" in output


def test_convert_reshards_and_casts(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    code, output = run("convert", str(tiny_llama), str(out), "--dtype", "bf16", "--max-shard-size", "30KB")
    assert code == 0, output
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    history = json.loads((out / "config.json").read_text())["retrofit_history"]
    assert history[-1]["patch"] == "convert" and history[-1]["params"]["dtype"] == "bfloat16"
