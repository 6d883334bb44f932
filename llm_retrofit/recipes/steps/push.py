"""The `push` step: the step's model uploaded to the Hub (`--push-to-hub REPO` adds one at the end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..schema import PushSettings, Recipe, RecipeError, Step
from .base import PlannedStep, Planning, RunState, StepKind, StepOutcome, at, check_settings


class PushStep(StepKind):
    kind: ClassVar[str] = "push"
    writes_into_model: ClassVar[bool] = True  # `push` writes the card for the repo before it uploads

    def check(self, recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None) -> None:
        """The settings, and a valid repo id (refused now, not after the steps before the push)."""
        check_settings(recipe, step, params, PushSettings)
        repo_id = params.get("repo_id") or push_repo
        if not repo_id:
            raise RecipeError(f"{recipe.where(step)}: step {step.id}: push needs repo_id; add `repo_id: you/model` to "
                              f"the step, or pass --set {step.id}.repo_id=you/model or --push-to-hub you/model.")
        if isinstance(repo_id, str):
            from ...publishing.hub import check_repo_id

            at(recipe, step, lambda: check_repo_id(repo_id), "repo_id")

    def plan(self, item: PlannedStep, planning: Planning) -> None:
        """A push of the recipe's input (no step before it makes a model) uploads a copy of it with a card of ours;
        a card of someone else's there (the source model's) would be refused at the push, after every step before
        it: refused now."""
        if not planning.model_is_input:
            return
        from ...publishing.card import read_existing_card
        from ...publishing.lineage import CARD_FILE

        existing = read_existing_card(Path(planning.state.model))
        if existing.exists and not existing.ours:
            raise RecipeError(f"{planning.recipe.where(item.step)}: step {item.step.id}: no step before the push makes "
                              f"a model, so it would upload the input {planning.state.model}, whose {CARD_FILE} was "
                              "not written by llm-retrofit and would describe the wrong model; add a `- card: {}` step "
                              "before the push (it writes the card on a copy; the input is never written to).")

    def run(self, step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
        from ...publishing.hub import push

        repo_id = params.get("repo_id") or state.push_repo  # there is one: `check` ran before this step
        info = push(state.model, repo_id, **{k: v for k, v in params.items() if k != "repo_id"})
        return StepOutcome({"output": str(info), "repo_id": repo_id})
