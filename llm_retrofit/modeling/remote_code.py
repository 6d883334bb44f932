"""Whether a checkpoint's custom code (the files config.json's `auto_map` names) is llm-retrofit's own.

Runtime patches (attention sinks, block-sparse attention) ship a modeling file inside the checkpoint. Our own
commands (eval, finetune, recipes) should run the model with that behaviour, which needs `trust_remote_code=True`;
they trust it only when every file `auto_map` names is byte for byte one this package ships, never other code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..plan import shipped_files
from .shipped import HERE as SHIPPED


def runs_our_code(directory: Path, config: Mapping[str, Any]) -> bool:
    """True when `directory`'s config loads custom code and all of it is a file of `llm_retrofit/modeling/shipped`."""
    files = shipped_files(config)
    return bool(files) and all(
        (SHIPPED / name).is_file() and (directory / name).is_file()
        and (directory / name).read_bytes() == (SHIPPED / name).read_bytes()
        for name in files
    )
