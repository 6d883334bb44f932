"""Attention: which kernel computes it, and which keys each query may see, persisted in the checkpoint.

Two independent choices, one patch:
- `impl`: the kernel (eager, sdpa, flash_attention_2/3, flex_attention, or a kernels-hub id). transformers honours
  `attn_implementation` in config.json when loading but `save_pretrained` drops it; this patch writes it, and our own
  saves (finetune) put it back.
- `pattern`: which keys a query attends to.
  - `sliding` (window=W[, full_every=N]) is expressed in what transformers already understands, so the result
    loads anywhere and `generate` keeps a bounded cache: Llama becomes Mistral (one window for every layer) or, with
    `full_every`, Ministral (every N-th layer full, the others sliding). Only config and names change; the weights
    are the same bytes. A Llama config with `sliding_window` is never written: Llama's forward ignores it while
    `generate`'s cache honours it, so prefill and decoding would disagree.
  - `sinks` (sinks=S, window=W): StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): the first S tokens plus the
    last W, with a cache of S + W entries however long the stream runs. No config key in transformers expresses it,
    so the checkpoint ships a self-contained modeling file (`modeling/shipped/`) that config.json's `auto_map`
    names; it loads with `trust_remote_code=True` where llm-retrofit is not installed, and as the plain model
    (full attention) without it.
  - `block_sparse` (block_size=B, window=W, global_blocks=G, random_blocks=R, seed): BigBird/Longformer-style
    causal block sparsity, shipped the same way.
  - `dense`: back to full attention (removes what an earlier pattern wrote).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..errors import PatchError, PatchSpecError
from ..modeling import shipped
from ..plan import ModelView, TensorPlan
from ..spec import PatchCard, Patcher, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_HUB_KERNEL = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?(:[\w.-]+)?$")  # kernels-community/flash-attn[@rev][:fn]
SHIPPED_MODULE = "modeling_retrofit_attention"
_PATTERN_KEY = "retrofit_attention"
_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")
DEFAULT_BLOCK_SIZE = 128

Pattern = Literal["dense", "sliding", "sinks", "block_sparse"]
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "sliding": ("window", "full_every"),
    "sinks": ("sinks", "window"),
    "block_sparse": ("block_size", "window", "global_blocks", "random_blocks", "seed"),
}


@register
@dataclass(frozen=True)
class SetAttention(Patcher):
    """Choose the attention kernel and pattern (sliding window, attention sinks, block-sparse), kept in the checkpoint."""

    name: ClassVar[str] = "attention"
    example: ClassVar[str] = "attention:pattern=sliding,window=4096"
    card: ClassVar[PatchCard] = PatchCard(
        "Attention pattern",
        "Which keys each query attends to, and which kernel computes it, chosen without training.",
        "Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023)", "https://arxiv.org/abs/2309.17453",
        "Sparse patterns (a sliding window, sinks, block-sparse) drop keys the model was trained to see: compare the "
        "perplexity on long documents with the source before relying on it.",
    )

    impl: str | None = None
    pattern: Pattern | None = None
    window: int | None = None
    full_every: int | None = None
    sinks: int | None = None
    block_size: int | None = None
    global_blocks: int | None = None
    random_blocks: int | None = None
    seed: int | None = None
    check: bool = True
    """Refuse a kernel this machine cannot run; check=false writes it for another machine."""

    def __post_init__(self) -> None:
        if self.impl is None and self.pattern is None:
            raise PatchSpecError(f"attention: give impl=KERNEL, pattern=PATTERN or both. Example: {self.example}")
        if self.impl is not None and self.impl not in KERNELS and not _HUB_KERNEL.match(self.impl):
            raise PatchSpecError(f"attention: impl={self.impl!r} is not a kernel; use one of {', '.join(KERNELS)} "
                                 "or a kernels-hub id such as kernels-community/flash-attn.")
        allowed = _PARAMETERS[self.pattern] if self.pattern else ()
        stray = [key for key in ("window", "full_every", "sinks", "block_size", "global_blocks", "random_blocks", "seed")
                 if getattr(self, key) is not None and key not in allowed]
        if stray:
            what = f"pattern={self.pattern}" if self.pattern else "a kernel choice without a pattern"
            takes = ", ".join(allowed) or "no parameters"
            raise PatchSpecError(f"attention: {', '.join(stray)} do not apply to {what} (it takes {takes}).")
        if self.pattern in ("sliding", "sinks", "block_sparse") and (self.window is None or self.window < 1):
            raise PatchSpecError(f"attention: pattern={self.pattern} needs window=W, the number of recent tokens each "
                                 f"query sees (W >= 1), e.g. attention:pattern={self.pattern},window=4096.")
        if self.full_every is not None and self.full_every < 2:
            raise PatchSpecError("attention: full_every=N makes every N-th layer full attention; N must be >= 2 "
                                 "(full_every=1 would be no sliding window at all: use pattern=dense).")
        for key in ("sinks", "global_blocks", "random_blocks", "seed"):  # the shipped file refuses a negative one
            if (getattr(self, key) or 0) < 0:
                raise PatchSpecError(f"attention: {key}={getattr(self, key)} must be >= 0, e.g. {key}=0.")
        if self.pattern == "block_sparse":
            block = self.block
            if block < 1:
                raise PatchSpecError(f"attention: block_size={block} must be a positive number of tokens per block, "
                                     f"e.g. block_size={DEFAULT_BLOCK_SIZE} (the default).")
            if self.window % block:  # type: ignore[operator]
                raise PatchSpecError(f"attention: block_sparse works in blocks of block_size={block} tokens; the "
                                     f"window ({self.window}) must be a multiple of it, e.g. window={block * 8}.")

    @property
    def block(self) -> int:
        """block_sparse's block size: the one given (0 is refused, not taken for the default), else the default."""
        return DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size

    # ------------------------------------------------------------------------------------------------- the plan

    def plan(self, model: ModelView) -> TensorPlan:
        if self.impl is not None and self.check:
            _require_runnable(self.impl)
        config = _without_pattern(model.config) if self.pattern else dict(model.config)
        files: dict[str, str] = {}
        if self.pattern == "sliding":
            config = _sliding(config, self.window, self.full_every)  # type: ignore[arg-type]
        elif self.pattern in ("sinks", "block_sparse"):
            config = _shipped_pattern(config, self.pattern_settings())
            files = shipped.files(SHIPPED_MODULE)
        if self.impl is not None:
            config["attn_implementation"] = self.impl
        plan = TensorPlan.identity(ModelView(config, model.tensors))
        plan.files = files
        plan.installs = [self.install]
        return plan

    def pattern_settings(self) -> dict[str, Any]:
        """The `retrofit_attention` entry the shipped modeling file reads."""
        if self.pattern == "sinks":
            return {"pattern": "sinks", "sinks": 4 if self.sinks is None else self.sinks, "window": self.window}
        block = self.block
        return {
            "pattern": "block_sparse", "block_size": block, "window_blocks": self.window // block,  # type: ignore[operator]
            "global_blocks": 1 if self.global_blocks is None else self.global_blocks,
            "random_blocks": self.random_blocks or 0, "seed": self.seed or 0,
        }

    def install(self, model: PreTrainedModel) -> PreTrainedModel:
        """For `apply_to_model`: the rebuilt model gets the shipped classes and the kernel its checkpoint loads with."""
        if self.pattern in ("sinks", "block_sparse"):
            model = shipped.install(SHIPPED_MODULE, model)
        if self.impl is not None:
            model.set_attn_implementation(self.impl)
        return model


# ------------------------------------------------------------------------------------------------- config rewrites


def _sliding(config: dict[str, Any], window: int, full_every: int | None) -> dict[str, Any]:
    """Llama/Mistral -> Mistral with one window, or -> Ministral with every `full_every`-th layer full."""
    if config.get("model_type") not in ("llama", "mistral", "ministral"):
        raise PatchError(f"attention: a sliding window needs a Llama or Mistral model, not {config.get('model_type')}.")
    biased = [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if biased:
        raise PatchError(f"attention: this model has {' and '.join(biased)}; Mistral, which carries the sliding window "
                         "in transformers, has no bias tensors, so the window cannot be expressed without custom code.")
    _refuse_custom_code(config, "sliding")
    config = {k: v for k, v in config.items() if k not in _LLAMA_ONLY_KEYS}
    config["sliding_window"] = window
    if full_every is None:
        return {**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    layers = config["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(layers)]
    # Ministral derives nothing: its config needs head_dim spelled out.
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {**config, "model_type": "ministral", "architectures": ["MinistralForCausalLM"], "layer_types": types,
            "head_dim": head_dim}


def _without_pattern(config: dict[str, Any]) -> dict[str, Any]:
    """The config with no attention pattern: what a new pattern starts from (and what pattern=dense writes)."""
    config = shipped.without_code({k: v for k, v in config.items() if k != _PATTERN_KEY}, SHIPPED_MODULE)
    if config.get("model_type") == "ministral":  # one window size for all layers remains expressible as Mistral
        config = {k: v for k, v in config.items() if k != "layer_types"}
        config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    if config.get("model_type") == "mistral":
        config["sliding_window"] = None
    return config


def _shipped_pattern(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral"):
        raise PatchError(f"attention: pattern={settings['pattern']} is shipped for Llama and Mistral models, not "
                         f"{model_type}.")
    _refuse_custom_code(config, settings["pattern"])
    model_class = "RetrofitMistralForCausalLM" if model_type == "mistral" else "RetrofitLlamaForCausalLM"
    return shipped.config_for(config, SHIPPED_MODULE, model_class, _PATTERN_KEY, settings)


def _refuse_custom_code(config: dict[str, Any], pattern: str) -> None:
    """Other custom code (Infini-attention, a Hub model's own) would be replaced or contradicted by this pattern."""
    if "auto_map" in config:
        raise PatchError(f"attention: this model loads custom code ({config['auto_map']}, from the source or an "
                         f"earlier patch); pattern={pattern} would replace or contradict it. Apply one of them.")



# ---------------------------------------------------------------------------------------- what this machine runs


def _require_runnable(impl: str) -> None:
    """Refuse a kernel this machine cannot run, naming what is missing and the alternative."""
    problem = unavailable_reason(impl)
    if problem:
        raise PatchError(f"attention: impl={impl} cannot run on this machine: {problem}. Use impl=sdpa (runs "
                         "everywhere), or add check=false to write it for a machine that has it.")


def unavailable_reason(impl: str) -> str | None:
    """Why `impl` cannot run here, or None when it can."""
    import torch
    from transformers.utils import (
        is_flash_attn_2_available,
        is_flash_attn_3_available,
        is_kernels_available,
        is_torch_flex_attn_available,
    )

    if impl in ("eager", "sdpa"):
        return None
    if impl == "flex_attention":
        if not is_torch_flex_attn_available():
            return f"torch {torch.__version__} has no flex_attention (it needs torch >= 2.5)"
        if not torch.cuda.is_available() and not (shutil.which("cc") or shutil.which("gcc")):
            return "flex_attention compiles a kernel, and on a CPU that needs a C compiler (cc), which is not installed"
        return None
    if impl.startswith("flash_attention"):
        if not torch.cuda.is_available():
            return f"{impl} needs an NVIDIA GPU and this machine has none"
        available = is_flash_attn_2_available() if impl == "flash_attention_2" else is_flash_attn_3_available()
        package = "flash-attn" if impl == "flash_attention_2" else "flash-attn 3 (flash_attn_interface)"
        return None if available else f"the {package} package is not installed"
    if not is_kernels_available():
        return "a kernels-hub kernel needs the `kernels` package (pip install kernels) and access to the Hub"
    return None
