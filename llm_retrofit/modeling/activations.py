"""Running the model for the patches that need its activations: calibration models and captured inputs.

A patch that computes its result from activations (a MoE router from hidden states, the LongRoPE search, GQA's
fitted merge) gets a `ModelView` whose `origin` is the checkpoint directory or the loaded model. It calls
`calibration_model(view, "moe: router=hidden")` when it first needs data, never while planning, so a dry run loads
nothing. The capture functions run the model with forward hooks and keep running sums, not activations, so memory
stays at one forward pass whatever the number of prompts.

`capture` is the one hook runner: it calls an observer with the input or output of chosen modules on every
sequence. `mean_mlp_inputs` (MoE's `hidden` router) and `attention_moments` (GQA's fitted merge: the second moments
of each layer's query, key and value projections) are reductions on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..errors import PatchError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..plan import ModelView

Key = TypeVar("Key", bound=Hashable)


def calibration_model(view: ModelView, needed_by: str) -> tuple[PreTrainedModel, Any]:
    """The model behind `view` in eval mode (float32 when loaded from disk) and its tokenizer.

    `needed_by` names the patch in the error given when the view has no origin (the patch is not first in a chain).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..io.progress import quiet_libraries
    from .remote_code import runs_our_code

    if view.origin is None:
        raise PatchError(f"{needed_by} runs the model to compute its result; make it the first patch of the chain.")
    with quiet_libraries():  # our own load: no weight-loading bar, no library warnings
        if isinstance(view.origin, Path):
            # Calibrated on what the checkpoint runs: its attention pattern through the file the patch shipped (ours
            # only), never the plain architecture in place of code its config says it needs.
            trusted = runs_our_code(view.origin, view.config)
            model = AutoModelForCausalLM.from_pretrained(view.origin, dtype=torch.float32, trust_remote_code=trusted)
            return model.eval(), AutoTokenizer.from_pretrained(view.origin)
        return view.origin, AutoTokenizer.from_pretrained(view.origin.name_or_path)


def capture(
    network: PreTrainedModel,
    sequences: Iterable[torch.Tensor],
    modules: Mapping[Key, torch.nn.Module],
    observe: Callable[[Key, torch.Tensor], None],
    *,
    inputs: bool = False,
) -> None:
    """Run `network` on each 1-D tensor of token ids, calling `observe(key, tensor)` with the output of every module
    of `modules` (with `inputs=True`, its first positional input) as it runs. The hooks are removed afterwards,
    even when a sequence fails."""

    def hook_for(key: Key) -> Callable[..., None]:
        if inputs:
            return lambda _module, args: observe(key, args[0])
        return lambda _module, _args, output: observe(key, output)

    register = "register_forward_pre_hook" if inputs else "register_forward_hook"
    handles = [getattr(module, register)(hook_for(key)) for key, module in modules.items()]
    try:
        with torch.no_grad():
            for ids in sequences:
                network(ids[None].to(network.device))
    finally:
        for handle in handles:
            handle.remove()


def mean_mlp_inputs(network: PreTrainedModel, tokenizer: Any, prompts: Sequence[str]) -> dict[int, torch.Tensor]:
    """Per decoder layer, the float32 mean of its MLP's input over every token of `prompts`."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def observe(layer: int, states: torch.Tensor) -> None:
        tokens = states.reshape(-1, states.shape[-1]).float()
        sums[layer] = sums.get(layer, 0) + tokens.sum(0)
        counts[layer] = counts.get(layer, 0) + tokens.shape[0]

    sequences = (tokenizer(prompt, return_tensors="pt").input_ids[0] for prompt in prompts)
    mlps = {i: layer.mlp for i, layer in enumerate(network.model.layers)}
    capture(network, sequences, mlps, observe, inputs=True)
    return {layer: (sums[layer] / counts[layer]).cpu() for layer in sums}


def calibration_sequences(documents: Sequence[torch.Tensor], tokens: int, length: int) -> list[torch.Tensor]:
    """Consecutive pieces of at most `length` tokens of the documents, in order, until `tokens` tokens are taken
    (fewer if the documents hold fewer). Pieces of one token are dropped: they attend to nothing."""
    pieces: list[torch.Tensor] = []
    left = tokens
    for ids in documents:
        for start in range(0, len(ids), length):
            piece = ids[start : start + min(length, left)]
            if len(piece) > 1:
                pieces.append(piece)
                left -= len(piece)
            if left <= 1:
                return pieces
    return pieces


@dataclass
class AttentionMoments:
    """One layer's attention projections on calibration text, as float64 sums over `tokens` tokens.

    The key and value heads are taken in `groups` contiguous groups of m = kv_heads / groups heads (the heads that
    GQA pooling merges into one); only moments within a group are kept, which is all a per-group merge needs and
    keeps the size independent of how many groups there are.
    - `query_energy` (query heads, head_dim): the sum of each query feature squared.
    - `key_pairs` (groups, head_dim / 2, m, m), complex: per rotary pair i (HF's rotate-half layout pairs features
      i and i + d/2), the sum of conj(z_a) z_b over tokens, where z_a = k_a[i] + 1j * k_a[i + d/2] of head a.
    - `values` (groups, m * d, m * d): the sum of v v^T over tokens, v the group's value features side by side.
    Projections are taken with their biases, before RoPE (which rotates every pair, so these are RoPE-free).
    """

    query_energy: torch.Tensor
    key_pairs: torch.Tensor
    values: torch.Tensor
    tokens: int = 0


def attention_moments(network: PreTrainedModel, sequences: Iterable[torch.Tensor], groups: int) -> dict[int, AttentionMoments]:
    """`AttentionMoments` of every decoder layer of `network` over `sequences` (token ids), in one pass."""
    config = network.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    m, half = kv_heads // groups, head_dim // 2
    moments: dict[int, AttentionMoments] = {}
    for layer in range(len(network.model.layers)):
        moments[layer] = AttentionMoments(
            torch.zeros(config.num_attention_heads, head_dim, dtype=torch.float64),
            torch.zeros(groups, half, m, m, dtype=torch.complex128),
            torch.zeros(groups, m * head_dim, m * head_dim, dtype=torch.float64),
        )

    def observe(key: tuple[int, str], output: torch.Tensor) -> None:
        layer, projection = key
        features = output.reshape(-1, output.shape[-1]).double()
        found = moments[layer]
        if projection == "q":
            found.query_energy += features.square().sum(0).view(-1, head_dim).cpu()
            found.tokens += features.shape[0]
        elif projection == "k":
            heads = features.view(-1, groups, m, head_dim)
            pairs = torch.complex(heads[..., :half], heads[..., half:])  # (tokens, groups, m, pairs)
            found.key_pairs += torch.einsum("tgap,tgbp->gpab", pairs.conj(), pairs).cpu()
        else:
            grouped = features.view(-1, groups, m * head_dim)
            found.values += torch.einsum("tgi,tgj->gij", grouped, grouped).cpu()

    modules = {
        (i, p): getattr(layer.self_attn, f"{p}_proj") for i, layer in enumerate(network.model.layers) for p in "qkv"
    }
    capture(network, sequences, modules, observe)
    return moments
