"""Running the model for the patches that need its activations: calibration models and captured inputs.

A patch that computes its result from activations (a MoE router from hidden states, the LongRoPE search, GQA's
fitted merge) gets a `ModelView` whose `origin` is the checkpoint directory or the loaded model. It calls
`calibration_model(view, "moe: router=hidden")` when it first needs data, never while planning, so a dry run loads
nothing. The capture functions run the model with forward hooks and keep running sums, not activations, so memory
stays at one forward pass whatever the number of prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PatchError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..plan import ModelView


def calibration_model(view: ModelView, needed_by: str) -> tuple[PreTrainedModel, Any]:
    """The model behind `view` in eval mode (float32 when loaded from disk) and its tokenizer.

    `needed_by` names the patch in the error given when the view has no origin (the patch is not first in a chain).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..io.progress import quiet_libraries

    if view.origin is None:
        raise PatchError(f"{needed_by} runs the model to compute its result; make it the first patch of the chain.")
    with quiet_libraries():  # our own load: no weight-loading bar, no library warnings
        if isinstance(view.origin, Path):
            model = AutoModelForCausalLM.from_pretrained(view.origin, dtype=torch.float32)
            return model.eval(), AutoTokenizer.from_pretrained(view.origin)
        return view.origin, AutoTokenizer.from_pretrained(view.origin.name_or_path)


def mean_mlp_inputs(network: PreTrainedModel, tokenizer: Any, prompts: Sequence[str]) -> dict[int, torch.Tensor]:
    """Per decoder layer, the float32 mean of its MLP's input over every token of `prompts`."""
    layers = network.model.layers
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def capture(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            tokens = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[layer] = sums.get(layer, 0) + tokens.sum(0)
            counts[layer] = counts.get(layer, 0) + tokens.shape[0]

        return hook

    handles = [layer.mlp.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for prompt in prompts:
                network(tokenizer(prompt, return_tensors="pt").input_ids.to(network.device))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (sums[layer] / counts[layer]).cpu() for layer in sums}
