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
as the step will read them (`plan_steps`, `check_step`): a mistake in the last step is found before an hour-long
first one, and the output directory is not created. A value known only when run (the config after a search, a
number a step reports) is checked when its step starts, before the step does anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RetrofitError
from ..io.progress import quiet_libraries
from .expressions import Unresolved, resolve
from .schema import (SETTINGS, EvalSettings, Recipe, RecipeError, Step, Unknown, load_recipe, parse_recipe,
                     read_settings)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_LINK = "model"

# ------------------------------------------------------------------------------------------------- overrides


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any] | Sequence[str]) -> Recipe:
    """`{"finetune.steps": 200}` or `["finetune.steps=200"]` applied to a copy of the recipe.

    The first part is a step id or `inputs`; the rest is the key (dotted for nested mappings, e.g.
    `finetune.lora.r=8`); a patch step's parameters are addressed directly (`expand.every=2`). Values given as text
    are read as YAML (`200` is a number, `[a, b]` a list). The result is checked like a recipe file.
    """
    pairs = _with_profiles(recipe, _override_pairs(overrides))
    if not pairs:
        return recipe  # the text as written, comments and all, is what is kept beside the model
    data = yaml.safe_load(recipe.text)
    overridden = dict(recipe.overridden)
    for dotted, value in pairs:
        head, _, rest = dotted.partition(".")
        if not rest:
            raise RecipeError(f"--set {dotted}: give STEP.KEY=VALUE or inputs.NAME=VALUE, e.g. finetune.steps=200.")
        if head == "inputs":
            data.setdefault("inputs", {})
            data["inputs"] = data["inputs"] or {}
            target, keys = data["inputs"], rest.split(".")
            path: tuple[Any, ...] = ("inputs", *keys)
        else:
            index = recipe.steps.index(recipe.step(head))
            raw = data["steps"][index]
            step = recipe.steps[index]
            if step.kind == "patch":
                raw["with"] = raw.get("with") or {}
                target = raw["with"]
            else:
                raw[step.kind] = raw.get(step.kind) or {}
                target = raw[step.kind]
            keys = rest.split(".")
            path = ("steps", index, "with" if step.kind == "patch" else step.kind, *keys)
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(f"--set {dotted}: {key} is not a mapping.")
        target[keys[-1]] = value
        overridden[path] = f"--set {dotted}"
    header = f"# {recipe.source} with " + " ".join(f"--set {k}={json.dumps(v, default=str)}" for k, v in pairs) + "\n"
    try:
        text = header + yaml.safe_dump(data, sort_keys=False)
    except yaml.YAMLError:
        raise RecipeError(f"overrides {dict(pairs)!r}: a value must be a number, text, a list or a mapping.") from None
    try:
        result = parse_recipe(text, f"{recipe.source} with --set")
    except RecipeError as e:
        # The line numbers of the re-dumped text mean nothing to the user; the key named in the message does.
        raise RecipeError(re.sub(r"^(.*?):\d+: ", r"\1: ", str(e))) from None
    # Later errors point into the file the user wrote, or name the --set that gave the value.
    result.source, result.overridden = recipe.source, overridden
    result.lines = {p: line for p, line in recipe.lines.items() if not any(p[:len(o)] == o for o in overridden)}
    for new, old in zip(result.steps, recipe.steps):
        new.line = old.line
    return result


def _with_profiles(recipe: Recipe, pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`profile=NAME` replaced by the settings of the recipe's profile NAME, where it stands (a later --set wins)."""
    expanded: list[tuple[str, Any]] = []
    for key, value in pairs:
        if key != "profile":
            expanded.append((key, value))
            continue
        if str(value) not in recipe.profiles:
            known = ", ".join(recipe.profiles) or "none"
            raise RecipeError(f"--set profile={value}: {recipe.source} has no profile {str(value)!r}; its profiles: "
                              f"{known}.")
        expanded += [(str(k), v) for k, v in recipe.profiles[str(value)].items()]
    return expanded


def _override_pairs(overrides: Mapping[str, Any] | Sequence[str]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return [(key, os.fspath(value) if isinstance(value, os.PathLike) else value) for key, value in overrides.items()]
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set finetune.steps=200.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise RecipeError(f"--set {item}: {raw!r} is not a YAML value ({problem}); write a number, text, or a "
                              "complete list such as [a, b] (quote text that starts with [ or {).") from None
        pairs.append((key.strip(), value))
    return pairs


# ---------------------------------------------------------------------------------------------------- state


@dataclass
class RunState:
    """What the steps see and change: the current model, configs, earlier results."""

    base: str
    output: Path
    inputs: dict[str, Any]
    model: str
    model_config: dict[str, Any] | Unknown
    base_config: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_results: list[str] = field(default_factory=list)
    """Every eval step's card results so far, in order: the card shows a section for each."""
    plots: list[str] = field(default_factory=list)
    push_repo: str | None = None
    recipe_text: str = ""

    def scope(self) -> dict[str, Any]:
        return {"model": self.model_config, "base": self.base_config, "inputs": self.inputs, "steps": self.results,
                "output": str(self.output)}


@dataclass
class StepOutcome:
    """A finished step: what it reports (`${steps.ID.KEY}`), and the model it leaves (a directory) if it made one."""

    result: dict[str, Any]
    model: str | None = None
    eval_results: str | None = None
    plot: str | None = None


# ----------------------------------------------------------------------------------------------------- steps


def _patch_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..io.checkpoint import load_checkpoint
    from ..plan import apply_to_checkpoint

    patcher = build_patcher(step, params)
    path = apply_to_checkpoint(load_checkpoint(state.model), [patcher], output=directory)
    return StepOutcome({"output": str(path), "patch": patcher.spec()}, model=str(path))


def build_patcher(step: Step, params: dict[str, Any]) -> Any:
    """The patcher of a patch step from resolved YAML values, each converted as its spec text would be."""
    from ..patchers import get_patcher

    cls = get_patcher(step.patcher or "")
    values = {key: patch_value(cls, key, value) for key, value in params.items()}
    _require_patch_fields(cls, values)
    return cls(**values)


def patch_value(cls: Any, key: str, value: Any) -> Any:
    """One YAML value of a patch step read by the spec language's one reader (`spec.read_field`), as the same value
    in a `--patch` spec is."""
    from ..errors import PatchSpecError
    from ..spec import read_field

    if isinstance(value, (list, dict)):  # a spec value is one value; text `+`-joins several where a patch takes them
        raise PatchSpecError(f"patch {cls.name!r}: {key}={value!r} is not valid; expected one value, not a "
                             f"{'list' if isinstance(value, list) else 'mapping'}. Example: {cls.example}.")
    return read_field(cls, key, value)


def _require_patch_fields(cls: Any, values: Mapping[str, Any]) -> None:
    from ..errors import PatchSpecError

    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PatchSpecError(f"patch {cls.name!r} needs {', '.join(missing)} (under `with:`). Example: {cls.example}.")


def _finetune_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..training.finetune import finetune

    result = finetune(state.model, directory, finetune_settings(params), base=state.base)  # distill's `teacher: base`
    return StepOutcome(result.to_json() | {"output": str(result.path)}, model=str(result.path))


def finetune_settings(params: dict[str, Any]) -> Any:
    """A finetune step's FinetuneSettings from resolved YAML values, each read as its field's type says."""
    from ..training.finetune import FinetuneSettings

    values = read_settings(FinetuneSettings, params)
    if "lora" in values:
        values["lora"] = lora_spec(values["lora"])
    return FinetuneSettings(**values)


def lora_spec(value: Any) -> Any:
    """A finetune step's `lora:` (a mapping of LoraSpec fields, or a `lora:...` spec text) as a LoraSpec."""
    from ..training.lora import LoraSpec, parse_lora

    if value is None or isinstance(value, (str, LoraSpec)):
        return None if value is None else parse_lora(value)
    return parse_lora(read_settings(LoraSpec, _lora_values(value), prefix="lora."))


def _lora_values(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f"lora={value!r} is not valid; expected a mapping of lora settings, e.g. lora: {{r: 16, "
                          "alpha: 32}.")
    from ..training.lora import joined_lists

    return joined_lists(value)


def _eval_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..evaluation.documents import load_documents
    from ..evaluation.report import EvalResult
    from ..evaluation.perplexity import evaluate

    settings = EvalSettings.read(params)
    data = list(settings.data)
    documents = load_documents(data, max_docs=settings.max_docs)
    options = settings.evaluate_options()
    if settings.chat:
        from ..evaluation.conversations import load_conversations

        options["chat"] = load_conversations(settings.chat)
    directory.mkdir(parents=True)
    results = []
    if settings.compare_base or settings.baselines:
        from ..plan import apply_to_model

        base, base_tokenizer = _loadable(state.base, options["dtype"])
        if settings.compare_base:
            results.append(evaluate(base, documents, tokenizer=base_tokenizer, name="before", **options))
        for label, patcher in settings.baseline_patchers():
            alternative = apply_to_model(base, [patcher])
            results.append(evaluate(alternative, documents, tokenizer=base_tokenizer, name=label, **options))
            del alternative
        del base
    model, tokenizer = _loadable(state.model, options["dtype"])
    results.append(evaluate(model, documents, tokenizer=tokenizer, name=settings.labels()[-1],
                            **options))
    result = EvalResult.merge(results)
    result.to_json(directory / "eval.json")
    (directory / "eval.md").write_text(result.to_markdown())
    summary = card_evaluation(result, [*data, *settings.chat])
    (directory / "card-eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_path = str(result.plot(directory / "perplexity.png")) if settings.plot else None
    return StepOutcome({"output": str(directory), **_headline(summary)}, eval_results=str(directory / "card-eval.json"),
                       plot=plot_path)


def _loadable(path: str, dtype: Any = None) -> tuple[Any, Any]:
    """A model directory, or an adapter directory (merged onto its base in memory), with its tokenizer."""
    from ..evaluation.perplexity import default_device, load_model

    if (Path(path) / "adapter_config.json").is_file():
        from transformers import AutoTokenizer

        from ..training.lora import load_merged_adapter

        model = load_merged_adapter(path, dtype)
        return model.to(default_device()).eval(), AutoTokenizer.from_pretrained(path)
    return load_model(path, dtype=dtype)


def card_evaluation(result: Any, data: Any) -> dict[str, Any]:
    """The evaluation in the shape model cards read: {model label: {length: value}} per measure."""
    perplexity = {m.name: {str(r.length): r.perplexity for r in m.perplexity if r.perplexity is not None}
                  for m in result.models}
    passkey = {m.name: {str(n): a for n, a in m.passkey_by_length().items()} for m in result.models if m.passkey}
    chat = {m.name: m.chat["perplexity"] for m in result.models if m.chat}
    name = ", ".join(data) if isinstance(data, list) else str(data)
    summary: dict[str, Any] = {"model": result.models[-1].name, "dataset": {"name": name, "type": "long-documents"},
                               "perplexity": perplexity}
    if passkey:
        summary["passkey"] = passkey
    if chat:
        summary["chat"] = chat
    return summary


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """`${steps.eval.perplexity}`: the evaluated model's perplexity at its longest length."""
    table = summary["perplexity"].get(summary["model"]) or {}
    if not table:
        return {}
    longest = max(table, key=int)
    return {"perplexity": table[longest], "length": int(longest)}


def _card_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..io.commit import linked_copy, replace_file
    from ..publishing.card import RECIPE_FILE, render_card

    model_dir = Path(state.model)
    made = None
    if not model_dir.resolve().is_relative_to(state.output.resolve()):
        # No step before this one wrote a model, so the model is the recipe's input, which a run never writes to:
        # the card goes on a copy of it in this step's directory, made of hard links (free), and that copy is the
        # model the run leaves (and a later push uploads).
        model_dir = linked_copy(model_dir, directory)
        made = str(model_dir)
    # Files of a model written by an earlier step may be hard links to the input's: replace them, never write into them.
    replace_file(model_dir / RECIPE_FILE, state.recipe_text)
    path = render_card(model_dir, eval_results=state.eval_results or None, plot=state.plots or None,
                       repo_id=params.get("repo_id") or state.push_repo, base_model=params.get("base_model"))
    return StepOutcome({"output": str(path)}, model=made)


def _push_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..publishing.hub import push

    repo_id = params.get("repo_id") or state.push_repo  # there is one: check_step ran before this step
    info = push(state.model, repo_id, **{k: v for k, v in params.items() if k != "repo_id"})
    return StepOutcome({"output": str(info), "repo_id": repo_id})


STEP_RUNNERS: dict[str, Callable[[Step, dict[str, Any], RunState, Path], StepOutcome]] = {
    "patch": _patch_step, "finetune": _finetune_step, "eval": _eval_step, "card": _card_step, "push": _push_step,
}
WRITES_DIRECTORY = {"patch", "finetune", "eval"}


# ---------------------------------------------------------------------------------------------------- runner


@dataclass
class RecipeRun:
    """What `run_recipe` did: the final model, each step's result, and which steps were skipped as already done."""

    output: Path
    model: Path
    results: dict[str, dict[str, Any]]
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
    for name, settings in (summary.get("profiles") or {}).items():
        if name != summary.get("profile"):
            shown = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
            lines += ["", f"profile {name} (--set profile={name}): {shown}"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    from ..io.progress import duration

    return duration(seconds)


def _what(step: Step, params: dict[str, Any]) -> str:
    """A step's start line: what it is about to do."""
    try:
        if step.kind == "finetune":
            settings = finetune_settings(params)
            steps = settings.total_steps()
            return (f"{steps} step{'s' if steps != 1 else ''} x {settings.tokens_per_step()} tokens at seq_len "
                    f"{settings.seq_len}" + (" (LoRA)" if settings.lora else ""))
        if step.kind == "eval":
            from ..evaluation.perplexity import evaluate

            settings = EvalSettings.read(params)
            lengths = list(settings.lengths or evaluate.__kwdefaults__["lengths"])
            return f"{', '.join(settings.labels())} on {', '.join(settings.data)} at lengths {lengths}" + (
                ", plus passkey" if settings.passkey else "") + (
                f", plus chat on {', '.join(settings.chat)}" if settings.chat else "")
        if step.kind == "patch":
            shown = ", ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, (list, dict)))
            return f"patch {step.patcher}" + (f" ({shown})" if shown else "")
    except RetrofitError:
        pass
    return step.describe()


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
    from ..io.progress import duration, note

    run_started = time.perf_counter()
    recipe = with_push(apply_overrides(load_recipe(recipe), overrides), push_to_hub)
    out = Path(output).expanduser().resolve()
    manifest = _earlier_run(out, resume)
    base = str(resolve_checkpoint_dir(model))
    _check_before_running(recipe, base, out, push_to_hub)  # what a later step would refuse, refused before the first
    _make_directory(out)
    state = RunState(base, out, dict(recipe.inputs), base, _config(base), _config(base), push_repo=push_to_hub,
                     recipe_text=recipe.text)
    state.inputs = _resolve_inputs(recipe, state)
    (out / "recipe.yaml").write_text(recipe.text, encoding="utf-8")
    done = {entry["key"]: entry for entry in manifest.get("steps", [])}
    entries: list[dict[str, Any]] = []
    ran, skipped = [], []
    previous_key = hashlib.sha256(f"{recipe.name}\0{base}".encode()).hexdigest()[:16]
    for number, step in enumerate(recipe.steps, 1):
        params, _ = resolve_params(recipe, step, state.scope())
        check_step(recipe, step, params, push_to_hub)  # the values known only now (after a search, say)
        key = _step_key(previous_key, step, params)
        directory = out / f"{number:02d}-{step.id}"
        entry = done.get(key)
        if entry is not None and (step.kind not in WRITES_DIRECTORY or directory.is_dir()) and not ran:
            outcome = StepOutcome(entry["result"], entry.get("model"), entry.get("eval_results"), entry.get("plot"))
            skipped.append(step.id)
            note(f"step {number}/{len(recipe.steps)} {step.id}: already done in {directory}, skipped (--resume)")
        else:
            if directory.exists():
                shutil.rmtree(directory)  # an earlier, different run of this step; it is redone
            where = f" -> {directory}" if step.kind in WRITES_DIRECTORY else ""
            note(f"step {number}/{len(recipe.steps)} {step.id}: {_what(step, params)}{where}")
            started = time.perf_counter()
            outcome = STEP_RUNNERS[step.kind](step, params, state, directory)
            outcome.result["seconds"] = round(time.perf_counter() - started, 3)
            note(f"step {number}/{len(recipe.steps)} {step.id}: done in {duration(outcome.result['seconds'])}"
                 + _reported(outcome.result))
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
                     profile=_profile_of(overrides), seconds=time.perf_counter() - run_started)


def _profile_of(overrides: Mapping[str, Any] | Sequence[str] | None) -> str | None:
    found = [str(value) for key, value in _override_pairs(overrides or []) if key == "profile"]
    return found[-1] if found else None


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


def _check_before_running(recipe: Recipe, base: str, out: Path, push_repo: str | None) -> None:
    """Every step's values checked, as far as they are known before the run (`plan_steps`), on the input's tensor
    metadata (no weights are read) so that the config after each plannable patch is known too."""
    from ..io.checkpoint import load_checkpoint

    if (Path(base) / "adapter_config.json").is_file():  # an adapter as input: no tensors of its own to plan on
        plan_steps(recipe, base, _config(base), None, out, push_repo)
        return
    checkpoint = load_checkpoint(base)
    plan_steps(recipe, base, dict(checkpoint.config), checkpoint.tensors, out, push_repo)


def _config(path: str) -> dict[str, Any]:
    directory = Path(path)
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _config(base)
    return json.loads((directory / "config.json").read_text())


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
        state.model_config = _config(outcome.model)
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

    recipe = with_push(apply_overrides(load_recipe(recipe), overrides), push_to_hub)
    checkpoint = load_checkpoint(model)
    planned, known = plan_steps(recipe, str(checkpoint.path), dict(checkpoint.config), checkpoint.tensors, Path("OUT"),
                                push_to_hub)
    lines = [f"recipe {recipe.name}: {recipe.description}", f"model {checkpoint.path}"]
    for item in planned:
        lines.append(f"{item.number}. {item.step.id} ({item.step.describe()})")
        lines += [f"   {key}: {json.dumps(value, default=str)}" for key, value in item.params.items()
                  if not _has_unknown(value)]
        if item.unknown:
            lines.append(f"   values known only when run: {'; '.join(dict.fromkeys(item.unknown))}")
        lines += [f"   {note}" for note in item.notes]
    total = sum(item.bytes_written for item in planned)
    lines.append(f"total weights written: {_size(total)}" + ("" if known else " (plus steps only known when run)"))
    return "\n".join(lines)


@dataclass
class PlannedStep:
    """A step as known before the run: its values (`Unknown` where known only when run) and what it will do."""

    number: int
    step: Step
    params: dict[str, Any]
    unknown: list[str]
    """Why some values are known only when run."""
    notes: list[str] = field(default_factory=list)
    """The dry run's estimates: what a patch writes, a finetune's tokens, an evaluation's lengths."""
    bytes_written: int = 0


class _Pending(Mapping[str, Any]):
    """`${steps.ID...}` of a step not run yet: its output directory is known, whatever it reports is not."""

    def __init__(self, step_id: str, output: str) -> None:
        self.step_id, self.output = step_id, output

    def __getitem__(self, key: str) -> Any:
        return self.output if key == "output" else Unknown(f"the result of step {self.step_id}")

    def __contains__(self, key: object) -> bool:
        return True  # which numbers a step reports is known when it has run; a misspelt one is refused then

    def __iter__(self) -> typing.Iterator[str]:
        return iter(["output"])

    def __len__(self) -> int:
        return 1


def plan_steps(recipe: Recipe, model: str, config: dict[str, Any], tensors: Mapping[str, Any] | None, output: Path,
               push_repo: str | None) -> tuple[list[PlannedStep], bool]:
    """Every step resolved and checked (`check_step`) in order, as far as it is known before anything runs, with
    the dry run's estimates; the first error a run would meet in a value known now is raised here.

    Patch steps are planned on the tensor metadata (`tensors`; None for an adapter input), which reads no weights
    and makes the config after them known to later `${model...}`; after a patch that loads the model (a search) or
    whose values are not known, the model is known only when run. Returns the steps, and whether the model after
    the last one is known."""
    from ..plan import ModelView, PlanSummary, build_plan

    view = ModelView(config, tensors) if tensors is not None else None  # no origin: nothing is loaded
    state = RunState(model, output, dict(recipe.inputs), model, dict(config), dict(config), push_repo=push_repo)
    state.inputs = _resolve_inputs(recipe, state)
    planned = []
    for number, step in enumerate(recipe.steps, 1):
        params, unknown = resolve_params(recipe, step, state.scope(), known_only=True)
        check_step(recipe, step, params, push_repo)
        item = PlannedStep(number, step, params, unknown)
        planned.append(item)
        state.results[step.id] = _Pending(step.id, str(output / f"{number:02d}-{step.id}"))  # type: ignore[assignment]
        if step.kind == "patch":
            patcher = None if unknown else build_patcher(step, params)
            if patcher is None or patcher.loads_model() or view is None:
                if patcher is None:
                    why = "whose values are not known before the run"
                elif patcher.loads_model():
                    why = "which loads the model to compute its result"
                    item.notes.append("plan known only when run: this patch loads the model to compute its result")
                else:
                    why = "whose input is known only when run"
                    item.notes.append("plan known only when run: the model before it is known only when run")
                state.model_config, view = Unknown(f"step {step.id}, {why}"), None
                continue
            try:
                plan = build_plan(view, [patcher])
            except RetrofitError as e:
                raise RecipeError(f"{recipe.where(step)}: step {step.id}: {e}") from None
            item.bytes_written = PlanSummary.of(plan, view).bytes_to_write
            item.notes.append(f"writes {_size(item.bytes_written)}"
                              + ("" if item.bytes_written else " (config only; weight files linked)"))
            view, state.model_config = plan.view, dict(plan.config)
        elif step.kind == "finetune" and not unknown:
            settings = finetune_settings(params)
            steps, per_step = settings.total_steps(), settings.tokens_per_step()
            item.notes.append(f"{steps} steps x {per_step} tokens = {steps * per_step} tokens per process")
            if view is not None:
                item.bytes_written = _finetune_bytes(settings, view)
                adapter = " (adapter)" if settings.lora and not settings.lora.merge else ""
                item.notes.append(f"writes {_size(item.bytes_written)}{adapter}")
            else:
                item.notes.append("writes a model the size of the one before it")
        elif step.kind == "eval" and not unknown:
            from ..evaluation.perplexity import evaluate

            settings = EvalSettings.read(params)
            lengths = list(settings.lengths or evaluate.__kwdefaults__["lengths"])
            models = len(settings.labels())
            item.notes.append(f"{models} model(s) ({', '.join(settings.labels())}) at lengths {lengths}: up to {max(lengths)} tokens per document per "
                              f"model{', plus passkey prompts' if settings.passkey else ''}")
    return planned, view is not None


# ----------------------------------------------------------------------------------------------------- checks


def check_step(recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None = None) -> None:
    """Raise, naming the line, the error `step` would give when run, for every value known now.

    Each value is read as the step's typed spec reads it: a patcher's dataclass fields as `--patch` reads them,
    `FinetuneSettings` and `LoraSpec` fields, `EvalSettings` / `CardSettings` / `PushSettings`. Then the spec is
    built whole, which checks the values together (one budget, a stride within the lengths); with an `Unknown`
    value (known only when run) that waits for the run, except for a finetune (see `_finetune_stand_ins`).
    """
    def at(check: Callable[[], Any], *keys: Any) -> Any:
        """check(), its error given the line of `keys` (of the step itself, with none)."""
        try:
            return check()
        except RetrofitError as e:
            raise RecipeError(f"{recipe.where(step, *keys)}: step {step.id}: {e}") from None

    complete = not _has_unknown(params)
    if step.kind == "patch":
        from ..patchers import get_patcher

        cls = at(lambda: get_patcher(step.patcher or ""))
        for key, value in params.items():
            if not _has_unknown(value):
                at(lambda: patch_value(cls, key, value), key)
        at(lambda: _require_patch_fields(cls, params))
        if complete:
            at(lambda: build_patcher(step, params))
    elif step.kind == "finetune":
        from ..training.finetune import FinetuneSettings
        from ..training.lora import LoraSpec

        for key, value in params.items():
            if key == "lora" and not isinstance(value, (str, Unknown, type(None))):  # a spec text is read whole
                for name, item in at(lambda: _lora_values(value), key).items():
                    at(lambda: read_settings(LoraSpec, {name: item}, prefix="lora."), key, name)
            else:
                at(lambda: read_settings(FinetuneSettings, {key: value}), key)
        at(lambda: finetune_settings(params if complete else _finetune_stand_ins(params)))
        distill = params.get("distill")
        # A missing teacher is refused before the first step; one that is an earlier step's output exists once it ran.
        if distill is not None and not _has_unknown(distill) and "${steps." not in str(step.params.get("distill")):
            from ..training.distill import check_teacher, parse_distill

            at(lambda: check_teacher(parse_distill(distill).teacher), "distill")
    else:
        settings = SETTINGS[step.kind]
        for key, value in params.items():
            at(lambda: read_settings(settings, {key: value}), key)
        if complete:
            at(lambda: settings.read(params))
        if step.kind == "push" and not (params.get("repo_id") or push_repo):
            raise RecipeError(f"{recipe.where(step)}: step {step.id}: push needs repo_id; add `repo_id: you/model` to "
                              f"the step, or pass --set {step.id}.repo_id=you/model or --push-to-hub you/model.")
        repo_id = params.get("repo_id") or push_repo
        if step.kind == "push" and isinstance(repo_id, str):  # refused now, not after the steps before the push
            from ..publishing.hub import check_repo_id

            at(lambda: check_repo_id(repo_id), "repo_id")


def _finetune_stand_ins(params: dict[str, Any]) -> dict[str, Any]:
    """A finetune step's known values for checking them together before the run, without those known only then.

    What FinetuneSettings checks together is one budget (steps or tokens), s2_attn with a seq_len in 4 even groups,
    and lora without train. An unknown budget stands in as 1 (it is given, so "steps and tokens" is still refused);
    any other unknown value is left out, so its default stands in: seq_len 1024 suits s2_attn, no lora and train
    `all` conflict with nothing. So no error here can come from a stand-in; the real values are checked when known.
    """
    known: dict[str, Any] = {}
    for key, value in params.items():
        if key in ("steps", "tokens") and isinstance(value, Unknown):
            known[key] = 1
        elif isinstance(value, list):
            items = [v for v in value if not _has_unknown(v)]
            if items:
                known[key] = items
        elif not _has_unknown(value):
            known[key] = value
    return known


def _has_unknown(value: Any) -> bool:
    if isinstance(value, Unknown):
        return True
    if isinstance(value, dict):
        return any(_has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_unknown(v) for v in value)
    return False


def _finetune_bytes(settings: Any, view: Any) -> int:
    full = sum(meta.nbytes for meta in view.tensors.values())
    if settings.lora is None or settings.lora.merge:
        return full
    lora = settings.lora
    targets = lora.targets
    total = 0
    for name, meta in view.tensors.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
        if len(meta.shape) == 2 and (targets == "all-linear" and "lm_head" not in name or module in targets):
            total += lora.r * (meta.shape[0] + meta.shape[1]) * 4
    extra = {m for t in lora.extra_trainables for m in (["embed_tokens"] if t == "embed_tokens" else
                                                         ["norm", "layernorm"] if t == "norm" else ["lm_head"])}
    total += sum(meta.nbytes for name, meta in view.tensors.items() if any(e in name for e in extra))
    return total


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def recipe_summary(recipe: Recipe) -> str:
    steps = " -> ".join(step.describe() for step in recipe.steps)
    return f"{recipe.description}  [{steps}]"


