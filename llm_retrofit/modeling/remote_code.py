"""The one rule for running a checkpoint's own code: only llm-retrofit's, byte for byte, from the checkpoint itself.

transformers runs code out of a checkpoint loaded with `trust_remote_code=True`: the class each config.json `auto_map`
entry names (`module.Class` is `module.py` of the checkpoint; `other--module.Class` is `module.py` of another local
directory or Hub repo, fetched if need be) and a `custom_generate/generate.py` beside config.json. Runtime patches
(attention sinks, block-sparse attention, Infini-attention) ship a modeling file inside the checkpoint, and our
commands (eval, finetune, a recipe's eval step) must run the model with that behaviour, so they load it with
`trust_remote_code=True`, but only when

- every `auto_map` entry is exactly one a patch of ours writes: `AutoModelForCausalLM` -> `module.Class`, where
  `module.py` is a file of `modeling/shipped` and `Class` one of the causal LMs that file defines (its `_FAMILIES`),
- that file in the checkpoint directory is byte for byte the one this llm-retrofit ships,
- and the checkpoint has no `custom_generate/`, which our patches never write.

Anything else is refused with a CheckpointError, never loaded as the plain architecture: a model whose config says
it needs other code would be measured or trained as something it is not. There is no flag to run other code (see
docs/patchers/attention.md, "Whose code runs"): whoever trusts it loads the model with transformers and passes the
model to `llm_retrofit.evaluate`.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..plan import shipped_files
from . import shipped
from .shipped import AUTO_CLASS
from .shipped import HERE as SHIPPED

log = logging.getLogger(__name__)

CUSTOM_GENERATE = "custom_generate"
"""The folder whose `generate.py` transformers imports when a model is loaded with `trust_remote_code=True`."""


@functools.cache
def our_auto_map_values() -> frozenset[str]:
    """Every `auto_map` value a patch of ours writes: `module.Class` for each modeling file of `modeling/shipped` and
    each causal LM that file maps a stock model to (its `_FAMILIES`, which `install` uses too). Read from the files
    themselves, so that a class added or renamed there is what this rule allows."""
    values = set()
    for file in sorted(SHIPPED.glob("modeling_*.py")):
        module = importlib.import_module(f"{shipped.__name__}.{file.stem}")
        values |= {f"{file.stem}.{causal_lm.__name__}" for causal_lm, *_ in module._FAMILIES.values()}
    return frozenset(values)


def foreign_entries(config: Mapping[str, Any]) -> list[str]:
    """The `auto_map` entries of `config` that are not ones our patches write, each with why; [] when the config loads
    no custom code, or only ours."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return []
    if not isinstance(auto_map, Mapping):
        return [f"auto_map = {auto_map!r} (not a mapping of auto classes to code)"]
    return [f"{key!r}: {value!r} ({why})" for key, value in auto_map.items() if (why := _not_ours(key, value))]


def _not_ours(key: Any, value: Any) -> str | None:
    """Why one `auto_map` entry is not one a patch of ours writes, or None when it is."""
    if not isinstance(value, str):
        return "not a 'module.Class' string"
    if "--" in value:
        return f"code of another directory or Hub repo, {value.split('--')[0]!r}"
    ours = our_auto_map_values()
    if key != AUTO_CLASS:
        return f"our patches write only {AUTO_CLASS}"
    if value in ours:
        return None
    if value.rsplit(".", 1)[0] in {known.rsplit(".", 1)[0] for known in ours}:
        return "a class llm-retrofit's module does not define"
    return "a module llm-retrofit does not ship"


def runs_our_code(directory: Path, config: Mapping[str, Any]) -> bool:
    """True when `directory`'s config loads custom code and all of it is ours (load with trust_remote_code=True);
    False when it loads none (the plain architecture). Anything else is a CheckpointError naming what was found."""
    found = foreign_entries(config)
    if found:
        raise CheckpointError(_foreign_code_message(directory, config, found))
    files = shipped_files(config)
    if not files:
        return False
    for name in sorted(files):
        held = directory / name
        if not held.is_file():
            raise CheckpointError(f"{directory}: config.json's auto_map names {name}, which is not in the directory; "
                                  f"copy it from {SHIPPED / name} (the file this llm-retrofit ships) or redo the "
                                  "patch that wrote the checkpoint.")
        if held.read_bytes() != (SHIPPED / name).read_bytes():
            raise CheckpointError(
                f"{held} is not the {name} this llm-retrofit ships (another version wrote it, or it was edited), so "
                "it is neither run nor ignored. If the checkpoint was made by llm-retrofit, copy this version's file "
                f"over it: cp {SHIPPED / name} {held}; or load the model yourself with trust_remote_code=True if you "
                "trust that file.")
    if (directory / CUSTOM_GENERATE).exists():
        raise CheckpointError(
            f"{directory / CUSTOM_GENERATE}: transformers would run this checkpoint's custom generate code along with "
            "llm-retrofit's modeling file, and our patches never write one, so llm-retrofit does not load it. Delete "
            f"{CUSTOM_GENERATE}/ if you do not need it; if you trust that code, load the model yourself with "
            "transformers.")
    return True


def _foreign_code_message(directory: Path, config: Mapping[str, Any], found: list[str]) -> str:
    family = f"{str(config.get('model_type')).capitalize()}For"  # RetrofitLlamaForCausalLM for a llama config
    ours = sorted(our_auto_map_values())
    example = ([value for value in ours if family in value] or ours)[0]
    return (
        f"{directory}: config.json's auto_map names code that is not llm-retrofit's: {'; '.join(found)}. llm-retrofit "
        "runs only the modeling file its own patches ship, from the checkpoint's own directory, and does not load "
        f"this model as a plain {config.get('model_type')} either (its config says it needs that code). If it is "
        "meant to be a plain model, remove auto_map from config.json; if llm-retrofit patched it, put back the one "
        f'entry the patch wrote (e.g. "{AUTO_CLASS}": "{example}"); if you trust that code, load the model yourself '
        "with transformers (trust_remote_code=True), which llm_retrofit.evaluate also takes.")


def code_report(directory: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Whose code a checkpoint loads, for `retrofit inspect`: `verdict` is "none" (plain transformers classes),
    "llm-retrofit" (our byte-identical shipped files, which our commands run), "foreign" (auto_map entries that are
    not ours, listed in `entries`) or "refused" (our file names, but `problem` says why our commands refuse it)."""
    files = sorted(shipped_files(config))
    found = foreign_entries(config)
    if found:
        return {"verdict": "foreign", "entries": found, "files": files}
    try:
        ours = runs_our_code(directory, config)
    except CheckpointError as e:
        return {"verdict": "refused", "entries": [], "files": files, "problem": str(e)}
    return {"verdict": "llm-retrofit" if ours else "none", "entries": [], "files": files}


def warn_of_foreign_code(directory: Path, config: Mapping[str, Any]) -> None:
    """Log a warning when a rewrite wrote a checkpoint whose auto_map loads code that is not ours (carried over from
    its source): the rewrite neither checked nor changed that code, and our own commands will refuse the result."""
    found = foreign_entries(config)
    if found:
        log.warning("%s carries code that is not llm-retrofit's, from its source (config.json's auto_map: %s): "
                    "retrofit eval and finetune refuse to load it, and whoever loads it with trust_remote_code=True "
                    "runs that code; remove auto_map from its config.json if the model does not need it.",
                    directory, "; ".join(found))
