"""Modeling files shipped inside patched checkpoints (named by auto_map); they import nothing from llm_retrofit.

A runtime patch copies one of them into its checkpoint (`files`) and, for a model patched in memory, runs
that same module's `install(model)` (`install`), so a checkpoint and a live model run one piece of code.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def files(module: str) -> dict[str, str]:
    """The plan's `files` entry that ships `module` (e.g. modeling_retrofit_infini): {file name: its text}."""
    return {f"{module}.py": (HERE / f"{module}.py").read_text()}


def install(module: str, model: Any) -> Any:
    """`module.install(model)`: the shipped behaviour put on a loaded model, in place."""
    return importlib.import_module(f"{__name__}.{module}").install(model)
