"""`retrofit eval` from the command line: models side by side, every output file, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import char_tokenizer, save_tiny
from llm_retrofit.cli import main

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. "


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": TEXT * n}) + "\n" for n in (1, 2, 3)))  # 110, 220, 330 tokens
    return path


def test_eval_help_teaches_with_examples() -> None:
    code, output = run("eval", "--help")
    assert code == 0 and "retrofit eval smollm2/ --data bundled:python-docs" in output and "--passkey" in output


def test_two_models_side_by_side_with_every_output(tiny_llama_chars: Path, data: Path, tmp_path: Path) -> None:
    other = save_tiny(tmp_path / "other", seed=1, max_position_embeddings=512)
    char_tokenizer().save_pretrained(other)
    out = tmp_path / "out"
    code, output = run(
        "eval", str(tiny_llama_chars), str(other), "--data", str(data), "--lengths", "64,128,256",
        "--passkey", "--passkey-lengths", "400,500", "--passkey-depths", "0,1", "--json", str(out / "eval.json"), "--markdown", str(out / "eval.md"),
        "--plot", str(out / "ppl.png"),
    )
    assert code == 0, output
    assert "perplexity" in output and "passkey accuracy" in output and "documents (skipped)" in output
    for name in ("eval.json", "eval.md", "ppl.png", "ppl-passkey.png"):
        assert f"wrote {out / name}" in output and (out / name).stat().st_size > 0
    result = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in result["models"]] == [str(tiny_llama_chars), str(other)]
    assert result["settings"]["data"] == [str(data)] and result["settings"]["lengths"] == [64, 128, 256]
    assert [r["skipped"] for r in result["models"][0]["perplexity"]] == [0, 1, 2]
    assert result["models"][0]["perplexity"][0]["perplexity"] != result["models"][1]["perplexity"][0]["perplexity"]
    assert (out / "eval.md").read_text().count(str(other)) == 3  # one perplexity row, two passkey rows (lengths)


def test_stride_means_sliding(tiny_llama_chars: Path, data: Path, tmp_path: Path) -> None:
    code, output = run("eval", str(tiny_llama_chars), "-d", str(data), "-l", "64", "--stride", "32",
                       "--json", str(tmp_path / "e.json"))
    assert code == 0, output
    result = json.loads((tmp_path / "e.json").read_text())
    assert (result["settings"]["protocol"], result["settings"]["stride"]) == ("sliding", 32)
    assert result["models"][0]["perplexity"][0]["tokens"] == 109 + 219 + 329, "every token but the first, once"


def test_lengths_accept_k(tiny_llama_chars: Path, data: Path, tmp_path: Path) -> None:
    code, output = run("eval", str(tiny_llama_chars), "-d", str(data), "-l", "64, 128", "--max-docs", "1",
                       "--json", str(tmp_path / "e.json"))
    assert code == 0, output
    settings = json.loads((tmp_path / "e.json").read_text())["settings"]
    assert settings["lengths"] == [64, 128] and settings["documents"] == 1
    assert run("eval", "x", "-d", "y", "-l", "2k,lots")[1].endswith("is not a comma-separated list of token counts, e.g. 2048,8k,16k.\n")


def test_errors_are_one_line(tiny_llama_chars: Path, data: Path, tmp_path: Path) -> None:
    code, output = run("eval", str(tiny_llama_chars), "-d", str(data), "-l", "64", "--stride", "100")
    assert code == 1 and output.startswith("Error: stride 100 must be between 1 and the smallest length (64)")
    code, output = run("eval", str(tiny_llama_chars), "-d", str(tmp_path / "missing.txt"), "-l", "64")
    assert code == 1 and "is not a file or directory" in output and "Traceback" not in output
    code, output = run("eval", str(tiny_llama_chars), "-d", str(data), "--protocol", "truncate", "--stride", "8")
    assert code == 2 and "--stride is for the sliding protocol" in output


def test_outputs_are_checked_before_the_evaluation_and_the_check_leaves_nothing(tmp_path: Path) -> None:
    from llm_retrofit.errors import OutputError
    from llm_retrofit.io.writer import check_writable

    check_writable(tmp_path / "new" / "deeper" / "eval.json")  # parents are made when the file is written
    check_writable("/dev/stdout")  # a device is written to as it is
    assert list(tmp_path.iterdir()) == [], "the probe and no directory remain"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*a-file/eval.json: .*a-file is not a directory"):
        check_writable(tmp_path / "a-file" / "eval.json")


def test_nan_weights_are_named_not_blamed_on_the_head() -> None:
    """A NaN in the weights makes both losses NaN, which once read as "its head does more than a linear layer"."""
    from conftest import tiny_model
    from llm_retrofit.errors import EvaluationError
    from llm_retrofit.modeling.nll import check_head

    model = tiny_model()
    check_head(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(EvaluationError, match=r"hold NaN or inf \(first in model.layers.1.mlp.up_proj.weight\)"):
        check_head(model)
