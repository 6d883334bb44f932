"""Running a recipe: resolve each step's values, run it, keep its output under OUT with a manifest, resume.

OUT holds one directory per step that writes something (`01-expand/`, `02-finetune/`, `03-eval/`), the recipe as
run (`recipe.yaml`), `manifest.json`, and `model`, a link to the last model. A step is identified by a key: the hash
of its kind, its resolved values and the previous step's key. A re-run with `resume` skips every step whose key is in
the manifest with its output present, so a crash or Ctrl-C costs only the unfinished step; a changed value (an
override, an edited recipe) re-runs that step and everything after it. Patch and finetune outputs are written
atomically (a staging directory renamed at the end), so a half-written step never looks finished.

Values are resolved when their step runs, so they can use what earlier steps produced (`expressions`):
- `${model.KEY}` the config of the model the step works on (after the previous patches and finetunes);
- `${base.KEY}` the config of the recipe's input model; `${inputs.NAME}` an input;
- `${steps.ID.output}` an earlier step's output directory, `${steps.ID.KEY}` a number it reported;
- arithmetic on those: `${base.max_position_embeddings * 4}`, `${max(1, base.num_hidden_layers // 4)}`.
A string that is one `${...}` takes the expression's type; `${...}` inside a longer string is formatted into it.
Expressions stay within what a recipe value can be (numbers below 1e18, no arithmetic on text or lists).

Before the first step runs, and in a dry run, every step's values are resolved as far as they are known and checked
as the step will read them (`plan_steps`, each kind's `check`): a mistake in the last step is found before an hour-long
first one, and the output directory is not created. A value known only when run (the config after a search, a
number a step reports) is checked when its step starts, before the step does anything.

What each kind of step does (checks, plan, start line, run) is its `StepKind` in `steps/`; `--set` is `overrides`.
Nothing a run does writes into its input: a step that writes into the model it works on (a card, a push's card) gets
a copy made of hard links where that model is the input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RetrofitError
from ..io.progress import quiet_libraries
from ..modeling.memory import step_footprint
from .expressions import Unresolved, resolve
from .overrides import NO_PROFILE, SLOW_FLOAT_PROFILE, apply_overrides, profile_of, with_machine_profile
from .schema import Recipe, RecipeError, Step, Unknown, load_recipe
from .steps import STEP_KINDS, StepKind
from .steps.base import PlannedStep, Planning, RunState, StepOutcome, has_unknown, model_config, size_text

if TYPE_CHECKING:
    from ..io.checkpoint import TensorMeta
    from ..modeling.cost import Pass

MANIFEST = "manifest.json"
MODEL_LINK = "model"

# ---------------------------------------------------------------------------------------------------- runner


@dataclass
class RecipeRun:
    """What `run_recipe` did: the final model, each step's result, and which steps were skipped as already done."""

    output: Path
    model: Path
    results: dict[str, Mapping[str, Any]]
    ran: list[str]
    skipped: list[str]
    recipe: str = ""
    seconds: float = 0.0
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The recipe's profiles, and which one this run used (`applied`): the end of a run names the others."""
    profile: str | None = None

    def summary(self) -> dict[str, Any]:
        """What the run ends with (`retrofit patch --recipe ... --json`): each step and its wall time, each eval step's
        perplexity per length per model (and passkey accuracy if measured), and the paths of the final model, its
        card, the plot and the eval JSON (None where the run wrote none); `chat`, the held-out conversations'
        assistant-token perplexity per model, where the step measured it."""
        manifest = _read_manifest(self.output / MANIFEST)
        skipped = set(self.skipped)
        steps, evaluations = [], []
        for number, entry in enumerate(manifest["steps"], 1):
            steps.append({"id": entry["id"], "kind": entry["kind"], "seconds": entry["result"].get("seconds"),
                          "skipped": entry["id"] in skipped})
            if entry["kind"] == "eval" and entry.get("eval_results"):
                card_eval = Path(entry["eval_results"])
                found = json.loads(card_eval.read_text())
                evaluations.append({"step": entry["id"], "dataset": found.get("dataset", {}).get("name"),
                                    "perplexity": found.get("perplexity", {}), "passkey": found.get("passkey"),
                                    "chat": found.get("chat"), "eval_json": _existing(card_eval.parent / "eval.json"),
                                    "card_eval_json": _existing(card_eval), "plot": _existing(entry.get("plot"))})
        return {"recipe": self.recipe or manifest.get("recipe"), "output": str(self.output), "model": str(self.model),
                "card": _existing(self.model / "README.md"), "seconds": round(self.seconds, 3), "steps": steps,
                "evaluations": evaluations, "profile": self.profile, "profiles": self.profiles}


def _existing(path: str | os.PathLike[str] | None) -> str | None:
    return str(path) if path is not None and Path(path).exists() else None


def render_summary(summary: Mapping[str, Any]) -> str:
    """`RecipeRun.summary()` as the table a person reads at the end of a run."""
    lines = [f"recipe {summary['recipe']} finished in {_duration(summary['seconds'])}: {summary['output']}"]
    for item in summary["evaluations"]:
        models = list(item["perplexity"])
        lengths = sorted({int(n) for table in item["perplexity"].values() for n in table})
        widths = [max(12, len(m) + 2) for m in models]  # a baseline's column may be named by its whole spec
        lines += ["", f"{item['step']}: perplexity on {item['dataset']} (lower is better)",
                  "  " + f"{'length':>8}" + "".join(f"{m:>{w}}" for m, w in zip(models, widths))]
        for n in lengths:
            cells = [item["perplexity"][m].get(str(n)) for m in models]
            lines.append("  " + f"{n:>8}" + "".join(f"{c:>{w}.3f}" if c is not None else f"{'-':>{w}}"
                                                     for c, w in zip(cells, widths)))
        for model, value in (item.get("chat") or {}).items():
            lines.append(f"  chat perplexity {model}: {value:.3f}")
        for model, table in (item.get("passkey") or {}).items():
            found = ", ".join(f"{n}: {100 * a:.0f}%" for n, a in sorted(table.items(), key=lambda kv: int(kv[0])))
            lines.append(f"  passkey {model}: {found}")
    files = [("model", summary["model"]), ("card", summary["card"])]
    for item in summary["evaluations"]:
        files += [("plot", item["plot"]), ("eval json", item["eval_json"])]
    lines += ["", "files:"] + [f"  {name:<10} {path}" for name, path in files if path]
    if summary.get("profile"):
        lines += ["", f"ran with profile {summary['profile']} (--set profile=none: the recipe as written)"]
    for name, settings in (summary.get("profiles") or {}).items():
        if name != summary.get("profile"):
            shown = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
            lines += ["", f"profile {name} (--set profile={name}): {shown}"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    from ..io.progress import duration

    return duration(seconds)


@quiet_libraries()  # our own loads and saves: no library bars, warnings or deprecation notes
def run_recipe(
    model: str | os.PathLike[str],
    recipe: str | os.PathLike[str] | Recipe,
    *,
    output: str | os.PathLike[str],
    overrides: Mapping[str, Any] | Sequence[str] = (),
    push_to_hub: str | None = None,
    resume: bool = False,
) -> RecipeRun:
    """Run `recipe` (a built-in name, a YAML file or a Recipe) on the checkpoint `model`, keeping every step's output
    under `output`. With `resume`, steps already completed there (same values) are skipped."""
    from ..io.checkpoint import resolve_checkpoint_dir
    from ..io.progress import note

    run_started = time.perf_counter()
    given = overrides
    recipe, overrides = _with_overrides(recipe, overrides, push_to_hub)
    chosen = profile_of(given) is None and profile_of(overrides) is not None  # this machine chose the profile
    out = Path(output).expanduser().resolve()
    manifest = _earlier_run(out, resume)
    base = str(resolve_checkpoint_dir(model))
    planned = _check_before_running(recipe, base, out, push_to_hub)  # a later step's refusal, before the first
    _announce(recipe, profile_of(overrides) if chosen else None, planned)
    _make_directory(out)
    state = RunState(base, out, dict(recipe.inputs), base, model_config(base), model_config(base),
                     push_repo=push_to_hub, recipe_text=recipe.text)
    state.inputs = _resolve_inputs(recipe, state)
    (out / "recipe.yaml").write_text(recipe.text, encoding="utf-8")
    done = {entry["key"]: entry for entry in manifest.get("steps", [])}
    entries: list[dict[str, Any]] = []
    ran, skipped = [], []
    previous_key = hashlib.sha256(f"{recipe.name}\0{base}".encode()).hexdigest()[:16]
    for number, step in enumerate(recipe.steps, 1):
        kind = STEP_KINDS[step.kind]
        params, _ = resolve_params(recipe, step, state.scope())
        kind.check(recipe, step, params, push_to_hub)  # the values known only now (after a search, say)
        key = _step_key(previous_key, step, params)
        directory = out / f"{number:02d}-{step.id}"
        outcome = None if ran else _finished(done.get(key), kind, directory)  # after a re-run step, all re-run
        if outcome is not None:
            skipped.append(step.id)
            note(f"step {number}/{len(recipe.steps)} {step.id}: already done in {directory}, skipped (--resume)")
        else:
            outcome = _run_step(kind, step, params, state, directory, f"step {number}/{len(recipe.steps)} {step.id}")
            ran.append(step.id)
        _advance(state, step, outcome)
        entries.append({"id": step.id, "kind": step.kind, "key": key, "params": params, "result": outcome.result,
                        "model": outcome.model, "eval_results": outcome.eval_results, "plot": outcome.plot})
        _write_manifest(out, recipe, base, entries)
        previous_key = key
    link = out / MODEL_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(state.model, out) if Path(state.model).is_relative_to(out) else state.model)
    return RecipeRun(out, Path(state.model), state.results, ran, skipped, recipe.name, profiles=recipe.profiles,
                     profile=_applied_profile(overrides), seconds=time.perf_counter() - run_started)


def _applied_profile(overrides: Mapping[str, Any] | Sequence[str]) -> str | None:
    """The profile the run applied: None for none (`--set profile=none`, the recipe as written)."""
    profile = profile_of(overrides)
    return None if profile == NO_PROFILE else profile


def _with_overrides(recipe: str | os.PathLike[str] | Recipe, overrides: Mapping[str, Any] | Sequence[str],
                    push_to_hub: str | None) -> tuple[Recipe, Mapping[str, Any] | Sequence[str]]:
    """The recipe as this run runs it (the machine's profile, the overrides, a push step), and the overrides that
    made it."""
    loaded = load_recipe(recipe)
    overrides = with_machine_profile(loaded, overrides)
    return with_push(apply_overrides(loaded, overrides), push_to_hub), overrides


def _announce(recipe: Recipe, machine_profile: str | None, planned: list[PlannedStep]) -> None:
    """The lines a run starts with: the profile this machine chose, if it chose one, and the time the run expects."""
    from ..io.progress import note

    if machine_profile == SLOW_FLOAT_PROFILE:
        note(f"profile {SLOW_FLOAT_PROFILE}: this CPU has no bf16 units, so every pass runs in float32 (~3x slower); "
             f"{recipe.name} runs what fits there (--set profile=none: the recipe as written)")
    note(expected_time(planned))


def expected_time(planned: list[PlannedStep]) -> str:
    """`expected time on this machine: about 17m (longrope 4m, ...)`, priced by a probe of this machine now."""
    from ..io.progress import duration
    from ..modeling.cost import Pricer

    pricer = Pricer()
    times = [(item.step.id, pricer.seconds(item.passes)) for item in planned if item.passes]
    unpriced = [item.step.id for item in planned if item.passes is None]
    if not times:
        return f"expected time on this machine: unknown (the models of {', '.join(unpriced)} are known only when run)"
    steps = ", ".join(f"{step} {duration(seconds)}" for step, seconds in times)
    return (f"expected time on this machine: about {duration(sum(t for _, t in times))} ({steps}; "
            f"{pricer.arithmetic}, as fast as it runs now)" + (f"; not priced: {', '.join(unpriced)}" if unpriced
                                                              else ""))


def _finished(entry: Mapping[str, Any] | None, kind: StepKind, directory: Path) -> StepOutcome | None:
    """The outcome an earlier run recorded for this step (same key), if what it wrote is still there."""
    if entry is None or kind.writes_directory and not directory.is_dir():
        return None
    if entry.get("model") and not Path(entry["model"]).is_dir():
        return None
    return StepOutcome(entry["result"], entry.get("model"), entry.get("eval_results"), entry.get("plot"))


def _run_step(kind: StepKind, step: Step, params: dict[str, Any], state: RunState, directory: Path,
              label: str) -> StepOutcome:
    """Run one step, with its start and end lines. A step that writes into its model works on a copy (hard links)
    in its directory where that model is the recipe's input: a run never writes into its input."""
    from ..io.commit import linked_copy
    from ..io.progress import duration, note

    if directory.exists():
        shutil.rmtree(directory)  # an earlier, different run of this step; it is redone
    copied = None
    if kind.writes_into_model and not Path(state.model).resolve().is_relative_to(state.output):
        copied = str(linked_copy(Path(state.model), directory))
        state.model = copied
    where = f" -> {directory}" if kind.writes_directory or copied else ""
    note(f"{label}: {_described(kind, step, params)}{where}")
    started = time.perf_counter()
    outcome = kind.run(step, params, state, directory)
    outcome.model = outcome.model or copied
    outcome.result["seconds"] = round(time.perf_counter() - started, 3)
    note(f"{label}: done in {duration(outcome.result['seconds'])}" + _reported(outcome.result))
    return outcome


def _described(kind: StepKind, step: Step, params: dict[str, Any]) -> str:
    """The kind's start line, or the step's kind where its values cannot say more (they are checked later)."""
    try:
        return kind.describe(step, params)
    except RetrofitError:
        return step.describe()


def _reported(result: Mapping[str, Any]) -> str:
    """The numbers a step's end line shows: a finetune's final loss, an eval's perplexity at its longest length."""
    if "final_loss" in result:
        return f" (final loss {result['final_loss']:.4f})"
    if "perplexity" in result and "length" in result:
        return f" (perplexity {result['perplexity']:.3f} at {result['length']})"
    return ""


def with_push(recipe: Recipe, repo: str | None) -> Recipe:
    """`--push-to-hub REPO` adds a final push step when the recipe has none (a push step in it gets REPO)."""
    if repo and not any(step.kind == "push" for step in recipe.steps):
        recipe.steps.append(Step("push", "push", {"repo_id": repo}))
    return recipe


def _earlier_run(out: Path, resume: bool) -> dict[str, Any]:
    """The manifest of the run in `out` to resume ({} for a new run), or an error if `out` cannot take this run.
    Writes nothing: a recipe refused later leaves no directory behind."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"-o {out} is a file; a recipe run writes a directory (a folder per step and the result), "
                          "so name a new or empty directory.")
    manifest_path = out / MANIFEST
    # recipe.yaml is written before the first step and the manifest after it: a run stopped during its first step
    # has the one without the other, and resumes with nothing done.
    if manifest_path.is_file() or (out / "recipe.yaml").is_file():
        if not resume:
            raise RecipeError(f"{out} holds an earlier recipe run; pass --resume (resume=True) to continue it, or "
                              "choose another output directory.")
        return _read_manifest(manifest_path) if manifest_path.is_file() else {}
    try:
        holds_something = out.exists() and any(out.iterdir())
    except OSError as e:
        raise RecipeError(f"cannot read the output directory {out}: {e.strerror}; choose another one.") from None
    if holds_something:
        raise RecipeError(f"{out} exists and is not a recipe run; choose another output directory.")
    return {}


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an earlier run, or an error saying it is damaged (it is written whole, so someone edited it,
    or the disk lost it): which steps are done cannot be known, so nothing is guessed."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        problem = e.strerror
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except ValueError:
        problem = "not JSON"
    else:
        steps = manifest.get("steps") if isinstance(manifest, dict) else None
        if isinstance(steps, list) and all(isinstance(e, dict) and isinstance(e.get("key"), str)
                                           and isinstance(e.get("result"), dict) for e in steps):
            return manifest
        problem = "not the list of steps a run writes"
    raise RecipeError(f"{path} is damaged ({problem}), so --resume cannot tell which steps are done; remove "
                      f"{path.parent} to run every step again, or choose another output directory.")


def _make_directory(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"cannot create the output directory {out}: {e.strerror}; choose another -o.") from None


def _check_before_running(recipe: Recipe, base: str, out: Path, push_repo: str | None) -> list[PlannedStep]:
    """Every step's values checked, as far as they are known before the run (`plan_steps`), on the input's tensor
    metadata (no weights are read) so that the config after each plannable patch is known too."""
    from ..io.checkpoint import load_checkpoint

    if (Path(base) / "adapter_config.json").is_file():  # an adapter as input: no tensors of its own to plan on
        return plan_steps(recipe, base, model_config(base), None, out, push_repo)[0]
    checkpoint = load_checkpoint(base)
    return plan_steps(recipe, base, dict(checkpoint.config), checkpoint.tensors, out, push_repo)[0]


def resolve_params(recipe: Recipe, step: Step, scope: Mapping[str, Any], known_only: bool = False
                   ) -> tuple[dict[str, Any], list[str]]:
    """A step's values with every `${...}` resolved; an error names the value's line. With `known_only`, a value
    that needs what is not known yet becomes `Unknown` instead (the reasons are returned), as before the run."""
    unknown: list[str] = []

    def leaf(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: leaf(v) for k, v in value.items()}
        if isinstance(value, list):
            return [leaf(v) for v in value]
        try:
            return resolve(value, scope)
        except Unresolved as e:
            if not known_only:
                raise
            unknown.append(str(e))
            return Unknown(str(e))

    params = {}
    for key, value in step.params.items():
        try:
            params[key] = leaf(value)
        except RetrofitError as e:
            raise RecipeError(f"{recipe.where(step, key)}: step {step.id}: {e}") from None
    return params, unknown


def _resolve_inputs(recipe: Recipe, state: RunState) -> dict[str, Any]:
    scope = state.scope()
    inputs = {}
    for name, value in state.inputs.items():
        try:
            inputs[name] = resolve(value, scope)
        except RetrofitError as e:
            raise RecipeError(f"{recipe.where(None, name)}: inputs.{name}: {e}") from None
    return inputs


def _step_key(previous: str, step: Step, params: dict[str, Any]) -> str:
    text = json.dumps([previous, step.kind, step.patcher, params], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _advance(state: RunState, step: Step, outcome: StepOutcome) -> None:
    state.results[step.id] = outcome.result
    if outcome.model:
        state.model = outcome.model
        state.model_config = model_config(outcome.model)
    if outcome.eval_results:
        state.eval_results.append(outcome.eval_results)
        if outcome.plot:
            state.plots.append(outcome.plot)


def _write_manifest(out: Path, recipe: Recipe, base: str, entries: list[dict[str, Any]]) -> None:
    manifest = {"recipe": recipe.name, "source": recipe.source, "model": base, "steps": entries}
    temporary = out / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(temporary, out / MANIFEST)  # a crash leaves the old manifest or the new one, never half of one


# --------------------------------------------------------------------------------------------------- dry run


def dry_run(
    model: str | os.PathLike[str],
    recipe: str | os.PathLike[str] | Recipe,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    push_to_hub: str | None = None,
) -> str:
    """The resolved plan of a recipe run, with the estimated tokens, steps and disk writes; runs and writes nothing.
    It refuses what the run would refuse (`plan_steps`), so a dry run that passes is a run that starts every step."""
    from ..io.checkpoint import load_checkpoint

    recipe, overrides = _with_overrides(recipe, overrides, push_to_hub)
    checkpoint = load_checkpoint(model)
    planned, known = plan_steps(recipe, str(checkpoint.path), dict(checkpoint.config), checkpoint.tensors, Path("OUT"),
                                push_to_hub)
    lines = [f"recipe {recipe.name}: {recipe.description}", f"model {checkpoint.path}"]
    if profile_of(overrides):
        lines.append(f"profile {profile_of(overrides)}")
    for item in planned:
        lines.append(f"{item.number}. {item.step.id} ({item.step.describe()})")
        lines += [f"   {key}: {json.dumps(value, default=str)}" for key, value in item.params.items()
                  if not has_unknown(value)]
        if item.unknown:
            lines.append(f"   values known only when run: {'; '.join(dict.fromkeys(item.unknown))}")
        lines += [f"   {note}" for note in item.notes]
        if item.memory is not None:
            lines.append(f"   peak memory: {item.memory.describe()}")
    total = sum(item.bytes_written for item in planned)
    lines.append(f"total weights written: {size_text(total)}" + ("" if known else " (plus steps only known when run)"))
    lines.append(expected_time(planned))
    lines.append(memory_summary(planned))
    return "\n".join(lines)


def memory_summary(planned: list[PlannedStep]) -> str:
    """`peak memory: 4.21 GB (finetune); 20.1 GB free on cpu`: the largest step's estimate against what is free."""
    from ..modeling.memory import available_bytes, gigabytes
    from ..modeling.precision import default_device

    sized = [item for item in planned if item.memory is not None]
    if not sized:
        return "peak memory: unknown (no step's passes are known before the run)"
    largest = max(sized, key=lambda item: item.memory.total)  # type: ignore[union-attr]
    device = default_device()
    free = available_bytes(device)
    return (f"peak memory: {gigabytes(largest.memory.total)} ({largest.step.id})"  # type: ignore[union-attr]
            + (f"; {gigabytes(free)} free on {device}" if free is not None else ""))


class _Pending(Mapping[str, Any]):
    """`${steps.ID...}` of a step not run yet: its output directory is known, whatever it reports is not."""

    def __init__(self, step_id: str, output: str) -> None:
        self.step_id, self.output = step_id, output

    def __getitem__(self, key: str) -> Any:
        return self.output if key == "output" else Unknown(f"the result of step {self.step_id}")

    def __contains__(self, key: object) -> bool:
        return True  # which numbers a step reports is known when it has run; a misspelt one is refused then

    def __iter__(self) -> Iterator[str]:
        return iter(["output"])

    def __len__(self) -> int:
        return 1


def plan_steps(recipe: Recipe, model: str, config: dict[str, Any], tensors: Mapping[str, TensorMeta] | None,
               output: Path, push_repo: str | None) -> tuple[list[PlannedStep], bool]:
    """Every step resolved and checked (its kind's `check`) in order, as far as it is known before anything runs,
    with the dry run's estimates (its kind's `plan`); the first error a run would meet in a value known now is
    raised here.

    Patch steps are planned on the tensor metadata (`tensors`; None for an adapter input), which reads no weights
    and makes the config after them known to later `${model...}`; after a patch that loads the model (a search) or
    whose values are not known, the model is known only when run. Returns the steps, and whether the model after
    the last one is known."""
    from ..plan import ModelView

    view = ModelView(config, dict(tensors)) if tensors is not None else None  # no origin: nothing is loaded
    state = RunState(model, output, dict(recipe.inputs), model, dict(config), dict(config), push_repo=push_repo)
    state.inputs = _resolve_inputs(recipe, state)
    planning = Planning(recipe, state, view)
    planned = []
    for number, step in enumerate(recipe.steps, 1):
        kind = STEP_KINDS[step.kind]
        params, unknown = resolve_params(recipe, step, state.scope(), known_only=True)
        kind.check(recipe, step, params, push_repo)
        item = PlannedStep(number, step, params, unknown)
        item.passes = _passes(recipe, kind, step, params if not unknown else None, planning)
        item.memory = step_footprint(item.passes or [])
        _check_memory(recipe, kind, item)
        kind.plan(item, planning)
        planning.model_is_input = planning.model_is_input and not kind.makes_model
        planned.append(item)
        state.results[step.id] = _Pending(step.id, str(output / f"{number:02d}-{step.id}"))
    return planned, planning.view is not None


def _check_memory(recipe: Recipe, kind: StepKind, item: PlannedStep) -> None:
    """Refuse, before anything runs, a step whose peak memory is more than the machine has free."""
    from ..modeling.memory import shortfall

    short = shortfall(item.memory) if item.memory is not None else None
    if short is not None:
        raise RecipeError(f"{recipe.where(item.step)}: step {item.step.id} will not fit in memory: it {short}. To fit, "
                          f"{kind.memory_advice} (--set {item.step.id}.KEY=VALUE).")


def _passes(recipe: Recipe, kind: StepKind, step: Step, params: dict[str, Any] | None,
            planning: Planning) -> list[Pass] | None:
    """The step's passes, for the time the run expects; None where they are known only when run. Its values known
    only when run that depend on the model alone (`${model.max_position_embeddings}` after a search) are read off
    the model's shape, which is known."""
    if planning.shape is None or planning.base is None:
        return None
    if params is None:
        scope = planning.state.scope() | {"model": dict(planning.shape.config)}
        params, unknown = resolve_params(recipe, step, scope, known_only=True)
        if unknown:
            return None
    try:
        return kind.passes(step, params, planning.shape, planning.base)
    except RetrofitError:  # a value the run refuses, with its own message; nothing to price
        return None


def recipe_summary(recipe: Recipe) -> str:
    steps = " -> ".join(step.describe() for step in recipe.steps)
    return f"{recipe.description}  [{steps}]"


