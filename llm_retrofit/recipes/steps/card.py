"""The `card` step: the model card (README.md) of the step's model, with the recipe and every evaluation so far."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..schema import CardSettings, Recipe, Step
from .base import RunState, StepKind, StepOutcome, check_settings


class CardStep(StepKind):
    kind: ClassVar[str] = "card"
    writes_into_model: ClassVar[bool] = True
    makes_model: ClassVar[bool] = True  # a card on the recipe's input goes on a copy of it (see the runner)

    def check(self, recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None) -> None:
        check_settings(recipe, step, params, CardSettings)

    def run(self, step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
        """The card names the model by its repo (a `repo_id` here or --push-to-hub), else by the run's output
        directory: a name a person gave, where the step directory (`02-finetune`) is not one."""
        from ...io.commit import replace_file
        from ...publishing.card import RECIPE_FILE, render_card

        model_dir = Path(state.model)
        # Files of a model written by an earlier step may be hard links to the input's: replace them, never write into them.
        replace_file(model_dir / RECIPE_FILE, state.recipe_text)
        repo_id = params.get("repo_id") or state.push_repo
        path = render_card(model_dir, eval_results=state.eval_results or None, plot=state.plots or None,
                           repo_id=repo_id, base_model=params.get("base_model"),
                           name=None if repo_id else state.output.name)
        return StepOutcome({"output": str(path)})
