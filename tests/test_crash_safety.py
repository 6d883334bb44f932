"""In-place rewrites survive SIGKILL at any point: the directory loads as the old or the new model, the next run
finishes or rolls back the interrupted switch, and no file of the user's (a `.git/`, an `original/` folder) is lost."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import USER_FILES, add_user_files, assert_same_tensors, start_paused, state_of, user_files_in
from llm_retrofit import load_checkpoint, patch
from llm_retrofit.io.commit import MARKER, staging_dir


def pause_in_place_rewrite(directory: Path, pause_at: str, **extra_env: str) -> subprocess.Popen[str]:
    """Start `retrofit patch --in-place` in a child process that stops at `pause_at` and waits to be killed."""
    return start_paused(["patch", directory, "-p", "dtype:to=bfloat16", "--in-place"], pause_at, **extra_env)


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def loaded_state(directory: Path) -> dict[str, torch.Tensor]:
    """What plain transformers loads from the directory (the user's view of it)."""
    model = AutoModelForCausalLM.from_pretrained(directory)
    return {name: tensor for name, tensor in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def clean(directory: Path) -> bool:
    """No staging, old or lock entry of ours beside the directory, and no marker in it."""
    siblings = [p for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.retrofit")]
    return not siblings and not (directory / MARKER).exists()


@pytest.fixture
def old_and_new(tiny_sharded: Path, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    new_directory = patch(tiny_sharded, "dtype:to=bfloat16", output=tmp_path / "expected-new")
    return loaded_state(tiny_sharded), loaded_state(new_directory)


# (where the process is killed, what the directory must be after the next run). "carried": after the first of the
# user's folders was moved into the complete staging directory, before the second.
KILL_POINTS = [("shard-written", "old"), ("staged", "old"), ("carried", "new"), ("switched", "new"), ("cleanup", "new")]


@pytest.mark.parametrize(("pause_at", "after_recovery"), KILL_POINTS)
def test_sigkill_during_an_in_place_rewrite_leaves_old_or_new(
    tiny_sharded: Path, old_and_new: tuple[dict, dict], pause_at: str, after_recovery: str
) -> None:
    old, new = old_and_new
    add_user_files(tiny_sharded)
    kill(pause_in_place_rewrite(tiny_sharded, pause_at))

    # Before any recovery, vanilla transformers sees one whole model, never a mix, and each of the user's files is
    # in the checkpoint or, moved already, in the staging directory the next run switches in.
    state = loaded_state(tiny_sharded)
    assert same(state, old) or same(state, new)
    assert user_files_in(tiny_sharded, staging_dir(tiny_sharded)) == USER_FILES

    load_checkpoint(tiny_sharded)  # the next run recovers
    assert clean(tiny_sharded)
    assert same(loaded_state(tiny_sharded), old if after_recovery == "old" else new)
    assert user_files_in(tiny_sharded) == USER_FILES


def test_a_complete_staging_directory_is_switched_in_by_the_next_run(
    tiny_sharded: Path, old_and_new: tuple[dict, dict]
) -> None:
    """Killed after the marker says 'complete' but before the exchange: the work is kept, not thrown away."""
    _, new = old_and_new
    kill(pause_in_place_rewrite(tiny_sharded, "staged"))
    (staging_dir(tiny_sharded) / MARKER).touch()  # what the killed process was about to do next
    load_checkpoint(tiny_sharded)
    assert clean(tiny_sharded)
    assert same(loaded_state(tiny_sharded), new)


def test_without_directory_exchange_a_crash_between_renames_is_finished(
    tiny_sharded: Path, old_and_new: tuple[dict, dict]
) -> None:
    """File systems without renameat2(RENAME_EXCHANGE) use two renames; the gap between them is repaired."""
    _, new = old_and_new
    add_user_files(tiny_sharded)
    kill(pause_in_place_rewrite(tiny_sharded, "half-switched", LLM_RETROFIT_NO_EXCHANGE="1"))
    assert not tiny_sharded.exists()  # the documented window of the fallback
    assert user_files_in(staging_dir(tiny_sharded)) == USER_FILES  # moved over before the first rename
    load_checkpoint(tiny_sharded)
    assert clean(tiny_sharded)
    assert same(loaded_state(tiny_sharded), new)
    assert user_files_in(tiny_sharded) == USER_FILES


def test_recovery_leaves_a_running_rewrite_alone(tiny_sharded: Path, old_and_new: tuple[dict, dict]) -> None:
    old, _ = old_and_new
    child = pause_in_place_rewrite(tiny_sharded, "shard-written")
    try:
        load_checkpoint(tiny_sharded)  # another process opens the checkpoint meanwhile
        assert staging_dir(tiny_sharded).exists(), "the live rewrite's staging directory must not be rolled back"
        assert same(loaded_state(tiny_sharded), old)
    finally:
        kill(child)


def test_after_recovery_the_rewrite_can_simply_be_run_again(tiny_sharded: Path, old_and_new: tuple[dict, dict]) -> None:
    _, new = old_and_new
    kill(pause_in_place_rewrite(tiny_sharded, "shard-written"))
    patch(tiny_sharded, "dtype:to=bfloat16", in_place=True)
    assert clean(tiny_sharded)
    assert_same_tensors(loaded_state(tiny_sharded), new)
    assert state_of(tiny_sharded).keys() == {k for k in new if k != "lm_head.weight"} | ({"lm_head.weight"} & new.keys())
