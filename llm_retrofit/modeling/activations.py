"""Running the model for the patches that need its activations, one decoder layer at a time.

A patch that computes its result from activations (a MoE router from hidden states, GQA's fitted merge) gets a
`ModelView` whose `origin` is the checkpoint directory or the loaded model, and runs it when it first needs data,
never while planning, so a dry run loads nothing.

`run_layers` is the one runner, the sequential approach of GPTQ-style quantizers: the calibration sequences' hidden
states are carried from one decoder layer to the next. From a checkpoint the model is built on the meta device (the
class transformers would load, our shipped modeling file included, so an attention pattern calibrates as it runs);
the embedding is read, the model's own forward runs up to the layers and records what each layer is called with
(the hidden states entering the first, the mask and position embeddings of every layer), and stops there. Then each
layer is read once from the checkpoint in float32 onto `default_device()`, runs every sequence, and is freed; its
outputs are the next layer's inputs. Peak memory is the larger of the embedding and one layer, plus the hidden
states (tokens x hidden x 4 bytes), whatever the depth. A loaded model goes through the same runner over its own
layers, where they are, in their dtype.

A reduction is a `Tap`: which modules of a layer to hook and what to keep from their outputs (or inputs), as
running sums, not activations. `mean_mlp_inputs` (MoE's `hidden` router) and `attention_moments` (GQA's fitted
merge: the second moments of each layer's query, key and value projections) are the two.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PatchError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..io.checkpoint import Checkpoint
    from ..plan import ModelView


def calibration_tokenizer(view: ModelView) -> Any:
    """The tokenizer of the model behind `view` (saved beside the checkpoint, or named by the loaded model)."""
    from transformers import AutoTokenizer

    from ..io.progress import quiet_libraries

    origin = view.origin
    with quiet_libraries():
        return AutoTokenizer.from_pretrained(origin if isinstance(origin, Path) else origin.name_or_path)


def _runnable(view: ModelView) -> tuple[PreTrainedModel, Checkpoint | None, torch.device]:
    """The model to run, the checkpoint its weights are read from (None: a loaded model, whose weights are in place)
    and the device it runs on."""
    from ..io.checkpoint import load_checkpoint
    from .precision import default_device

    if view.origin is None:
        raise PatchError("calibration runs the model; make the calibrated patch the first patch of the chain.")
    if not isinstance(view.origin, Path):
        return view.origin, None, view.origin.device
    checkpoint, device = load_checkpoint(view.origin), torch.device(default_device())
    return _skeleton(checkpoint, device), checkpoint, device


def _skeleton(checkpoint: Checkpoint, device: torch.device) -> PreTrainedModel:
    """The class transformers would load from `checkpoint`, built without memory: every parameter on the meta device,
    the buffers (rotary frequencies) on `device`. Our shipped modeling file is what runs when the config names it,
    so an attention pattern calibrates as it will run."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..io.progress import quiet_libraries
    from .remote_code import runs_our_code

    trusted = runs_our_code(checkpoint.path, checkpoint.config)
    with quiet_libraries():
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=trusted)
        with init_empty_weights():
            network = AutoModelForCausalLM.from_config(config, trust_remote_code=trusted, dtype=torch.float32)
    for name, _ in network.named_buffers():
        set_module_tensor_to_device(network, name, device)
    converted = [name for name, _ in network.named_parameters()
                 if name.startswith("model.") and name not in checkpoint.tensors]
    if converted:
        raise PatchError(
            f"{checkpoint.path} stores its weights in another layout than {type(network).__name__} holds them in "
            f"memory (it has no {converted[0]!r}: transformers converts it while loading), so calibration cannot read "
            "it one layer at a time. Load the model with transformers and patch the loaded model (the Python API) "
            "instead.")
    return network.eval()


def _trunk_names(network: PreTrainedModel) -> list[str]:
    """The parameters of the decoder stack outside its layers: the embedding, which runs before the first layer, and
    the final norm. The LM head is never run."""
    return [name for name, _ in network.named_parameters()
            if name.startswith("model.") and not name.startswith("model.layers.")]


def _materialise(network: PreTrainedModel, names: Iterable[str], checkpoint: Checkpoint | None,
                 device: torch.device) -> None:
    """Read the parameters `names` from the checkpoint into `network`, in float32 on `device` (nothing to do for a
    loaded model)."""
    from accelerate.utils import set_module_tensor_to_device

    if checkpoint is None:
        return
    for name in names:
        set_module_tensor_to_device(network, name, device, value=checkpoint.read(name), dtype=torch.float32)


def _release(network: PreTrainedModel, names: Iterable[str], checkpoint: Checkpoint | None) -> None:
    """Free the parameters `names` (back to the meta device) once read from the checkpoint; a loaded model keeps its."""
    from accelerate.utils import set_module_tensor_to_device

    if checkpoint is None:
        return
    for name in names:
        set_module_tensor_to_device(network, name, "meta")


class _Stop(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers is needed (nor loaded)."""


@dataclass
class Tap:
    """What a reduction reads from every decoder layer as the calibration text goes through it.

    `modules(index, layer)` names the modules of decoder layer `index` to watch; `observe(sequence, key, tensor)` is
    called with the output of each (with `inputs=True`, its first positional input) on every sequence, `sequence`
    being the sequence's position in the list given to `run_layers`.
    """

    modules: Callable[[int, torch.nn.Module], Mapping[Hashable, torch.nn.Module]]
    observe: Callable[[int, Any, torch.Tensor], None]
    inputs: bool = False


@dataclass
class _LayerCall:
    """The arguments one decoder layer gets on one sequence besides its hidden states (position embeddings, mask...)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def run_layers(view: ModelView, sequences: Sequence[torch.Tensor], tap: Tap) -> None:
    """Run the model behind `view` on each 1-D tensor of token ids one decoder layer at a time, calling `tap` on
    every layer. From a checkpoint, each layer's weights are read once, in float32, onto `default_device()`, and
    freed before the next is read; a loaded model runs as it is, where it is."""
    network, checkpoint, device = _runnable(view)
    layers = list(network.model.layers)
    with torch.no_grad():
        trunk = _trunk_names(network)
        _materialise(network, trunk, checkpoint, device)
        hidden, calls = _layer_calls(network, sequences, device)
        _release(network, trunk, checkpoint)
        for index, layer in enumerate(layers):
            names = [f"model.layers.{index}.{name}" for name, _ in layer.named_parameters()]
            _materialise(network, names, checkpoint, device)
            hidden = _run_layer(layer, index, hidden, calls[index], tap)
            _release(network, names, checkpoint)


def _run_layer(layer: torch.nn.Module, index: int, hidden: list[torch.Tensor], calls: list[_LayerCall],
               tap: Tap) -> list[torch.Tensor]:
    """Every sequence's hidden states through `layer`, with `tap`'s hooks attached meanwhile: its outputs."""
    current = [0]

    def hook_for(key: Hashable) -> Callable[..., None]:
        if tap.inputs:
            return lambda _module, args: tap.observe(current[0], key, args[0])
        return lambda _module, _args, output: tap.observe(current[0], key, output)

    register = "register_forward_pre_hook" if tap.inputs else "register_forward_hook"
    handles = [getattr(module, register)(hook_for(key)) for key, module in tap.modules(index, layer).items()]
    outputs = []
    try:
        for sequence, (states, call) in enumerate(zip(hidden, calls, strict=True)):
            current[0] = sequence
            output = layer(states, *call.args, **call.kwargs)
            outputs.append(output[0] if isinstance(output, tuple) else output)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _layer_calls(network: PreTrainedModel, sequences: Sequence[torch.Tensor],
                 device: torch.device) -> tuple[list[torch.Tensor], list[list[_LayerCall]]]:
    """The hidden states entering the first decoder layer for each sequence, and per layer and sequence the other
    arguments the model calls it with: the model's own forward runs up to the layers, each replaced meanwhile by a
    recorder (layers of different kinds, sliding or full, get different masks), and stops at the last one."""
    layers = list(network.model.layers)
    hidden: list[torch.Tensor] = []
    calls: list[list[_LayerCall]] = [[] for _ in layers]

    def recorder(index: int) -> Callable[..., torch.Tensor]:
        def record(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if index == 0:
                hidden.append(hidden_states)
            calls[index].append(_LayerCall(args, kwargs))
            if index == len(layers) - 1:
                raise _Stop
            return hidden_states

        return record

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)  # an instance attribute: deleting it restores the class's forward
    try:
        for ids in sequences:
            try:
                network.model(input_ids=ids[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return hidden, calls


def mean_mlp_inputs(view: ModelView, tokenizer: Any, prompts: Sequence[Sequence[str]]) -> list[dict[int, torch.Tensor]]:
    """For each group of `prompts`, per decoder layer, the float32 mean of its MLP's input over every token of the
    group: one pass over the layers for all the groups."""
    sequences = [tokenizer(prompt, return_tensors="pt").input_ids[0] for group in prompts for prompt in group]
    group_of = [index for index, group in enumerate(prompts) for _ in group]
    sums: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = {}

    def observe(sequence: int, layer: int, states: torch.Tensor) -> None:
        key = (group_of[sequence], layer)
        tokens = states.reshape(-1, states.shape[-1]).float()
        sums[key] = sums.get(key, 0) + tokens.sum(0)
        counts[key] = counts.get(key, 0) + tokens.shape[0]

    run_layers(view, sequences, Tap(lambda index, layer: {index: layer.mlp}, observe, inputs=True))
    return [{layer: (sums[group, layer] / counts[group, layer]).cpu() for group, layer in sums if group == wanted}
            for wanted in range(len(prompts))]


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


def attention_moments(view: ModelView, sequences: Sequence[torch.Tensor], groups: int) -> dict[int, AttentionMoments]:
    """`AttentionMoments` of every decoder layer of the model behind `view` over `sequences` (token ids), in one
    pass over the layers."""
    config = view.config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    m, half = kv_heads // groups, head_dim // 2
    moments: dict[int, AttentionMoments] = {}
    for layer in range(int(config["num_hidden_layers"])):
        moments[layer] = AttentionMoments(
            torch.zeros(config["num_attention_heads"], head_dim, dtype=torch.float64),
            torch.zeros(groups, half, m, m, dtype=torch.complex128),
            torch.zeros(groups, m * head_dim, m * head_dim, dtype=torch.float64),
        )

    def observe(_sequence: int, key: tuple[int, str], output: torch.Tensor) -> None:
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

    def projections(index: int, layer: torch.nn.Module) -> dict[tuple[int, str], torch.nn.Module]:
        return {(index, p): getattr(layer.self_attn, f"{p}_proj") for p in "qkv"}

    run_layers(view, sequences, Tap(projections, observe))
    return moments
