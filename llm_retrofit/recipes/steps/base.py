"""What every step kind is: the state a run carries from step to step, and the `StepKind` protocol.

A step kind (`patch`, `finetune`, `eval`, `card`, `push`) is one object that knows everything about its kind: how to
check its values before the run (`check`), what a dry run says about it and what it changes in the model known
before the run (`plan`), its start line (`describe`), and how to run it (`run`). The runner (`recipes/runner.py`)
keeps the loop, the manifest and resume, and asks the kind for the rest; no other module switches on `step.kind`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ...errors import RetrofitError
from ...modeling.cost import Pass
from ...modeling.memory import Footprint
from ..schema import Recipe, RecipeError, Step, Unknown, read_settings

if TYPE_CHECKING:
    from ...plan import ModelView

T = TypeVar("T")


@dataclass
class RunState:
    """What the steps see and change: the current model, configs, earlier results."""

    base: str
    output: Path
    inputs: dict[str, Any]
    model: str
    model_config: dict[str, Any] | Unknown
    base_config: dict[str, Any]
    results: dict[str, Mapping[str, Any]] = field(default_factory=dict)
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
    passes: list[Pass] | None = field(default_factory=list)
    """The passes of the model the step runs (a search's candidates, training steps, evaluations): what the time a
    run expects is priced on (`modeling.cost`); None where they are known only when run."""
    memory: Footprint | None = None
    """The peak memory of its largest pass (`modeling.memory`); None where it runs none or they are not known."""


@dataclass
class Planning:
    """The model as known before the run, while the steps are planned in order.

    `view` is its tensor metadata (None once a step makes a model known only when run, or for an adapter input);
    `state.model_config` its config (`Unknown` then); `model_is_input` whether no step before makes a model, so the
    step works on the recipe's input, which a run never writes to."""

    recipe: Recipe
    state: RunState
    view: ModelView | None
    model_is_input: bool = True
    shape: ModelView | None = None
    """The model as far as its shape goes, what its passes are priced on: `view`, and after a patch that loads the
    model, that patch's `shape_plan` (None where even that is unknown)."""

    base: ModelView | None = None
    """The recipe's input as planned on (its tensor metadata): what the before and baseline columns run."""

    def __post_init__(self) -> None:
        if self.shape is None:
            self.shape = self.view
        if self.base is None:
            self.base = self.view


class StepKind(ABC):
    """One kind of recipe step: its checks, its plan, its start line and its run."""

    kind: ClassVar[str]
    writes_directory: ClassVar[bool] = False
    """Its output is the directory OUT/NN-ID (a resumed run redoes the step if that directory is gone)."""
    writes_into_model: ClassVar[bool] = False
    """It writes files into the model it works on (a card): the runner gives it a copy where that is the input."""
    makes_model: ClassVar[bool] = False
    """After it, the model later steps work on is one the run made under OUT (not the recipe's input)."""
    memory_advice: ClassVar[str] = ""
    """What lowers the step's peak memory, for the refusal of a step that will not fit (`modeling.memory`)."""

    @abstractmethod
    def check(self, recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None) -> None:
        """Raise, naming the line, the error the step would give when run, for every value known now (the others
        are `Unknown`)."""

    def plan(self, item: PlannedStep, planning: Planning) -> None:
        """What a dry run says the step will do (`item.notes`, `item.bytes_written`), and what it changes in the
        model known before the run (`planning`); called after `check`. Nothing to say by default."""

    def passes(self, step: Step, params: dict[str, Any], shape: ModelView, base: ModelView) -> list[Pass]:
        """The passes of the models the step will run (`shape`: its model as the step finds it; `base`: the recipe's
        input), for the time the run expects; called before `plan`, with values resolved against `shape`'s
        config. None by default."""
        return []

    def describe(self, step: Step, params: dict[str, Any]) -> str:
        """The step's start line: what it is about to do."""
        return step.describe()

    @abstractmethod
    def run(self, step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
        """Do the step; `directory` (OUT/NN-ID) is where it writes, if it writes anything."""


def at(recipe: Recipe, step: Step, check: Callable[[], T], *keys: Any) -> T:
    """check(), its error given the line of `keys` (of the step itself, with none) and the step's id."""
    try:
        return check()
    except RetrofitError as e:
        raise RecipeError(f"{recipe.where(step, *keys)}: step {step.id}: {e}") from None


def check_settings(recipe: Recipe, step: Step, params: dict[str, Any], settings: Any) -> None:
    """Each value read as the field of `settings` (a `_Settings` class) it names, then (all known) the whole."""
    for key, value in params.items():
        at(recipe, step, lambda: read_settings(settings, {key: value}), key)
    if not has_unknown(params):
        at(recipe, step, lambda: settings.read(params))


def has_unknown(value: Any) -> bool:
    if isinstance(value, Unknown):
        return True
    if isinstance(value, dict):
        return any(has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(has_unknown(v) for v in value)
    return False


def model_config(path: str) -> dict[str, Any]:
    """The config of a model directory, or of an adapter directory's base."""
    directory = Path(path)
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return model_config(base)
    config: dict[str, Any] = json.loads((directory / "config.json").read_text())
    return config


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"
