"""Running a recipe: resolve each step's values, run it, keep its output under OUT with a manifest, resume.

OUT holds one directory per step that writes something (`01-expand/`, `02-finetune/`, `03-eval/`), the recipe as
run (`recipe.yaml`), `manifest.json`, and `model`, a link to the last model. A step is identified by a key: the hash
of its kind, its resolved values and the previous step's key. A re-run with `resume` skips every step whose key is in
the manifest with its output present, so a crash or Ctrl-C costs only the unfinished step; a changed value (an
override, an edited recipe) re-runs that step and everything after it. Patch and finetune outputs are written
atomically (a staging directory renamed at the end), so a half-written step never looks finished.

Values are resolved when their step runs, so they can use what earlier steps produced:
- `${model.KEY}` the config of the model the step works on (after the previous patches and finetunes);
- `${base.KEY}` the config of the recipe's input model; `${inputs.NAME}` an input;
- `${steps.ID.output}` an earlier step's output directory, `${steps.ID.KEY}` a number it reported;
- arithmetic on those: `${base.max_position_embeddings * 4}`, `${max(1, base.num_hidden_layers // 4)}`.
A string that is one `${...}` takes the expression's type; `${...}` inside a longer string is formatted into it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import operator
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
from .schema import Recipe, RecipeError, Step, load_recipe, parse_recipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_LINK = "model"

# ----------------------------------------------------------------------------------------------- expressions

_EXPRESSION = re.compile(r"\$\{([^}]*)\}")
_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "int": int, "round": round, "float": float}


class Unresolved(RecipeError):
    """A value needs something not known yet (a dry run before the step that produces it)."""


def evaluate_expression(text: str, scope: Mapping[str, Any]) -> Any:
    """Evaluate `model.max_position_embeddings * 4` and the like: names, attributes, numbers, + - * / // % **,
    and min/max/int/round/float. Nothing else (no calls of other functions, no subscripts) is accepted."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise RecipeError(f"${{{text}}} is not an expression; write e.g. ${{base.max_position_embeddings * 4}}.") from None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            return _lookup(_dotted(node), scope, text)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _FUNCTIONS[node.func.id](*map(walk, node.args))
        raise RecipeError(f"${{{text}}}: only names, numbers, arithmetic and {', '.join(_FUNCTIONS)} are allowed.")

    return walk(tree)


def _dotted(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + [node.attr]
    raise RecipeError("only dotted names (model.hidden_size) can be looked up.")


def _lookup(path: list[str], scope: Mapping[str, Any], text: str) -> Any:
    value: Any = scope
    for depth, part in enumerate(path):
        if isinstance(value, Unknown):
            raise Unresolved(f"${{{text}}} depends on {value.why}")
        if not isinstance(value, Mapping) or part not in value:
            where = ".".join(path[:depth]) or "the scope"
            options = ", ".join(sorted(map(str, value))) if isinstance(value, Mapping) else "nothing"
            raise RecipeError(f"${{{text}}}: {where} has no {part!r}; it has {options}.")
        value = value[part]
    if isinstance(value, Unknown):
        raise Unresolved(f"${{{text}}} depends on {value.why}")
    return value


@dataclass(frozen=True)
class Unknown:
    """A value a dry run cannot know (the config after a patch that must search, a step's measured result)."""

    why: str


def resolve(value: Any, scope: Mapping[str, Any]) -> Any:
    """Every `${...}` in a (nested) value replaced by its value."""
    if isinstance(value, dict):
        return {k: resolve(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, scope) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _EXPRESSION.fullmatch(value.strip())
    if whole:
        return evaluate_expression(whole.group(1), scope)
    return _EXPRESSION.sub(lambda m: str(evaluate_expression(m.group(1), scope)), value)


# ------------------------------------------------------------------------------------------------- overrides


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any] | Sequence[str]) -> Recipe:
    """`{"finetune.steps": 200}` or `["finetune.steps=200"]` applied to a copy of the recipe.

    The first part is a step id or `inputs`; the rest is the key (dotted for nested mappings, e.g.
    `finetune.lora.r=8`); a patch step's parameters are addressed directly (`expand.every=2`). Values given as text
    are read as YAML (`200` is a number, `[a, b]` a list). The result is checked like a recipe file.
    """
    pairs = _override_pairs(overrides)
    if not pairs:
        return recipe  # the text as written, comments and all, is what is kept beside the model
    data = yaml.safe_load(recipe.text)
    for dotted, value in pairs:
        head, _, rest = dotted.partition(".")
        if not rest:
            raise RecipeError(f"--set {dotted}: give STEP.KEY=VALUE or inputs.NAME=VALUE, e.g. finetune.steps=200.")
        if head == "inputs":
            data.setdefault("inputs", {})
            data["inputs"] = data["inputs"] or {}
            target, keys = data["inputs"], rest.split(".")
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
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(f"--set {dotted}: {key} is not a mapping.")
        target[keys[-1]] = value
    header = f"# {recipe.source} with " + " ".join(f"--set {k}={json.dumps(v)}" for k, v in pairs) + "\n"
    text = header + yaml.safe_dump(data, sort_keys=False)
    try:
        return parse_recipe(text, f"{recipe.source} with --set")
    except RecipeError as e:
        # The line numbers of the re-dumped text mean nothing to the user; the key named in the message does.
        raise RecipeError(re.sub(r"^(.*?):\d+: ", r"\1: ", str(e))) from None


def _override_pairs(overrides: Mapping[str, Any] | Sequence[str]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set finetune.steps=200.")
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
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
    eval_results: str | None = None
    plot: str | None = None
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
    from ..spec import parse_value

    cls = get_patcher(step.patcher or "")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in params.items():
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        values[key] = parse_value(cls, key, text, hints[key])
    return cls(**values)


def _finetune_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..training.finetune import finetune

    result = finetune(state.model, directory, finetune_settings(params))
    return StepOutcome(result.to_json() | {"output": str(result.path)}, model=str(result.path))


def finetune_settings(params: dict[str, Any]) -> Any:
    from ..training.finetune import FinetuneSettings

    values = dict(params)
    for key in ("data", "train"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return FinetuneSettings(**values)


def _eval_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..evaluation.documents import load_documents
    from ..evaluation.report import EvalResult
    from ..evaluation.perplexity import evaluate
    from ..spec import DTYPES

    settings = dict(params)
    data = settings.pop("data", ["bundled:python-docs"])
    compare_base = settings.pop("compare_base", False)
    plot = settings.pop("plot", True)
    dtype = settings.pop("dtype", None)
    documents = load_documents([data] if isinstance(data, str) else data, max_docs=settings.get("max_docs"))
    options = dict(settings, dtype=DTYPES[str(dtype).lower()] if dtype else None)
    directory.mkdir(parents=True)
    results = []
    if compare_base:
        results.append(evaluate(state.base, documents, name="before", **options))
    model, tokenizer = _loadable(state.model, options["dtype"])
    results.append(evaluate(model, documents, tokenizer=tokenizer, name="after" if compare_base else "model", **options))
    result = EvalResult.merge(results)
    result.to_json(directory / "eval.json")
    (directory / "eval.md").write_text(result.to_markdown())
    summary = card_evaluation(result, data)
    (directory / "card-eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_path = str(result.plot(directory / "perplexity.png")) if plot else None
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
    name = ", ".join(data) if isinstance(data, list) else str(data)
    summary: dict[str, Any] = {"model": result.models[-1].name, "dataset": {"name": name, "type": "long-documents"},
                               "perplexity": perplexity}
    if passkey:
        summary["passkey"] = passkey
    return summary


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """`${steps.eval.perplexity}`: the evaluated model's perplexity at its longest length."""
    table = summary["perplexity"].get(summary["model"]) or {}
    if not table:
        return {}
    longest = max(table, key=int)
    return {"perplexity": table[longest], "length": int(longest)}


def _card_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..publishing.card import RECIPE_FILE, render_card

    model_dir = Path(state.model)
    (model_dir / RECIPE_FILE).write_text(state.recipe_text, encoding="utf-8")
    path = render_card(model_dir, eval_results=state.eval_results, plot=state.plot,
                       repo_id=params.get("repo_id") or state.push_repo, base_model=params.get("base_model"))
    return StepOutcome({"output": str(path)})


def _push_step(step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
    from ..publishing.hub import push

    repo_id = params.get("repo_id") or state.push_repo
    if not repo_id:
        raise RecipeError(f"step {step.id}: push needs repo_id (in the recipe, --set {step.id}.repo_id=..., "
                          "or --push-to-hub REPO).")
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

    recipe = with_push(apply_overrides(load_recipe(recipe), overrides), push_to_hub)
    out = Path(output).expanduser().resolve()
    manifest = _open_output(out, resume)
    base = str(resolve_checkpoint_dir(model))
    state = RunState(base, out, dict(recipe.inputs), base, _config(base), _config(base), push_repo=push_to_hub,
                     recipe_text=recipe.text)
    state.inputs = resolve(state.inputs, state.scope())
    (out / "recipe.yaml").write_text(recipe.text, encoding="utf-8")
    done = {entry["key"]: entry for entry in manifest.get("steps", [])}
    entries: list[dict[str, Any]] = []
    ran, skipped = [], []
    previous_key = hashlib.sha256(f"{recipe.name}\0{base}".encode()).hexdigest()[:16]
    for number, step in enumerate(recipe.steps, 1):
        params = _resolve_step(recipe, step, state)
        key = _step_key(previous_key, step, params)
        directory = out / f"{number:02d}-{step.id}"
        entry = done.get(key)
        if entry is not None and (step.kind not in WRITES_DIRECTORY or directory.is_dir()) and not ran:
            outcome = StepOutcome(entry["result"], entry.get("model"), entry.get("eval_results"), entry.get("plot"))
            skipped.append(step.id)
            log.info("recipe: step %s already done, skipped", step.id)
        else:
            if directory.exists():
                shutil.rmtree(directory)  # an earlier, different run of this step; it is redone
            log.info("recipe %s: step %d/%d %s", recipe.name, number, len(recipe.steps), step.describe())
            started = time.perf_counter()
            outcome = STEP_RUNNERS[step.kind](step, params, state, directory)
            outcome.result["seconds"] = round(time.perf_counter() - started, 3)
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
    return RecipeRun(out, Path(state.model), state.results, ran, skipped)


def with_push(recipe: Recipe, repo: str | None) -> Recipe:
    """`--push-to-hub REPO` adds a final push step when the recipe has none (a push step in it gets REPO)."""
    if repo and not any(step.kind == "push" for step in recipe.steps):
        recipe.steps.append(Step("push", "push", {"repo_id": repo}))
    return recipe


def _open_output(out: Path, resume: bool) -> dict[str, Any]:
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        if not resume:
            raise RecipeError(f"{out} holds an earlier recipe run; pass --resume (resume=True) to continue it, or "
                              "choose another output directory.")
        return json.loads(manifest_path.read_text())
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out} exists and is not a recipe run; choose another output directory.")
    out.mkdir(parents=True, exist_ok=True)
    return {}


def _config(path: str) -> dict[str, Any]:
    directory = Path(path)
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _config(base)
    return json.loads((directory / "config.json").read_text())


def _resolve_step(recipe: Recipe, step: Step, state: RunState) -> dict[str, Any]:
    try:
        return resolve(step.params, state.scope())
    except RetrofitError as e:
        raise type(e)(f"{recipe.source}:{step.line}: step {step.id}: {e}") from None


def _step_key(previous: str, step: Step, params: dict[str, Any]) -> str:
    text = json.dumps([previous, step.kind, step.patcher, params], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _advance(state: RunState, step: Step, outcome: StepOutcome) -> None:
    state.results[step.id] = outcome.result
    if outcome.model:
        state.model = outcome.model
        state.model_config = _config(outcome.model)
    if outcome.eval_results:
        state.eval_results, state.plot = outcome.eval_results, outcome.plot


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
    """The resolved plan of a recipe run, with the estimated tokens, steps and disk writes; runs and writes nothing."""
    from ..io.checkpoint import load_checkpoint
    from ..plan import ModelView, PlanSummary, build_plan

    recipe = with_push(apply_overrides(load_recipe(recipe), overrides), push_to_hub)
    checkpoint = load_checkpoint(model)
    view: ModelView | None = ModelView(checkpoint.config, checkpoint.tensors)  # no origin: a dry run loads nothing
    state = RunState(str(checkpoint.path), Path("OUT"), dict(recipe.inputs), str(checkpoint.path),
                     dict(checkpoint.config), dict(checkpoint.config), push_repo=push_to_hub)
    state.inputs = resolve(state.inputs, state.scope())
    lines = [f"recipe {recipe.name}: {recipe.description}", f"model {checkpoint.path}"]
    total_bytes = 0
    for number, step in enumerate(recipe.steps, 1):
        lines.append(f"{number}. {step.id} ({step.describe()})")
        try:
            params = resolve(step.params, state.scope())
        except Unresolved as e:
            lines.append(f"   values known only when run: {e}")
            state.results[step.id] = {"output": f"OUT/{number:02d}-{step.id}"}
            if step.kind == "patch":  # a finetune or an eval leaves the config as it was
                state.model_config, view = Unknown(f"step {step.id}, whose values are not known before the run"), None
            continue
        lines += [f"   {key}: {json.dumps(value, default=str)}" for key, value in params.items()]
        state.results[step.id] = {"output": f"OUT/{number:02d}-{step.id}"}
        if step.kind == "patch":
            try:
                patcher = build_patcher(step, params)
                if view is None:
                    raise Unresolved("the model before it is known only when run")
                if patcher.loads_model():  # a search or activations: a dry run loads nothing
                    lines.append("   plan known only when run: this patch loads the model to compute its result")
                    state.model_config, view = Unknown(f"step {step.id}, which loads the model to compute its result"), None
                    continue
                plan = build_plan(view, [patcher])
            except Unresolved as e:
                lines.append(f"   plan known only when run: {e}")
                state.model_config, view = Unknown(f"step {step.id}"), None
                continue
            except RetrofitError as e:
                raise type(e)(f"{recipe.source}:{step.line}: step {step.id}: {e}") from None
            summary = PlanSummary.of(plan, view)
            written = summary.bytes_to_write
            total_bytes += written
            lines.append(f"   writes {_size(written)}" + ("" if written else " (config only; weight files linked)"))
            view = plan.view
            state.model_config = dict(plan.config)
        elif step.kind == "finetune":
            settings = finetune_settings(params)
            steps = settings.total_steps()
            lines.append(f"   {steps} steps x {settings.tokens_per_step()} tokens = {steps * settings.tokens_per_step()} "
                         "tokens per process")
            if view is not None:
                written = _finetune_bytes(settings, view)
                total_bytes += written
                lines.append(f"   writes {_size(written)}" + (" (adapter)" if settings.lora and not settings.lora.merge else ""))
            else:
                lines.append("   writes a model the size of the one before it")
        elif step.kind == "eval":
            lengths = params.get("lengths", [2048, 4096, 8192])
            models = 2 if params.get("compare_base") else 1
            lines.append(f"   {models} model(s) at lengths {lengths}: up to {max(lengths)} tokens per document per "
                         f"model{', plus passkey prompts' if params.get('passkey') else ''}")
        state.results[step.id].update({k: Unknown(f"the result of step {step.id}") for k in ("perplexity", "length")})
    lines.append(f"total weights written: {_size(total_bytes)}" + (" (plus steps only known when run)" if view is None else ""))
    return "\n".join(lines)


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


