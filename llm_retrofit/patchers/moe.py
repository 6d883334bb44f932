"""MoE upcycling: a dense Llama or Mistral becomes a Mixtral whose experts start from its MLPs.

Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) copies each dense MLP into every expert. Mixtral routes a
token to its top-k experts and renormalises their router probabilities to sum to 1, so identical experts give back
exactly the dense MLP's output, whatever the router: the upcycled model is the dense model until it is trained.

Options that trade that identity for faster specialisation:
- `noise=σ`: add Gaussian noise of σ times each matrix's own standard deviation to every expert;
- `drop=r` (Drop-Upcycling, arXiv 2502.19261): in each expert, re-initialise a random fraction r of the
  intermediate neurons (rows of w1/w3, columns of w2) from a normal with the mean and std of the dense matrix;
- `split=true` (LLaMA-MoE, arXiv 2406.16554): partition the intermediate neurons into E experts of I/E neurons
  (`partition=random` or `cluster`, balanced k-means on w1 rows), so a token computes K/E of the dense MLP. Each
  expert's output is scaled by E: Mixtral renormalises the top-K router weights to sum to 1, so with K = E and a
  uniform router the experts add up to the dense MLP exactly, and with K < E the output is an unbiased estimate of
  it (for a uniformly random choice of experts: E * (1/K) * (K/E) * dense). Not function-preserving for K < E.

Router (`block_sparse_moe.gate.weight`, one row per expert): `random` (normal, std = initializer_range), `uniform`
(zeros: every expert equally likely), or `hidden`: row e is the normalised mean MLP input of the prompts for expert
e (`prompts=FILE`, a YAML/JSON list with one prompt or list of prompts per expert), so expert e is the top choice
for inputs like its own prompts (mergekit-moe's "hidden" gate mode). `hidden` loads the model once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..architectures import layer_name, split_layer_name
from ..io.checkpoint import TensorMeta
from ..modeling.cost import Pass
from ..modeling.activations import calibration_tokenizer, mean_mlp_inputs
from ..errors import PatchError, PatchSpecError
from ..plan import ModelView, TensorPlan, TensorTask
from ..spec import PatchCard, Patcher, register

_DENSE = {"w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight", "w2": "mlp.down_proj.weight"}
_DROPPED_CONFIG_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp", "architectures", "layer_types")


@register
@dataclass(frozen=True)
class UpcycleMoE(Patcher):
    """Upcycle the dense MLPs into a Mixtral mixture of experts (function-preserving with plain copies)."""

    name: ClassVar[str] = "moe"
    example: ClassVar[str] = "moe:num_experts=8,top_k=2"
    card: ClassVar[PatchCard] = PatchCard(
        "Sparse upcycling to mixture-of-experts", "Each MLP is copied into several experts behind a new router "
        "(Mixtral architecture); at initialisation it computes what the dense model computed.",
        "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints (Komatsuzaki et al., 2022)",
        "https://arxiv.org/abs/2212.05055",
        "Until it is finetuned the experts are identical and the router untrained: more parameters and compute, "
        "no better quality.",
    )

    num_experts: int = 8
    top_k: int = 2
    router: Literal["random", "uniform", "hidden"] = "random"
    prompts: Path | None = None
    noise: float = 0.0
    drop: float = 0.0
    split: bool = False
    partition: Literal["random", "cluster"] = "random"
    seed: int = 0
    untie_lm_head: bool = True
    """Where the source ties its LM head to the embedding, write `lm_head.weight` as a copy of it: SGLang's Mixtral
    never ties, so it would serve an untrained head (docs/patchers/moe.md#the-lm-head measures the cost)."""

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise PatchSpecError(f"moe: num_experts={self.num_experts}; a mixture needs at least 2 experts.")
        if not 1 <= self.top_k <= self.num_experts:
            raise PatchSpecError(
                f"moe: top_k={self.top_k} must be between 1 and num_experts={self.num_experts} (experts per token)."
            )
        if (self.router == "hidden") != (self.prompts is not None):
            raise PatchSpecError("moe: router=hidden needs prompts=FILE (and prompts are only used by router=hidden).")
        if not 0.0 <= self.drop < 1.0 or self.noise < 0.0:
            raise PatchSpecError("moe: drop must be in [0, 1) and noise >= 0.")
        if self.split and (self.drop or self.noise):
            raise PatchSpecError("moe: split=true partitions neurons; it does not combine with noise or drop.")

    def check(self, model: ModelView) -> None:
        config = model.config
        if model.architecture.model_type not in ("llama", "mistral"):
            raise PatchError(f"moe upcycles dense llama or mistral models; this one is {config.get('model_type')!r}.")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise PatchError("moe: this model has attention or MLP biases, which Mixtral has no place for.")
        intermediate = config["intermediate_size"]
        if self.split and intermediate % self.num_experts:
            raise PatchError(
                f"moe: split=true needs intermediate_size ({intermediate}) divisible by num_experts ({self.num_experts})."
            )
        if self.router == "hidden":
            _read_prompts(self.prompts, self.num_experts)  # type: ignore[arg-type]

    def plan(self, model: ModelView) -> TensorPlan:
        self.check(model)
        config = model.config
        intermediate = config["intermediate_size"]
        routers = self._lazy_hidden_routers(model) if self.router == "hidden" else None
        partitions: dict[int, list[torch.Tensor]] = {}  # layer -> neuron indices per expert, computed once

        tensors: dict[str, TensorTask] = {}
        for name, meta in model.tensors.items():
            located = split_layer_name(name)
            if located is None or not located[1].startswith("mlp."):
                tensors[name] = TensorTask(meta, (name,))
                continue
            layer, suffix = located
            if suffix != _DENSE["w1"]:
                continue  # each layer's MLP is emitted once, when its gate_proj comes by
            hidden = meta.shape[1]
            router_meta = TensorMeta(meta.dtype, (self.num_experts, hidden))
            tensors[layer_name(layer, "block_sparse_moe.gate.weight")] = TensorTask(
                router_meta, (), self._router_init(layer, router_meta, routers, config)
            )
            for expert in range(self.num_experts):
                for w, dense in _DENSE.items():
                    source = layer_name(layer, dense)
                    task = self._expert_task(model.tensors[source], source, layer, expert, w, partitions)
                    tensors[layer_name(layer, f"block_sparse_moe.experts.{expert}.{w}.weight")] = task

        new_config = {k: v for k, v in config.items() if k not in _DROPPED_CONFIG_KEYS}
        new_config.update(
            model_type="mixtral",
            architectures=["MixtralForCausalLM"],
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            intermediate_size=intermediate // self.num_experts if self.split else intermediate,
            sliding_window=config.get("sliding_window"),
            router_aux_loss_coef=config.get("router_aux_loss_coef", 0.02),
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
        if self.untie_lm_head and config.get("tie_word_embeddings", False):
            # A copy under a new name, as a tied head reads the embedding (a stored lm_head of a tied checkpoint is
            # ignored by every reader, so it is replaced).
            embed, head = model.architecture.embed, model.architecture.lm_head
            tensors[head] = TensorTask(model.tensors[embed], (embed,))
            new_config["tie_word_embeddings"] = False
        return TensorPlan(new_config, tensors)

    # -------------------------------------------------------------------------------------------------- experts

    def _expert_task(
        self, meta: TensorMeta, source: str, layer: int, expert: int, w: str, partitions: dict[int, list[torch.Tensor]]
    ) -> TensorTask:
        if self.split:
            return self._split_task(meta, layer, expert, w, partitions)
        if not self.noise and not self.drop:
            return TensorTask(meta, (source,))  # a plain copy: written byte for byte, never decoded
        generator_seed = ((self.seed * 1009 + layer) * 1009 + expert) * 3 + "w1w2w3".index(w) // 2

        def diversify(dense: torch.Tensor) -> torch.Tensor:
            original = dense.float().cpu()
            out = original.clone()
            generator = torch.Generator().manual_seed(generator_seed)
            if self.noise:
                out += self.noise * original.std() * torch.randn(out.shape, generator=generator)
            if self.drop:
                neurons = _dropped_neurons(out.shape[1] if w == "w2" else out.shape[0], self.drop, self.seed, layer, expert)
                fresh = torch.randn(out.shape, generator=generator) * original.std() + original.mean()
                if w == "w2":
                    out[:, neurons] = fresh[:, neurons]
                else:
                    out[neurons] = fresh[neurons]
            return out.to(dtype=dense.dtype, device=dense.device)

        return TensorTask(meta, (source,), diversify)

    def _split_task(
        self, meta: TensorMeta, layer: int, expert: int, w: str, partitions: dict[int, list[torch.Tensor]]
    ) -> TensorTask:
        size = (meta.shape[1] if w == "w2" else meta.shape[0]) // self.num_experts
        shape = (meta.shape[0], size) if w == "w2" else (size, meta.shape[1])
        scale = self.num_experts  # the renormalised top-K weights sum to 1 (see the module docstring)
        gate = layer_name(layer, _DENSE["w1"])
        source = layer_name(layer, _DENSE[w])

        def take(gate_proj: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            if layer not in partitions:
                partitions[layer] = self._partition(gate_proj, layer)
            neurons = partitions[layer][expert].to(dense.device)
            if w == "w2":  # the E output scale lives in down_proj
                return (dense[:, neurons].float() * scale).to(dense.dtype)
            return dense[neurons].clone()

        return TensorTask(TensorMeta(meta.dtype, shape), (gate, source), take)

    def _partition(self, gate_proj: torch.Tensor, layer: int) -> list[torch.Tensor]:
        neurons = gate_proj.shape[0]
        if self.partition == "random":
            order = torch.randperm(neurons, generator=torch.Generator().manual_seed(self.seed * 100_003 + layer))
            return list(order.chunk(self.num_experts))
        return _balanced_kmeans(gate_proj.float().cpu(), self.num_experts, seed=self.seed + layer)

    # --------------------------------------------------------------------------------------------------- router

    def _router_init(
        self, layer: int, meta: TensorMeta, routers: Callable[[], dict[int, torch.Tensor]] | None, config: dict[str, Any]
    ) -> Callable[[], torch.Tensor]:
        def init() -> torch.Tensor:
            if routers is not None:
                return routers()[layer].to(meta.dtype)
            if self.router == "uniform":
                return torch.zeros(meta.shape, dtype=meta.dtype)
            generator = torch.Generator().manual_seed(self.seed * 7919 + layer)
            std = config.get("initializer_range", 0.02)
            return (torch.randn(meta.shape, generator=generator) * std).to(meta.dtype)

        return init

    def _lazy_hidden_routers(self, model: ModelView) -> Callable[[], dict[int, torch.Tensor]]:
        """Checks the prompts now; runs the model on them only when the first router is written (not on --dry-run)."""
        prompts = _read_prompts(self.prompts, self.num_experts)  # type: ignore[arg-type]
        if model.origin is None:
            raise PatchError("moe: router=hidden runs the model to compute its result; make it the first patch of the chain.")
        cache: dict[int, torch.Tensor] = {}

        def routers() -> dict[int, torch.Tensor]:
            if not cache:
                cache.update(_hidden_routers(model, prompts))
            return cache

        return routers

    def loads_model(self) -> bool:
        return self.router == "hidden"

    def passes(self, config: Mapping[str, Any]) -> list[Pass]:
        """A hidden router's calibration: the prompts carried through the model one layer at a time, each counted
        as one token per byte of its text (no tokenizer makes more)."""
        if self.router != "hidden":
            return []
        prompts = [prompt for expert in _read_prompts(self.prompts, self.num_experts) for prompt in expert]  # type: ignore[arg-type]
        longest = max(len(prompt.encode()) for prompt in prompts)
        return [Pass(longest, config, streamed=sum(len(prompt.encode()) for prompt in prompts))]


def _hidden_routers(model: ModelView, prompts: list[list[str]]) -> dict[int, torch.Tensor]:
    """Per layer, an (experts, hidden) matrix whose row e is the unit-norm mean MLP input of expert e's prompts."""
    means = mean_mlp_inputs(model, calibration_tokenizer(model), prompts)
    return {layer: torch.stack([m[layer] / m[layer].norm() for m in means]) for layer in means[0]}


def _dropped_neurons(neurons: int, fraction: float, seed: int, layer: int, expert: int) -> torch.Tensor:
    """The neurons an expert re-initialises; the same for its w1, w2 and w3 (hence seeded by layer and expert only)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + expert)
    return torch.randperm(neurons, generator=generator)[: round(fraction * neurons)]


def _balanced_kmeans(points: torch.Tensor, groups: int, seed: int, iterations: int = 10) -> list[torch.Tensor]:
    """Split rows into `groups` clusters of equal size: k-means with a capacity-constrained greedy assignment."""
    n = points.shape[0]
    capacity = n // groups
    features = points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=generator)[:groups]]
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(features, centroids)  # (n, groups)
        order = torch.argsort(distances.reshape(-1))
        filled = [0] * groups
        assigned = torch.zeros(n, dtype=torch.bool)
        for flat in order.tolist():
            point, group = divmod(flat, groups)
            if not assigned[point] and filled[group] < capacity:
                assignment[point] = group
                assigned[point] = True
                filled[group] += 1
        centroids = torch.stack([features[assignment == g].mean(0) for g in range(groups)])
    return [torch.nonzero(assignment == g).flatten() for g in range(groups)]


def _read_prompts(path: Path, experts: int) -> list[list[str]]:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise PatchSpecError(f"moe: cannot read prompts file {path}: {e.strerror}.") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PatchSpecError(f"moe: {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, list) or not all(isinstance(p, (str, list)) for p in data):
        raise PatchSpecError(f"moe: {path} must hold a list with one prompt (or list of prompts) per expert.")
    if len(data) != experts:
        raise PatchSpecError(f"moe: {path} has prompts for {len(data)} experts but num_experts={experts}; give one entry per expert.")
    return [[p] if isinstance(p, str) else [str(q) for q in p] for p in data]
