"""SIGKILL at random instants, not only at the named pause points of tests/test_crash_safety.py.

An in-place weight rewrite (`retrofit patch DIR -p ... --in-place`) and a recipe run (`retrofit patch DIR --recipe
R -o RUN`) are started in a child process and killed with SIGKILL after a delay drawn by a seeded RNG within the
measured duration of an uninterrupted run of the same command (the test measures it first). After every kill:

- in-place patch: before any recovery, plain transformers loads the directory as exactly the old or exactly the new
  model; the next run (opening the checkpoint, or the next `retrofit` command) recovers, after which the directory
  is exactly the old or exactly the new model, nothing of ours is left beside it, and the user's files (`.git/`,
  `original/`, `.gitattributes`) are all there with their bytes;
- recipe run: the input is byte-identical, every step directory that exists loads with plain transformers as
  exactly that step's output in an uninterrupted run, and `--resume` completes the run to the same final tensors
  (and the same tensors in every step directory) as the uninterrupted run, with no staging directory left.

Most of a child's life is the interpreter importing torch and transformers (and its timing jitters by more than the
whole write lasts), so one kill in four is at a uniform instant of the whole measured run, and three in four at a
uniform instant of the measured writing part, counted from the moment the child's first entry appears on disk. The default run does a few trials (seconds); `--runslow` does the full counts
(>= 20 for the patch, >= 10 for the recipe). Each trial's phase at the kill and its outcome are counted and printed
(`pytest -s` shows the tally).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from conftest import USER_FILES, add_user_files, save_tiny, start_paused, state_of, user_files_in
from harness import leftovers, tree_state
from llm_retrofit import load_checkpoint, patch
from llm_retrofit.cli import main
from llm_retrofit.io.commit import MARKER, staging_dir

SEED = 20240917
FAST_PATCH_TRIALS, SLOW_PATCH_TRIALS = 3, 24
FAST_RECIPE_TRIALS, SLOW_RECIPE_TRIALS = 2, 12
PATCHES = ["dtype:to=bfloat16", "expand:every=2"]  # both rewrite every weight file

RECIPE = """\
name: kills
description: three cheap steps, to be killed at random instants
steps:
  - patch: expand
    with: {every: 2}
  - patch: dtype
    with: {to: bfloat16}
  - card: {}
"""


# ------------------------------------------------------------------------------------------------------ helpers


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLM_RETROFIT_PAUSE_AT"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def retrofit_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "llm_retrofit", *map(str, args)]


def loaded_state(directory: Path) -> dict[str, torch.Tensor]:
    """What plain transformers loads from the directory (the user's view of it)."""
    model = AutoModelForCausalLM.from_pretrained(directory)
    return dict(model.state_dict())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def ours_beside(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.retrofit"))


@dataclass
class Timing:
    """An uninterrupted run of a command: when the first entry of ours appeared on disk, when the writing was over
    (the last time it was seen in progress), and when the process exited, in seconds from its start."""

    first_write_s: float
    last_write_s: float
    total_s: float


def timed_run(command: list[str], writing: Callable[[], bool]) -> Timing:
    """Run `command` to completion, polling every millisecond whether `writing()` holds."""
    start = time.monotonic()
    child = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = last = None
    while child.poll() is None:
        if writing():
            now = time.monotonic() - start
            first = now if first is None else first
            last = now
        time.sleep(0.001)
    total = time.monotonic() - start
    _, err = child.communicate()
    assert child.returncode == 0, err.decode()[-3000:]
    assert first is not None and last is not None, "the writing was never seen; the test cannot aim its kills"
    return Timing(first, last, total)


@dataclass
class Kill:
    """When to kill: `delay` seconds after the process started (`anchored` False), or after the first entry of
    ours appeared on disk (`anchored` True)."""

    delay: float
    anchored: bool

    def __str__(self) -> str:
        return f"{self.delay:.3f}s after {'the first write' if self.anchored else 'the start'}"


def kills(rng: random.Random, timing: Timing, trials: int) -> list[Kill]:
    """One kill in four at a uniform instant of the whole measured run (most land while the interpreter imports
    torch, which is most of a run); the others at a uniform instant of the measured writing part (a little past it
    too), counted from the first write so that the jitter of the import does not move them out of it."""
    window = timing.last_write_s - timing.first_write_s + 0.01
    return [Kill(rng.uniform(0.0, window), True) if i % 4 else Kill(rng.uniform(0.0, timing.total_s), False)
            for i in range(trials)]


def kill_at(command: list[str], kill: Kill, started_writing: Callable[[], bool]) -> bool:
    """Start `command` and SIGKILL it at `kill`; True if it was still running (really killed)."""
    child = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + kill.delay
    if kill.anchored:
        while child.poll() is None and not started_writing():
            time.sleep(0.0005)
        deadline = time.monotonic() + kill.delay
    try:
        child.wait(timeout=max(0.0, deadline - time.monotonic()))
        return False  # it finished first
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
        return True


def report(title: str, tally: Counter, extra: str = "") -> None:
    print(f"\n{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(tally.items())) + extra)


# -------------------------------------------------------------------------------------------- in-place patch


@pytest.fixture(scope="module")
def patch_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sharded checkpoint (~10 MB in 13 files, so that a rewrite writes long enough to be hit), the exact old and
    new models for each patch, and the measured timing of an uninterrupted in-place run of each."""
    work = tmp_path_factory.mktemp("random-kills")
    base = save_tiny(work / "base", max_shard_size="1MB", hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4)
    assert len(list(base.glob("model-*.safetensors"))) >= 10
    old = loaded_state(base)
    world: dict = {"work": work, "base": base, "old": old, "new": {}, "timing": {}}
    for number, spec in enumerate(PATCHES):
        world["new"][spec] = loaded_state(patch(base, spec, output=work / f"expected-{number}"))
        assert not same(world["new"][spec], old), "the patch must change the weights, or old/new proves nothing"
        measured = work / f"measured-{number}"
        shutil.copytree(base, measured)
        add_user_files(measured)
        world["timing"][spec] = timed_run(retrofit_command("patch", measured, "-p", spec, "--in-place"),
                                          lambda d=measured: bool(ours_beside(d)))
        assert same(loaded_state(measured), world["new"][spec]) and not ours_beside(measured)
    return world


def phase(directory: Path) -> str:
    """Where the killed rewrite was, read from what it left (before any recovery)."""
    staging = staging_dir(directory)
    if (directory / MARKER).exists() or any(name.endswith("-old") for name in ours_beside(directory)):
        return "switched, cleanup left"
    if staging.is_dir():
        return "staged (marker written)" if (staging / MARKER).exists() else "staging (no marker)"
    if ours_beside(directory):
        return "lock only"
    return "nothing of ours on disk"


def recover(directory: Path, trial: int) -> None:
    """The next run recovers: every other trial by opening the checkpoint (the API), the others by the next
    `retrofit` command (inspect)."""
    if trial % 2:
        result = CliRunner().invoke(main, ["inspect", str(directory)])
        assert result.exit_code == 0, result.output
    else:
        load_checkpoint(directory)


def patch_trials(world: dict, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    phases: Counter = Counter()
    finished_first = 0
    plan = [(PATCHES[i % len(PATCHES)], i) for i in range(trials)]
    drawn = {spec: iter(kills(rng, world["timing"][spec], trials)) for spec in PATCHES}
    for spec, trial in plan:
        when = next(drawn[spec])
        directory = world["work"] / f"trial-{seed}-{trial}"
        shutil.copytree(world["base"], directory)
        add_user_files(directory)
        old, new = world["old"], world["new"][spec]

        killed = kill_at(retrofit_command("patch", directory, "-p", spec, "--in-place"), when,
                         lambda: bool(ours_beside(directory)))
        finished_first += not killed
        at_kill = phase(directory)
        if at_kill == "nothing of ours on disk" and same(loaded_state(directory), new):
            at_kill = "finished writing, not yet exited"
        phases[at_kill] += 1
        where = f"trial {trial} ({spec}, killed {when}, {phase(directory)})"

        # Before recovery: vanilla transformers sees one whole model, never a mix; each user file is in the
        # checkpoint or, already moved, in the complete staging directory the next run switches in.
        before = loaded_state(directory)
        assert same(before, old) or same(before, new), f"{where}: loads as neither the old nor the new model"
        assert user_files_in(directory, staging_dir(directory)) == USER_FILES, f"{where}: a user file is missing"

        recover(directory, trial)
        after = loaded_state(directory)
        outcome = "old" if same(after, old) else "new" if same(after, new) else "neither"
        assert outcome != "neither", f"{where}: after recovery the directory is neither the old nor the new model"
        if same(before, new):
            assert outcome == "new", f"{where}: a finished switch was rolled back"
        assert not ours_beside(directory) and not (directory / MARKER).exists(), f"{where}: {ours_beside(directory)}"
        assert user_files_in(directory) == USER_FILES, f"{where}: the user's files did not survive"
        outcomes[outcome] += 1
        shutil.rmtree(directory)
    report(f"in-place patch, {trials} SIGKILL trials (seed {seed}) after recovery", outcomes,
           f"; phase at the kill: {dict(phases)}; finished before the kill: {finished_first}; timing: {world['timing']}")
    assert sum(outcomes.values()) == trials


def test_random_sigkills_of_an_in_place_rewrite_leave_old_or_new(patch_world: dict) -> None:
    patch_trials(patch_world, FAST_PATCH_TRIALS, SEED)


@pytest.mark.slow
def test_many_random_sigkills_of_an_in_place_rewrite_leave_old_or_new(patch_world: dict) -> None:
    patch_trials(patch_world, SLOW_PATCH_TRIALS, SEED + 1)


# ------------------------------------------------------------------------------------------------ recipe run


def step_directories(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and not p.is_symlink() and p.name[:2].isdigit())


@pytest.fixture(scope="module")
def recipe_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The input, the recipe file, an uninterrupted run's outputs (per step and final) and its timing."""
    work = tmp_path_factory.mktemp("recipe-kills")
    base = save_tiny(work / "base", max_shard_size="1MB", hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4)
    recipe = work / "kills.yaml"
    recipe.write_text(RECIPE)
    reference = work / "reference"
    timing = timed_run(retrofit_command("patch", base, "--recipe", recipe, "-o", reference),
                       lambda: reference.exists() and not (reference / "model").is_symlink())
    steps = {p.name: loaded_state(p) for p in step_directories(reference)}
    assert sorted(steps) == ["01-expand", "02-dtype"], sorted(steps)
    final = state_of(reference / "model")
    assert (reference / "model").resolve() == reference / "02-dtype"
    return {"work": work, "base": base, "recipe": recipe, "steps": steps, "final": final, "timing": timing,
            "source": tree_state(base)}


def recipe_trials(world: dict, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    done_at_kill: Counter = Counter()
    outcomes: Counter = Counter()
    for trial, when in enumerate(kills(rng, world["timing"], trials)):
        run = world["work"] / f"run-{seed}-{trial}"
        command = retrofit_command("patch", world["base"], "--recipe", world["recipe"], "-o", run)
        killed = kill_at(command, when, run.exists)
        manifest = run / "manifest.json"
        completed = len(json.loads(manifest.read_text())["steps"]) if manifest.is_file() else 0
        done_at_kill[f"{completed} of 3 steps recorded" + ("" if killed else " (finished first)")] += 1
        where = f"trial {trial} (killed {when}, {completed} steps recorded)"

        assert tree_state(world["base"]) == world["source"], f"{where}: the recipe's input changed"
        if run.is_dir():
            for directory in step_directories(run):  # a step's directory appears whole or not at all
                assert same(loaded_state(directory), world["steps"][directory.name]), f"{where}: {directory.name}"

        result = resume(world, run)
        outcomes["resumed to the same final tensors"] += 1
        assert result.exit_code == 0, f"{where}: --resume failed:\n{result.output}"
        assert [p.name for p in step_directories(run)] == ["01-expand", "02-dtype"], where
        for directory in step_directories(run):
            assert same(loaded_state(directory), world["steps"][directory.name]), f"{where}: {directory.name}"
        final = state_of(run / "model")
        assert final.keys() == world["final"].keys() and all(
            final[k].dtype == world["final"][k].dtype and torch.equal(final[k], world["final"][k]) for k in final
        ), f"{where}: the resumed run's final tensors differ from an uninterrupted run's"
        assert (run / "model" / "README.md").is_file(), f"{where}: the card step did not run"
        assert not leftovers(run), f"{where}: left behind in the run: {leftovers(run)}"
        assert tree_state(world["base"]) == world["source"], f"{where}: the recipe's input changed"
        shutil.rmtree(run)
    report(f"recipe run, {trials} SIGKILL trials (seed {seed})", done_at_kill,
           f"; outcomes: {dict(outcomes)}; timing: {world['timing']}")
    assert sum(outcomes.values()) == trials


def resume(world: dict, run: Path):
    return CliRunner().invoke(main, ["patch", str(world["base"]), "--recipe", str(world["recipe"]), "-o", str(run),
                                     "--resume"])


def test_a_recipe_killed_in_its_first_step_can_be_resumed(recipe_world: dict) -> None:
    run = recipe_world["work"] / "killed-in-step-1"
    child = start_paused(["patch", recipe_world["base"], "--recipe", recipe_world["recipe"], "-o", run],
                         "shard-written", env=child_env())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (run / "manifest.json").exists(), "killed in the first step, as meant"
    result = resume(recipe_world, run)
    assert result.exit_code == 0, result.output
    assert_final = state_of(run / "model")
    assert all(torch.equal(assert_final[k], recipe_world["final"][k]) for k in recipe_world["final"])


def test_random_sigkills_of_a_recipe_run_resume_to_the_same_model(recipe_world: dict) -> None:
    recipe_trials(recipe_world, FAST_RECIPE_TRIALS, SEED)


@pytest.mark.slow
def test_many_random_sigkills_of_a_recipe_run_resume_to_the_same_model(recipe_world: dict) -> None:
    recipe_trials(recipe_world, SLOW_RECIPE_TRIALS, SEED + 1)
