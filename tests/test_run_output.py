"""What a recipe run prints for a person: step lines and progress with an ETA in a log file, no library noise, a final
table naming files that exist, and `--json` with the eval's numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_finetune import chars_model, corpus

STEPS = ["longrope", "finetune", "eval", "eval-code", "card"]
SETS = ["--set", "profile=none", "--set", "finetune.steps=2", "--set", "finetune.eval_every=0",
        "--set", "finetune.seq_len=${model.max_position_embeddings}"]


def _run(tmp: Path, base: Path, data: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    log = tmp / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", RETROFIT_PROGRESS_INTERVAL="0", PYTHONWARNINGS="default")
    env.pop("RETROFIT_PROGRESS", None)
    with log.open("w") as stderr:  # a log file, not a terminal
        done = subprocess.run([sys.executable, "-m", "llm_retrofit", "patch", str(base), "--recipe", "long-context",
                               "-o", str(tmp / name), "--set", f"inputs.data={data}", "--set",
                               f"inputs.eval_data={data}", *SETS, *extra],
                              env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300)
    return done, tmp / name, log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("run-output")
    base = chars_model(tmp / "base", max_position_embeddings=256)
    data = corpus(tmp)
    table, table_out, table_log = _run(tmp, base, data, "table")
    as_json, json_out, json_log = _run(tmp, base, data, "json", "--json")
    assert table.returncode == 0, table_log[-3000:]
    assert as_json.returncode == 0, json_log[-3000:]
    return {"table": (table.stdout, table_out, table_log), "json": (as_json.stdout, json_out, json_log)}


def test_the_log_has_step_lines_progress_with_an_eta_and_no_library_noise(runs: dict) -> None:
    _, _, log = runs["table"]
    for number, step in enumerate(STEPS, 1):
        assert re.search(rf"^retrofit: step {number}/5 {step}: \S", log, re.M), log
        assert re.search(rf"^retrofit: step {number}/5 {step}: done in \d", log, re.M), log
    assert "step 2/5 finetune: 2 steps x 512 tokens" in log
    assert "profile cpu-fp32:" not in log  # a profile given (none) is never replaced or announced as the machine's
    # Before the first step: the time the run expects here, step by step, priced by a probe of this machine.
    assert re.search(r"^retrofit: expected time on this machine: about \S+ \(longrope \S+, finetune \S+, eval \S+, "
                     r"eval-code \S+; float32 on cpu", log, re.M), log
    assert "step 3/5 eval: before, yarn, after on " in log
    for what in ("search-rope", "finetune", "eval after"):  # the interval is 0: every update is a line
        assert re.search(rf"^retrofit: {what}: \d+.*ETA \d", log, re.M), (what, log)
    assert "Loading weights" not in log and "Writing model shards" not in log and "%|" not in log, log
    assert not re.search(r"warning", log, re.I), log  # PYTHONWARNINGS=default shows deprecation warnings if any
    assert all(line.startswith("retrofit: ") for line in log.splitlines()), log


def test_the_final_table_shows_the_numbers_and_names_files_that_exist(runs: dict) -> None:
    stdout, out, _ = runs["table"]
    tables = stdout.split("perplexity on ")[1:]
    assert len(tables) == 2, stdout
    for table, step in zip(tables, ["03-eval", "04-eval-code"]):
        card = json.loads((out / step / "card-eval.json").read_text())
        assert re.search(r"^\s+length\s+before\s+yarn\s+after$", table, re.M), stdout
        for length, value in card["perplexity"]["after"].items():
            row = re.search(rf"^\s+{length}\s+(\S+)\s+(\S+)\s+(\S+)$", table, re.M)
            assert row and float(row[3]) == pytest.approx(value, abs=1e-3), stdout
            assert float(row[1]) == pytest.approx(card["perplexity"]["before"][length], abs=1e-3)
            assert float(row[2]) == pytest.approx(card["perplexity"]["yarn"][length], abs=1e-3)
    assert "passkey after: 512:" in tables[0] and "passkey" not in tables[1].split("files:")[0]
    files = re.findall(r"^  (model|card|plot|eval json)\s+(\S+)$", stdout, re.M)
    assert [name for name, _ in files] == ["model", "card", "plot", "eval json", "plot", "eval json"], stdout
    assert all(Path(path).exists() for _, path in files), files
    paths = dict(files[:2])
    assert paths["card"].endswith("README.md") and all(p.endswith(".png") for n, p in files if n == "plot")
    assert [p for n, p in files if n == "eval json"] == [str(out / s / "eval.json") for s in ("03-eval", "04-eval-code")]
    # The GPU-sized budget is one --set away, and the run says which.
    assert re.search(r"^profile gpu \(--set profile=gpu\): longrope\.population=16 .*finetune\.steps=100", stdout,
                     re.M), stdout


def test_json_is_all_of_stdout_and_matches_the_eval_json(runs: dict) -> None:
    stdout, out, log = runs["json"]
    summary = json.loads(stdout)  # fails if anything but the JSON is on stdout
    assert [e["step"] for e in summary["evaluations"]] == ["eval", "eval-code"]
    for evaluation, step in zip(summary["evaluations"], ["03-eval", "04-eval-code"]):
        card = json.loads((out / step / "card-eval.json").read_text())
        full = json.loads((out / step / "eval.json").read_text())
        assert evaluation["perplexity"] == card["perplexity"] and evaluation["passkey"] == card.get("passkey")
        assert list(evaluation["perplexity"]) == ["before", "yarn", "after"]
        assert [m["name"] for m in full["models"]] == ["before", "yarn", "after"]
        for key in ("eval_json", "card_eval_json", "plot"):
            assert Path(evaluation[key]).is_file(), key
    assert summary["evaluations"][1]["dataset"] == "bundled:python-source[:1]"
    assert Path(summary["card"]).is_file() and Path(summary["model"]).is_dir()
    assert [s["id"] for s in summary["steps"]] == STEPS
    assert summary["profile"] is None and summary["profiles"]["gpu"]["finetune.steps"] == 100
    assert "step 5/5 card: done" in log  # the progress lines went to stderr


def test_progress_lines_come_at_most_every_interval_and_quiet_restores_settings(monkeypatch, capsys) -> None:
    from transformers.utils import logging as hf_logging

    from llm_retrofit.io.progress import Progress, quiet_libraries

    monkeypatch.delenv("RETROFIT_PROGRESS", raising=False)
    monkeypatch.setenv("RETROFIT_PROGRESS_INTERVAL", "3600")
    with Progress(10, "work", "step") as progress:
        for _ in range(10):
            progress.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["retrofit: work: started, 10 steps to do", lines[1]] and "done: 10 steps in" in lines[1], lines
    monkeypatch.setenv("RETROFIT_PROGRESS_INTERVAL", "0")
    with Progress(4, "work", "step") as progress:
        for _ in range(4):
            progress.update()
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "ETA" in line][0].startswith("retrofit: work: 1/4 steps (25%)"), lines
    monkeypatch.setenv("RETROFIT_PROGRESS", "off")
    with Progress(4, "work", "step") as progress:
        progress.update(4)
    assert capsys.readouterr().err == ""

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_libraries():
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
