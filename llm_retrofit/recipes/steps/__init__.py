"""The recipe step kinds, one module each; `STEP_KINDS` is what the runner asks (see `base.StepKind`)."""

from __future__ import annotations

from .base import StepKind
from .card import CardStep
from .eval import EvalStep
from .finetune import FinetuneStep
from .patch import PatchStep
from .push import PushStep

STEP_KINDS: dict[str, StepKind] = {kind.kind: kind for kind in (PatchStep(), FinetuneStep(), EvalStep(), CardStep(),
                                                                PushStep())}
"""Each kind of step by its key in a recipe (schema.KINDS)."""

__all__ = ["STEP_KINDS", "StepKind"]
