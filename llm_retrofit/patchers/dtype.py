"""Cast the floating-point weights to another dtype: the smallest real patch, and the proof of the plan mechanism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..io.checkpoint import TensorMeta
from ..plan import ModelView, TensorPlan, TensorTask
from ..spec import PatchCard, Patcher, dtype_name, register


@register
@dataclass(frozen=True)
class CastDtype(Patcher):
    """Cast floating-point weights to another dtype (integer and boolean tensors are kept as they are)."""

    name: ClassVar[str] = "dtype"
    example: ClassVar[str] = "dtype:to=bfloat16"
    card: ClassVar[PatchCard] = PatchCard(
        "Precision cast", "Floating-point weights re-encoded in another dtype; bfloat16 keeps float32's exponent "
        "range with a 7-bit mantissa.",
        "A Study of BFLOAT16 for Deep Learning Training (Kalamkar et al., 2019)", "https://arxiv.org/abs/1905.12322",
        "Casting to a narrower type rounds every weight; compare the evaluation with the source before relying on "
        "it.",
    )
    representation_only: ClassVar[bool] = True

    to: torch.dtype

    @classmethod
    def card_limitation(cls, params: dict[str, Any]) -> str | None:
        if params.get("to") not in ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"):
            return None  # casting up (or to the same width) loses nothing
        return super().card_limitation(params)

    def plan(self, model: ModelView) -> TensorPlan:
        tensors = {}
        for name, meta in model.tensors.items():
            if meta.dtype.is_floating_point and meta.dtype != self.to:
                tensors[name] = TensorTask(TensorMeta(self.to, meta.shape), (name,), self._cast)
            else:
                tensors[name] = TensorTask(meta, (name,))
        return TensorPlan({**model.config, "dtype": dtype_name(self.to)}, tensors)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.to)
