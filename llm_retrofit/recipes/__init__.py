"""Recipes: a patch, a short finetune, an evaluation, a card and an upload, chained in one YAML file.

The built-in recipes are the `*.yaml` files of this package (`retrofit recipes list`); `retrofit recipes show NAME`
prints one to copy and edit. `schema` reads and checks the format, `overrides` applies `--set`, `runner` runs it (and
resumes it), asking each step's kind in `steps/` what to check, plan and run.
"""

from __future__ import annotations

from .overrides import apply_overrides
from .runner import RecipeRun, dry_run, run_recipe
from .schema import Recipe, RecipeError, Step, builtin_names, load_recipe, parse_recipe, recipe_text

__all__ = ["Recipe", "RecipeError", "RecipeRun", "Step", "apply_overrides", "builtin_names", "dry_run", "load_recipe",
           "parse_recipe", "recipe_text", "run_recipe"]
