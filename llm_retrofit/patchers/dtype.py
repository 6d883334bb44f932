"""Cast the floating-point weights to another dtype: the smallest real patch, and the proof of the plan mechanism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checkpoint import TensorMeta
from ..plan import ModelView, TensorPlan, TensorTask
from . import Patcher, dtype_name, register


@register
@dataclass(frozen=True)
class CastDtype(Patcher):
    """Cast floating-point weights to another dtype (integer and boolean tensors are kept as they are)."""

    name: ClassVar[str] = "dtype"
    example: ClassVar[str] = "dtype:to=bfloat16"

    to: torch.dtype

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
