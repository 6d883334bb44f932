"""Where a model's inputs go. A model placed by accelerate (modeling/placement.py) may hold its first parameters on the
meta device (offloaded to CPU memory or disk, brought in by a hook at each forward), so `model.device`, the device
of its first parameter, is not where its input ids go: the device its input embedding computes on is.
"""

from __future__ import annotations

import torch


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's input ids go: the device its input embedding computes on (an offloaded embedding's weight is
    on the meta device; accelerate's hook says where it runs)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    for one in getattr(hook, "hooks", [hook]):
        execution = getattr(one, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    return embedding.weight.device
