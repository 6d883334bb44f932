"""The `patch` step: any registered patcher, its values read as a `--patch` spec reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import RetrofitError
from ...modeling.cost import Pass
from ..schema import Recipe, RecipeError, Step, Unknown
from ..values import build_patcher, patch_value, require_patch_fields
from .base import PlannedStep, Planning, RunState, StepKind, StepOutcome, at, has_unknown, size_text

if TYPE_CHECKING:
    from ...plan import ModelView
    from ...spec import Patcher


class PatchStep(StepKind):
    kind: ClassVar[str] = "patch"
    memory_advice: ClassVar[str] = ("a calibration holds one layer and the calibration tokens' hidden states: lower "
                                     "calibration_tokens; a search holds the model and a pass of the target length")
    writes_directory: ClassVar[bool] = True
    makes_model: ClassVar[bool] = True

    def check(self, recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None) -> None:
        """Each value as `--patch` reads it, the required ones given, then (all known) the patcher built whole."""
        from ...patchers import get_patcher

        cls = at(recipe, step, lambda: get_patcher(step.patcher or ""))
        for key, value in params.items():
            if not has_unknown(value):
                at(recipe, step, lambda: patch_value(cls, key, value), key)
        at(recipe, step, lambda: require_patch_fields(cls, params))
        if not has_unknown(params):
            at(recipe, step, lambda: build_patcher(step, params))

    def plan(self, item: PlannedStep, planning: Planning) -> None:
        """On the tensor metadata, what the patch writes and the config after it (for later `${model...}`). A patch
        that loads the model (a search, a calibration) is checked against the model (`Patcher.check`, what its own
        dry run refuses before it loads anything); what it makes is known only when run, as is everything after a
        patch whose values or input are known only when run."""
        from ...plan import PlanSummary, build_plan

        patcher = None if item.unknown else build_patcher(item.step, item.params)
        if patcher is not None and planning.view is not None and patcher.loads_model():
            _check_on(patcher, planning.view, planning.recipe, item)
        if patcher is None or patcher.loads_model() or planning.view is None:
            _shape_after(patcher, planning)  # the plan below gives the shape where it can be made
            if patcher is None:
                why = "whose values are not known before the run"
            elif patcher.loads_model():
                why = "which loads the model to compute its result"
                item.notes.append("plan known only when run: this patch loads the model to compute its result")
            else:
                why = "whose input is known only when run"
                item.notes.append("plan known only when run: the model before it is known only when run")
            planning.state.model_config, planning.view = Unknown(f"step {item.step.id}, {why}"), None
            return
        plan = at(planning.recipe, item.step, lambda: build_plan(planning.view, [patcher]))  # type: ignore[arg-type]
        item.bytes_written = PlanSummary.of(plan, planning.view).bytes_to_write
        item.notes.append(f"writes {size_text(item.bytes_written)}"
                          + ("" if item.bytes_written else " (config only; weight files linked)"))
        planning.view, planning.state.model_config = plan.view, dict(plan.config)
        planning.shape = planning.view

    def passes(self, step: Step, params: dict[str, Any], shape: ModelView, base: ModelView) -> list[Pass]:
        """A patch that runs the model (a search) makes its passes on the model before it."""
        return build_patcher(step, params).passes(shape.config)

    def describe(self, step: Step, params: dict[str, Any]) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, (list, dict)))
        return f"patch {step.patcher}" + (f" ({shown})" if shown else "")

    def run(self, step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
        from ...io.checkpoint import load_checkpoint
        from ...plan import apply_to_checkpoint

        patcher = build_patcher(step, params)
        path = apply_to_checkpoint(load_checkpoint(state.model), [patcher], output=directory)
        return StepOutcome({"output": str(path), "patch": patcher.spec()}, model=str(path))


def _shape_after(patcher: Patcher | None, planning: Planning) -> None:
    """The model's shape after the patch: its `shape_plan`, which stands in for what only running it can tell (the
    plan made below replaces it where the patch can be planned whole)."""
    try:
        shaped = patcher.shape_plan(planning.shape) if patcher is not None and planning.shape is not None else None
    except RetrofitError:  # the run refuses it with the plan's own message; pricing has nothing to say then
        shaped = None
    planning.shape = shaped.view if shaped is not None else None


def _check_on(patcher: Patcher, view: ModelView, recipe: Recipe, item: PlannedStep) -> None:
    """`patcher.check(view)`, its error followed by the numbers of the step that expressions computed (the mistake
    may be in an input they read, `--set inputs.factor=-5`)."""
    try:
        patcher.check(view)
    except RetrofitError as e:
        computed = [f"{key}: {item.step.params[key]} = {json.dumps(value, default=str)}"
                    for key, value in item.params.items()
                    if isinstance(value, (int, float)) and "${" in str(item.step.params.get(key))]
        shown = f" ({'; '.join(computed)})" if computed else ""
        raise RecipeError(f"{recipe.where(item.step)}: step {item.step.id}: {e}{shown}") from None
