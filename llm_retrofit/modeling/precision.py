"""The arithmetic of inference: bfloat16 autocast for a float32 model where the hardware multiplies bfloat16 natively.

Evaluation, passkey retrieval and the LongRoPE search forward long sequences through a model that stays float32 (the
weights, the norms, the softmax and the NLL). Under `torch.autocast` the matrix products and the attention kernel
run in bfloat16 with float32 accumulation: on a GPU with bf16 tensor cores, and on an x86 CPU with AMX or
AVX512-BF16 (torch's `torch.cpu._is_amx_tile_supported` / `_is_avx512_bf16_supported`), that is where the time goes.

Measured on SmolLM2-135M, 2 cores of a Sapphire Rapids CPU (AMX), the first 8192 tokens of a python-docs document:
one forward 32.0 s in float32, 14.0 s under bf16 autocast (2.3x), perplexity 10.30192 vs 10.30303 (+0.011%); at
16384 tokens 37 s under autocast, where float32 took ~100 s. The same model cast to bfloat16 took 18.4 s (its
norms and elementwise work in bf16 are slower, and less exact). On a CPU without those units bf16 is emulated and
several times slower, so `auto` keeps float32 there.

`auto` is the default of `retrofit eval`, the recipes' eval steps and the search; `off` gives float32 throughout
(exactly what earlier versions measured). Which one ran is recorded with every result (`arithmetic`), and every
model compared in one run uses the same choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import EvaluationError

AUTOCAST_CHOICES = ("auto", "bf16", "off")


def check_autocast(choice: str) -> None:
    if choice not in AUTOCAST_CHOICES:
        raise EvaluationError(f"autocast {choice!r} is not one of {', '.join(AUTOCAST_CHOICES)}: auto (bf16 where the "
                              "hardware has it), bf16, or off (float32 throughout).")


def default_device() -> str:
    """Where our commands run a model unless told otherwise: the GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware (so that autocast to it is faster, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(check is not None and check() for check in checks)
    return False


def autocast_dtype(model: Any, choice: str = "auto") -> torch.dtype | None:
    """bfloat16 if inference of `model` should run under bf16 autocast with this `choice`, else None.

    Only a float32 model is autocast: one already in bf16/fp16 computes in its own dtype.
    """
    check_autocast(choice)
    if choice == "off" or model.dtype != torch.float32:
        return None
    if choice == "bf16" or native_bf16(_computes_on(model)):
        return torch.bfloat16
    return None


def arithmetic(model: Any, choice: str = "auto") -> str:
    """What a result computed with `choice` records: `float32`, or `float32 weights, bfloat16 autocast`."""
    found = autocast_dtype(model, choice)
    own = str(model.dtype).removeprefix("torch.")
    return f"{own} weights, bfloat16 autocast" if found is not None else own


@contextlib.contextmanager
def inference_autocast(model: Any, choice: str = "auto") -> Iterator[None]:
    """Run what the block does with `model` under the autocast `choice` says (nothing changes if none)."""
    dtype = autocast_dtype(model, choice)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=_computes_on(model).type, dtype=dtype):
        yield


def _computes_on(model: Any) -> torch.device:
    """The device a (possibly placed) model starts computing on: see modeling/placement.py."""
    from .devices import input_device

    return input_device(model)
