"""`--set KEY=VALUE` overrides of a recipe: applied to its YAML, which is then read again as a recipe file is.

The first part of a key is a step id or `inputs`; `profile=NAME` stands for the settings of the recipe's profile NAME.
An override names something the recipe has (a step, an input, a setting of the step's kind), or is refused with the
names it could be.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .schema import Recipe, RecipeError, parse_recipe

SLOW_FLOAT_PROFILE = "cpu-fp32"
"""The profile a recipe may have for a CPU without bf16 units; chosen by itself there (`with_machine_profile`)."""
NO_PROFILE = "none"
"""`--set profile=none`: the recipe as written, on any machine."""


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
        target, keys, path = _target(recipe, data, dotted)
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


def _target(recipe: Recipe, data: dict[str, Any], dotted: str) -> tuple[dict[str, Any], list[str], tuple[Any, ...]]:
    """The mapping of the recipe's YAML (`data`) that `--set DOTTED` sets a key in, the keys down from it, and the
    path of the value (`Recipe.overridden`). An input is one the recipe declares: a misspelt one would set nothing."""
    head, _, rest = dotted.partition(".")
    if not rest:
        raise RecipeError(f"--set {dotted}: give STEP.KEY=VALUE or inputs.NAME=VALUE, e.g. finetune.steps=200.")
    keys = rest.split(".")
    if head == "inputs":
        if keys[0] not in recipe.inputs:
            known = f"its inputs are {', '.join(recipe.inputs)}" if recipe.inputs else "it declares none (`inputs:`)"
            raise RecipeError(f"--set {dotted}: {recipe.source} has no input {keys[0]!r}; {known}.")
        return data["inputs"], keys, ("inputs", *keys)
    index = recipe.steps.index(recipe.step(head))
    raw, step = data["steps"][index], recipe.steps[index]
    section = "with" if step.kind == "patch" else step.kind
    raw[section] = raw.get(section) or {}
    return raw[section], keys, ("steps", index, section, *keys)


def _with_profiles(recipe: Recipe, pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`profile=NAME` replaced by the settings of the recipe's profile NAME, where it stands (a later --set wins)."""
    expanded: list[tuple[str, Any]] = []
    for key, value in pairs:
        if key != "profile":
            expanded.append((key, value))
            continue
        if str(value) == NO_PROFILE:
            continue
        if str(value) not in recipe.profiles:
            known = ", ".join([*recipe.profiles, NO_PROFILE])
            raise RecipeError(f"--set profile={value}: {recipe.source} has no profile {str(value)!r}; its profiles: "
                              f"{known} (the recipe as written).")
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


def with_machine_profile(recipe: Recipe, overrides: Mapping[str, Any] | Sequence[str]
                         ) -> Mapping[str, Any] | Sequence[str]:
    """`overrides`, led by `profile=cpu-fp32` where that is the recipe's profile for this machine: no profile was
    given, the recipe has one for a CPU without bf16 units, and this machine computes in float32 (no GPU, no AMX or
    AVX512-BF16), where every pass is about 3x slower than with them. `--set profile=none` keeps the recipe as it is."""
    import torch

    from ..modeling.precision import default_device, native_bf16

    if SLOW_FLOAT_PROFILE not in recipe.profiles or profile_of(overrides) is not None:
        return overrides
    if default_device() != "cpu" or native_bf16(torch.device("cpu")):
        return overrides
    return {"profile": SLOW_FLOAT_PROFILE, **dict(_override_pairs(overrides))}  # a later --set still wins


def profile_of(overrides: Mapping[str, Any] | Sequence[str] | None) -> str | None:
    """The profile the overrides apply (the last `profile=NAME`), if any."""
    found = [str(value) for key, value in _override_pairs(overrides or []) if key == "profile"]
    return found[-1] if found else None
