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


STOCK_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
"""The transformers class each model type a shipped file extends; what `architectures` names once the code is gone."""
AUTO_CLASS = "AutoModelForCausalLM"
"""The one `auto_map` key our patches write: every shipped model is a causal LM."""


def config_for(config: dict[str, Any], module: str, causal_lm: str, settings_key: str,
               settings: dict[str, Any]) -> dict[str, Any]:
    """The config of a checkpoint that needs shipped code: its settings, `auto_map` naming the class, and
    `architectures` naming that same class rather than the stock one. Engines that pick their implementation by
    `architectures` (vLLM, SGLang) know no such class and refuse the checkpoint loudly instead of serving the stock
    model without the shipped behaviour; transformers with trust_remote_code loads the class through `auto_map` and
    writes this same `architectures` when it saves the model (docs/ARCHITECTURE.md, "No silent model swap")."""
    return {**config, settings_key: settings, "auto_map": {AUTO_CLASS: f"{module}.{causal_lm}"},
            "architectures": [causal_lm]}


def without_code(config: dict[str, Any], module: str) -> dict[str, Any]:
    """The config with `module`'s `auto_map` entries removed and, when `architectures` named one of its classes, the
    stock class named again: what a patch that removes the shipped behaviour writes."""
    ours = {value.split(".", 1)[1] for value in (config.get("auto_map") or {}).values() if value.startswith(module)}
    config = dict(config)
    auto_map = {k: v for k, v in (config.pop("auto_map", None) or {}).items() if not v.startswith(module)}
    if auto_map:
        config["auto_map"] = auto_map
    if ours & set(config.get("architectures") or ()) and config.get("model_type") in STOCK_CLASSES:
        config["architectures"] = [STOCK_CLASSES[config["model_type"]]]
    return config


def install(module: str, model: Any) -> Any:
    """`module.install(model)`: the shipped behaviour put on a loaded model, in place."""
    return importlib.import_module(f"{__name__}.{module}").install(model)
