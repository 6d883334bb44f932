"""Where a model that is run but not trained lives (eval, passkey, the LongRoPE search): one device when it fits,
else spread over devices, CPU memory and disk by accelerate's big-model inference.

Loading goes through transformers' `from_pretrained(device_map=..., max_memory=..., offload_folder=...)`, which
hands the placement to accelerate (`accelerate.big_modeling.dispatch_model`): each module's weights sit on a GPU, in
CPU memory, or stay on disk (read straight from the checkpoint's safetensors), and a hook on every module's forward
brings its weights to the device that computes it and moves the inputs there. Nothing here moves tensors itself.

What the consumers must know: a placed model's parameters may be on the meta device (offloaded), so `model.device`
(its first parameter's) is not where inputs go. `input_device` is: the device the input embedding computes on. The
LM head may compute on another device, so whoever combines its output with other tensors moves them to the
output's device (`modeling.nll.head_nll`), and never reads `head.weight` directly.

Defaults. No placement given: the model goes whole onto the chosen device (`--device`, default cuda if available,
else cpu) when its weights take at most FIT_SHARE of that device's free memory, as before; otherwise accelerate
places it ("auto") on that device, then CPU memory, then disk. The dtype is the checkpoint's own: bf16 weights are
never held as a float32 copy unless asked for (`--dtype float32`, the faster choice on a CPU without bf16 units when
memory allows: SmolLM2-1.7B's shape at 256 tokens on an AVX2 EPYC took 123 s in 3.96 GB as bf16, 71 s in 10.64 GB
as float32).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EvaluationError
from .devices import input_device
from .precision import default_device

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies (`--device-map`); any other value names one device."""
FIT_SHARE = 0.9
"""The share of a device's free memory the weights may take for the model to go there whole: the rest is for the
activations (a few hundred MB at 16k tokens for an 8B model, with the LM head run in chunks) and the allocator."""
MAX_MEMORY_EXAMPLE = "cuda:0=20GiB,cpu=64GiB"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` (default: cuda if available, else cpu) checked against this machine, so that a typo or a missing GPU
    is one clear error before anything is loaded."""
    if device is None:
        return torch.device(default_device())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EvaluationError(f"device {str(device)!r} is not a device; pass cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EvaluationError(
                f"device {str(device)!r}: CUDA is not available here (no NVIDIA GPU or driver, or a CPU-only torch "
                "build); pass --device cpu (device='cpu')."
            )
        if resolved.index is not None and resolved.index >= count:
            raise EvaluationError(
                f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}."
            )
    if resolved.type == "meta":
        raise EvaluationError("device 'meta' holds no weights, so nothing can be measured on it; pass cpu or cuda.")
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as e:  # torch says AssertionError for a backend it was not built with
        raise EvaluationError(f"device {str(device)!r} cannot be used here ({e}); pass cpu or cuda.") from None
    return resolved


def parse_max_memory(value: str | Mapping[Any, Any] | None) -> dict[int | str, int] | None:
    """`cuda:0=20GiB,cpu=64GiB` (or the dict accelerate takes, {0: "20GiB", "cpu": "64GiB"}) -> {0: bytes, "cpu":
    bytes}, each device checked against this machine and each size against accelerate's format."""
    from accelerate.utils import convert_file_size_to_int

    if value is None:
        return None
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if not pairs or any(not sep or not key.strip() or not size.strip() for key, sep, size in pairs):
            raise EvaluationError(f"max_memory {value!r} is not DEVICE=SIZE,...; write it as {MAX_MEMORY_EXAMPLE}.")
        value = {key.strip(): size.strip() for key, _, size in pairs}
    limits: dict[int | str, int] = {}
    for key, size in value.items():
        device = _memory_key(key)
        try:
            limits[device] = convert_file_size_to_int(size)
        except (ValueError, TypeError):
            raise EvaluationError(f"max_memory size {size!r} for {key} is not a size; write it as 20GiB, 512MiB or "
                                  f"a number of bytes (e.g. {MAX_MEMORY_EXAMPLE}).") from None
    return limits


def _memory_key(key: Any) -> int | str:
    """A max_memory device as accelerate names it: a GPU by its index, else cpu or mps."""
    if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
        key = f"cuda:{int(key)}"
    if key in ("cpu", "mps"):
        resolve_device(key)
        return key
    if isinstance(key, str) and key.startswith("cuda"):
        try:
            return resolve_device(key).index or 0
        except EvaluationError as e:
            reason = str(e).split("; pass")[0]
            raise EvaluationError(f"max_memory: {reason}; name only devices this machine has (cpu=64GiB, "
                                  "cuda:N=20GiB).") from None
    raise EvaluationError(f"max_memory names {key!r}, which is not a device; use cpu, mps or cuda:N "
                          f"(e.g. {MAX_MEMORY_EXAMPLE}).")


def check_placement(
    device: str | torch.device | None, device_map: str | Mapping[str, Any] | None,
    max_memory: str | Mapping[Any, Any] | None,
) -> dict[int | str, int] | None:
    """Raise EvaluationError, naming the fix, unless the options make one placement; the parsed max_memory."""
    limits = parse_max_memory(max_memory)
    if device is not None:
        resolve_device(device)
    if device is not None and device_map is not None:
        raise EvaluationError("device and device_map both given: pass device (--device) for one device, or "
                              "device_map (--device-map) to place the model, not both.")
    if isinstance(device_map, str) and device_map not in STRATEGIES:  # one device, named
        try:
            resolve_device(device_map)
        except EvaluationError as e:
            if _names_a_device(device_map):  # a device this machine lacks: resolve_device says which it has
                raise EvaluationError(f"device_map: {str(e).replace('--device', '--device-map')}") from None
            raise EvaluationError(f"device_map {device_map!r} is neither a placement ({', '.join(STRATEGIES)}) nor "
                                  "a device (cpu, cuda, cuda:N).") from None
        if limits is not None:
            raise EvaluationError(f"max_memory spreads a model over devices, but device_map {device_map!r} is one "
                                  "device; pass --device-map auto with --max-memory, or drop --max-memory.")
    elif device_map is not None and not isinstance(device_map, (str, Mapping)):
        raise EvaluationError(f"device_map {device_map!r} is not a placement; pass one of {', '.join(STRATEGIES)}, a "
                              "device (cpu, cuda:0) or a dict of module name -> device.")
    return limits


def _names_a_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def placement_options(
    checkpoint: Checkpoint, dtype: torch.dtype, *, device: str | torch.device | None = None,
    device_map: str | Mapping[str, Any] | None = None, max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The placement keywords of `from_pretrained` for this checkpoint loaded in `dtype` (see the module's doc)."""
    limits = check_placement(device, device_map, max_memory)
    if isinstance(device_map, str) and device_map not in STRATEGIES:  # one device, named
        return {"device_map": {"": resolve_device(device_map)}}
    if device_map is None and limits is None:
        target = resolve_device(device)
        size, free = weight_bytes(checkpoint, dtype), free_memory(target)
        if size <= FIT_SHARE * free:
            return {"device_map": {"": target}}
        log.warning("%s: %.1f GiB of weights do not fit in the %.1f GiB free on %s; placing them on %s, then CPU "
                    "memory, then disk (--device-map, --max-memory choose otherwise)", checkpoint.path, size / 2**30,
                    free / 2**30, target, target)
        limits = {(target.index or 0) if target.type == "cuda" else target.type: int(FIT_SHARE * free)}
        if target.type != "cpu":
            limits["cpu"] = int(FIT_SHARE * free_memory(torch.device("cpu")))
    return {"device_map": device_map or "auto", "max_memory": limits,
            "offload_folder": str(offload_folder) if offload_folder is not None else None}


def weight_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """The bytes of the checkpoint's weights once loaded with floating-point tensors in `dtype`."""
    return sum(meta.numel * (dtype.itemsize if meta.dtype.is_floating_point else meta.dtype.itemsize)
               for meta in checkpoint.tensors.values())


def free_memory(device: torch.device) -> int:
    """Bytes free for a model on `device` (`memory.available_bytes`: a GPU's free memory; for the CPU what the OS
    says is available, capped by a container's cgroup limit, which psutil does not see)."""
    import psutil

    from .memory import available_bytes

    found = available_bytes(device)
    return found if found is not None else psutil.virtual_memory().available


def load_placed(path: Path, dtype: torch.dtype | str, options: dict[str, Any], trusted: bool) -> Any:
    """`from_pretrained` with the placement `options` (`placement_options`), in eval mode. A model spread by
    accelerate gets a temporary offload folder unless one was given, removed with the model: transformers reads
    offloaded safetensors weights where they are and writes there only what it converts (another dtype)."""
    from transformers import AutoModelForCausalLM

    temporary = None
    if "offload_folder" in options and options["offload_folder"] is None:
        temporary = tempfile.mkdtemp(prefix="retrofit-offload-")
        options = options | {"offload_folder": temporary}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trusted, **options)
    except BaseException:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if temporary:
        weakref.finalize(model, shutil.rmtree, temporary, True)
    return model.eval()


def place_loaded(
    model: Any, *, device_map: str | Mapping[str, Any] | None = None, max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> Any:
    """A model already in CPU memory (an adapter merged onto its base) placed as `load_model` places a checkpoint:
    whole on the default device when no placement is given, else by accelerate (`dispatch_model`)."""
    from accelerate import dispatch_model, infer_auto_device_map

    from ..io.progress import quiet_libraries

    limits = check_placement(None, device_map, max_memory)
    if device_map is None and limits is None:
        return model.to(resolve_device(None))
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        return model.to(resolve_device(device_map))
    if not isinstance(device_map, Mapping):
        no_split = getattr(model, "_no_split_modules", None) or []
        device_map = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split)
    if set(device_map) == {""}:  # dispatch_model offloads modules by name, and "" names none of the state dict's keys
        device_map = {name: device_map[""] for name, _ in model.named_children()}
    folder = str(offload_folder) if offload_folder else tempfile.mkdtemp(prefix="retrofit-offload-")
    if not offload_folder:
        weakref.finalize(model, shutil.rmtree, folder, True)
    with quiet_libraries():  # accelerate's notice that offloaded weights sit on meta
        return dispatch_model(model, device_map=dict(device_map), offload_dir=folder)


def placement_summary(model: torch.nn.Module) -> str:
    """What a result records as the model's device: one device, or how accelerate spread its modules."""
    device_map = getattr(model, "hf_device_map", None)
    places = sorted({str(place) if not isinstance(place, int) else f"cuda:{place}"
                     for place in (device_map or {}).values()})
    if len(places) > 1 or places == ["disk"]:
        return "placed: " + ", ".join(places) + f" (runs on {input_device(model)})"
    return str(input_device(model))
