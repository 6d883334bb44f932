"""What a rewrite may and may not do to the directories around it.

- In place, nothing of the user's is lost or changed: files and folders we know nothing of (`.git/`, `original/`),
  hidden ones, weights in other formats, and the modes of the directory and of every file.
- Unchanged files of an output are hard links to the source's; whatever writes into an output afterwards (a card,
  its plot, a recipe's card step, an evaluation, a finetune) replaces such a file and never writes through it.
- SIGTERM (what `kill`, Slurm and `docker stop` send) is handled like Ctrl-C: nothing is left behind.
- The lock covers what is written: two runs writing sibling outputs both succeed; two writing one target do not.

The subprocess tests stop a real `retrofit` process at a named point (`LLM_RETROFIT_PAUSE_AT`, see
`io/commit.py:crash_test_point`) and signal it there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_tensors, char_tokenizer, png_bytes, read_config, save_tiny, start_paused, state_of
from harness import leftovers, tree_state
from llm_retrofit import load_checkpoint, patch, run_recipe
from llm_retrofit.cli import main
from llm_retrofit.errors import OutputError
from llm_retrofit.io.commit import recover_interrupted_switch, staging_dir

# ------------------------------------------------------------------------------------------------------ helpers

def add_user_files(directory: Path) -> None:
    """What a git clone of a Hub repo holds besides the checkpoint (the issue's reproduction, and a little more)."""
    (directory / ".git" / "objects" / "ab").mkdir(parents=True)
    (directory / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (directory / ".git" / "objects" / "ab" / "cdef0123").write_bytes(b"\x78\x01blob")
    (directory / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (directory / "original").mkdir()
    (directory / "original" / "consolidated.00.pth").write_text("x\n")
    (directory / "original" / "params.json").write_text('{"dim": 64}\n')
    (directory / "notes.txt").write_text("my notes\n")
    (directory / "latest").symlink_to("notes.txt")


def user_state(directory: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """tree_state of everything but the files a rewrite replaces (config and weights) and the directory itself."""
    return {
        name: value for name, value in tree_state(directory).items()
        if name != "." and name != "config.json" and not name.startswith("model")
    }


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask, under which a file created without care comes out 644 and a directory 755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def finish(child: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    assert child.stderr is not None
    rest = child.stderr.read()
    return child.wait(timeout), rest


def stop(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------- 1. in place, nothing is lost


@pytest.mark.parametrize("spec", ["linear:factor=2", "dtype:to=bfloat16"], ids=["config-only", "weights-rewritten"])
def test_in_place_keeps_git_and_subfolders(tiny_sharded: Path, spec: str) -> None:
    """The issue's reproduction, for a config-only patch (weights reused) and one that rewrites every shard."""
    add_user_files(tiny_sharded)
    before = user_state(tiny_sharded)
    patch(tiny_sharded, spec, in_place=True)
    # Byte for byte, mode for mode, the link as a link: everything but the config and the weights is untouched.
    assert user_state(tiny_sharded) == before
    assert read_config(tiny_sharded)["retrofit_history"][-1]["patch"] == spec.split(":")[0]
    assert not leftovers(tiny_sharded.parent)


def test_in_place_keeps_weights_in_other_formats_and_says_they_are_stale(
    tiny_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Hub repo may hold the weights twice (safetensors and .bin); the rewrite reads one and must not drop the other,
    but the kept copy now disagrees with the rewritten weights, which the user is told."""
    (tiny_llama / "pytorch_model.bin").write_bytes(b"the old weights, in another format")
    with caplog.at_level(logging.WARNING, logger="llm_retrofit"):
        patch(tiny_llama, "dtype:to=bfloat16", in_place=True)
    assert (tiny_llama / "pytorch_model.bin").read_bytes() == b"the old weights, in another format"
    assert "kept pytorch_model.bin" in caplog.text and "still hold the old model" in caplog.text
    assert {t.dtype for t in state_of(tiny_llama).values()} == {torch.bfloat16}


def test_to_a_new_directory_only_the_model_files_go(tiny_llama: Path, tmp_path: Path) -> None:
    """The choice documented in apply_to_checkpoint: hidden entries and subfolders stay with the source."""
    add_user_files(tiny_llama)
    out = patch(tiny_llama, "linear:factor=2", output=tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and not names & {".git", ".gitattributes", "original"}


def test_a_kill_while_folders_are_moved_over_loses_none_of_them(tiny_sharded: Path) -> None:
    """Folders are moved into the new checkpoint one by one at the switch; SIGKILL after the first (`.git`) leaves
    `original/` still in the old one. Nothing may be lost: before recovery every file is in one of the two
    directories, and the next run finishes the switch, moving the rest."""
    add_user_files(tiny_sharded)
    before = user_state(tiny_sharded)
    child = start_paused(["patch", str(tiny_sharded), "-p", "dtype:to=bfloat16", "--in-place"], "carried")
    stop(child)
    staged = staging_dir(tiny_sharded)
    assert (staged / ".git" / "HEAD").is_file() and (tiny_sharded / "original" / "params.json").is_file()
    load_checkpoint(tiny_sharded)  # the next run recovers
    assert user_state(tiny_sharded) == before
    assert {t.dtype for t in state_of(tiny_sharded).values()} == {torch.bfloat16}  # and the switch was finished
    assert not leftovers(tiny_sharded.parent)


def test_in_place_refuses_to_carry_a_mount_point(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder on another file system cannot be moved by rename; that is found before anything is committed."""
    (tiny_llama / "data").mkdir()
    real_lstat = Path.lstat

    def lstat(self: Path) -> os.stat_result:
        info = real_lstat(self)
        if self.name == "data":  # pretend it is a mount point: another st_dev
            values = list(info)
            values[stat.ST_DEV] += 1
            return os.stat_result(values)
        return info

    before = tree_state(tiny_llama)
    monkeypatch.setattr(Path, "lstat", lstat)
    with pytest.raises(OutputError, match="is a mount point, which an in-place rewrite cannot carry over; unmount"):
        patch(tiny_llama, "dtype:to=bfloat16", in_place=True)
    monkeypatch.undo()
    assert tree_state(tiny_llama) == before and not leftovers(tiny_llama.parent)


# ----------------------------------------------------------------------------- 2. no write through a hard link


def test_card_plot_replaces_a_linked_plot_instead_of_writing_into_the_source(tiny_llama: Path, tmp_path: Path) -> None:
    """OUT/perplexity.png is the source's file under a second name; a new plot for OUT must not reach the source."""
    (tiny_llama / "perplexity.png").write_bytes(png_bytes() + b"source")
    out = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "out")
    assert os.path.samefile(out / "perplexity.png", tiny_llama / "perplexity.png")  # the premise: a hard link
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "perplexity.png").write_bytes(png_bytes() + b"new")
    result = CliRunner().invoke(main, ["card", str(out), "--plot", str(tmp_path / "new" / "perplexity.png")])
    assert result.exit_code == 0, result.output
    assert (tiny_llama / "perplexity.png").read_bytes() == png_bytes() + b"source"
    assert (out / "perplexity.png").read_bytes() == png_bytes() + b"new"


def test_card_readme_of_a_copy_never_reaches_the_source(tiny_llama: Path, tmp_path: Path) -> None:
    (tiny_llama / "README.md").write_text("# the source's own card\n")
    out = patch(tiny_llama, "linear:factor=2", output=tmp_path / "out")
    result = CliRunner().invoke(main, ["card", str(out)])
    assert result.exit_code == 0, result.output
    assert (tiny_llama / "README.md").read_text() == "# the source's own card\n"
    assert "llm-retrofit" in (out / "README.md").read_text()


CARD_RECIPE = """\
name: stretch
description: test
steps:
  - patch: linear
    with: {factor: 2}
  - card: {}
"""


def test_recipe_card_step_replaces_the_linked_recipe_file(tiny_llama: Path, tmp_path: Path) -> None:
    """The source carries the recipe file of an earlier run; the patch step links it into its output, and the card
    step's new recipe file must replace that link, not rewrite the source's file through it."""
    (tiny_llama / "retrofit_recipe.yaml").write_text("# the recipe this source was made with\n")
    before = tree_state(tiny_llama)
    recipe = tmp_path / "stretch.yaml"
    recipe.write_text(CARD_RECIPE)
    run = run_recipe(tiny_llama, recipe, output=tmp_path / "run")
    assert tree_state(tiny_llama) == before
    assert (run.model / "retrofit_recipe.yaml").read_text() == CARD_RECIPE
    assert (run.model / "README.md").is_file()


def test_a_recipe_of_only_a_card_step_writes_nothing_into_the_source(tiny_llama: Path, tmp_path: Path) -> None:
    """With no earlier step, the model is the recipe's input: the card goes on a linked copy inside the run."""
    before = tree_state(tiny_llama)
    recipe = tmp_path / "card.yaml"
    recipe.write_text("name: card\ndescription: only a card\nsteps:\n  - card: {}\n")
    run = run_recipe(tiny_llama, recipe, output=tmp_path / "run")
    assert tree_state(tiny_llama) == before
    assert run.model == (tmp_path / "run" / "01-card").resolve()
    assert (run.model / "README.md").is_file() and (run.model / "retrofit_recipe.yaml").is_file()
    assert os.path.samefile(run.model / "model.safetensors", tiny_llama / "model.safetensors")  # linked, not copied
    assert (tmp_path / "run" / "model").resolve() == run.model


def test_eval_outputs_replace_linked_files(tiny_llama: Path, tmp_path: Path) -> None:
    """`retrofit eval OUT --plot OUT/perplexity.png --json OUT/eval.json`: both may be links to the source's files."""
    char_tokenizer().save_pretrained(tiny_llama)
    for name, content in (("perplexity.png", png_bytes()), ("eval.json", b"{}\n")):
        (tiny_llama / name).write_bytes(content)
    before = tree_state(tiny_llama)
    out = patch(tiny_llama, "linear:factor=2", output=tmp_path / "out")
    data = tmp_path / "docs.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    result = CliRunner().invoke(main, ["eval", str(out), "--data", str(data), "--lengths", "64", "--plot",
                                       str(out / "perplexity.png"), "--json", str(out / "eval.json")])
    assert result.exit_code == 0, result.output
    assert tree_state(tiny_llama) == before
    assert json.loads((out / "eval.json").read_text())["models"]


def test_finetune_does_not_rewrite_the_source_tokenizer_through_a_link(tmp_path: Path) -> None:
    """Found while looking for writes through links: finetune linked the source's tokenizer files into its output,
    then saved the tokenizer over them, rewriting the source's (here formatted differently, so it shows)."""
    from llm_retrofit.training.finetune import finetune

    base = save_tiny(tmp_path / "base", max_position_embeddings=512)
    char_tokenizer().save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # compact JSON: a re-save would differ byte for byte
        (base / name).write_text(json.dumps(json.loads((base / name).read_text())))
    expanded = patch(base, "expand:every=3", output=tmp_path / "expanded")
    before = tree_state(expanded)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 60)
    finetune(expanded, tmp_path / "out", data=[str(corpus)], steps=1, seq_len=32, lr=1e-2, train=["new_layers"])
    assert tree_state(expanded) == before


def test_replace_file_keeps_the_mode_and_leaves_other_links_alone(tmp_path: Path) -> None:
    from llm_retrofit.io.commit import replace_file  # imported here: the module's other tests also run on old code

    source = tmp_path / "source.txt"
    source.write_text("source\n")
    source.chmod(0o600)
    linked = tmp_path / "linked.txt"
    os.link(source, linked)
    replace_file(linked, "new\n")
    assert source.read_text() == "source\n" and linked.read_text() == "new\n"
    assert stat.S_IMODE(linked.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.txt", "source.txt"]  # no temporary left


# --------------------------------------------------------------------------------------- 3. modes are kept


@pytest.mark.parametrize("spec", ["linear:factor=2", "dtype:to=bfloat16"], ids=["config-only", "weights-rewritten"])
def test_in_place_keeps_the_modes_of_the_directory_and_every_file(
    tiny_sharded: Path, spec: str, umask_022: None
) -> None:
    """A private checkpoint (700, files 600) stays private; new shards take the mode of the shards they replace."""
    (tiny_sharded / "tokenizer.json").write_text("{}\n")
    for path in tiny_sharded.iterdir():
        path.chmod(0o600)
    (tiny_sharded / "tokenizer.json").chmod(0o640)  # one file apart, to see that each keeps its own
    tiny_sharded.chmod(0o700)
    patch(tiny_sharded, spec, in_place=True)
    assert stat.S_IMODE(tiny_sharded.stat().st_mode) == 0o700
    assert modes(tiny_sharded) == {name: 0o640 if name == "tokenizer.json" else 0o600 for name in modes(tiny_sharded)}
    assert any(name.endswith(".safetensors") for name in modes(tiny_sharded))


# ------------------------------------------------------------------------------------ 4. SIGTERM like Ctrl-C


def test_sigterm_during_a_write_to_a_new_directory_leaves_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = start_paused(["patch", str(tiny_llama), "-p", "dtype:to=bfloat16", "-o", str(out)], "shard-written")
    child.send_signal(signal.SIGTERM)
    code, stderr = finish(child)
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == (f"Error: stopped by SIGTERM before {out} was complete; nothing was left there: run the "
                         "command again to redo it."), stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_sigterm_during_an_in_place_rewrite_leaves_the_old_model(tiny_sharded: Path) -> None:
    add_user_files(tiny_sharded)
    before = tree_state(tiny_sharded)
    child = start_paused(["patch", str(tiny_sharded), "-p", "dtype:to=bfloat16", "--in-place"], "shard-written")
    child.send_signal(signal.SIGTERM)
    code, stderr = finish(child)
    assert code == 1 and "Error: stopped by SIGTERM before the in-place rewrite" in stderr, stderr
    assert tree_state(tiny_sharded) == before and not leftovers(tiny_sharded.parent)


def test_sigterm_during_the_switch_lets_the_switch_finish(tiny_sharded: Path) -> None:
    """After the exchange, stopping halfway would leave cleanup for the next run: the few renames left are done
    first, and the process still exits non-zero, as asked, saying the output is complete."""
    child = start_paused(["patch", str(tiny_sharded), "-p", "dtype:to=bfloat16", "--in-place"], "switched")
    child.send_signal(signal.SIGTERM)
    code, stderr = finish(child)
    assert code == 1 and f"Error: stopped by SIGTERM just after {tiny_sharded} was completely written" in stderr, stderr
    assert not leftovers(tiny_sharded.parent) and not (tiny_sharded / ".retrofit-switch").exists()
    assert {t.dtype for t in state_of(tiny_sharded).values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------- 5. the lock covers the target


def test_two_writes_to_sibling_outputs_both_succeed(tiny_llama: Path, tmp_path: Path) -> None:
    outs = tmp_path / "outs"
    outs.mkdir()
    resume = tmp_path / "resume"
    child = start_paused(["patch", str(tiny_llama), "-p", "dtype:to=bfloat16", "-o", str(outs / "a")], "shard-written",
                         LLM_RETROFIT_RESUME_WHEN=str(resume))
    try:
        patch(tiny_llama, "dtype:to=bfloat16", output=outs / "b")  # while `a` is being written beside it
        resume.touch()
        code, stderr = finish(child)
        assert code == 0, stderr
    finally:
        stop(child)
    assert_same_tensors(state_of(outs / "a"), state_of(outs / "b"))
    assert not leftovers(outs)


def test_two_writes_of_one_target_still_exclude_each_other(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    resume = tmp_path / "resume"
    child = start_paused(["patch", str(tiny_llama), "-p", "dtype:to=bfloat16", "-o", str(out)], "shard-written",
                         LLM_RETROFIT_RESUME_WHEN=str(resume))
    try:
        with pytest.raises(OutputError, match=f"another llm-retrofit rewrite of {out} is running; wait for it"):
            patch(tiny_llama, "dtype:to=float16", output=out)
        recover_interrupted_switch(out)  # what opening `out` does: it must not take the live write for a crashed one
        assert staging_dir(out).is_dir()
        resume.touch()
        code, stderr = finish(child)
        assert code == 0, stderr
    finally:
        stop(child)
    assert {t.dtype for t in state_of(out).values()} == {torch.bfloat16}  # the first run's, whole
    assert not leftovers(tmp_path)
