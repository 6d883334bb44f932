"""Whether a checkpoint's custom code (the files config.json's `auto_map` names) is llm-retrofit's own.

Runtime patches (attention sinks, block-sparse attention) ship a modeling file inside the checkpoint. Our own
commands (eval, finetune, recipes) should run the model with that behaviour, which needs `trust_remote_code=True`;
they trust it only when every file `auto_map` names is byte for byte one this package ships, never other code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..plan import shipped_files
from .shipped import HERE as SHIPPED


def runs_our_code(directory: Path, config: Mapping[str, Any]) -> bool:
    """True when `directory`'s config loads custom code and all of it is a file of `llm_retrofit/modeling/shipped`.

    Someone else's code (a name we do not ship) is never run: False. A file named like ours whose bytes differ (an
    older or newer llm-retrofit wrote it, or it was edited) is an error: loading the model without it would measure
    or train the plain architecture, silently, and running it would run code that is not ours."""
    files = shipped_files(config)
    if not files or not all((SHIPPED / name).is_file() for name in files):
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
    return True
