"""Where an Infini-attention model's gates stand: sigmoid(memory_gate) per (layer, query head), the share of each head's
output that comes from the compressive memory, summed up as a histogram for the eval report and the model card.

The gates are what an Infini finetune trains, and the public retrofit attempt's failure showed in them (95% stuck
near 0.5), so a run shows their distribution rather than a mean. The bins are logarithmic at the bottom because a
fresh patch starts every gate at sigmoid(-8) = 3.4e-4 and training moves them by orders of magnitude first.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GATE_SUFFIX = ".self_attn.memory_gate"
SETTINGS_KEY = "retrofit_infini"  # config.json's Infini settings; evaluation may not import patchers (a room up)
EDGES = (0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 1.0)  # bins [lo, hi); the last one includes 1
BAR_WIDTH = 30


def gate_summary(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any] | None:
    """(name, tensor) pairs of a model or checkpoint -> the memory weights and their histogram; None without gates.

    {"layers": L, "heads": H, "weights": [[sigmoid(beta) per head] per layer], "mean", "min", "max",
     "histogram": [{"low", "high", "count"}, ...]} with EDGES as the bins."""
    import torch

    gates = {name: tensor for name, tensor in named if name.endswith(GATE_SUFFIX)}
    if not gates:
        return None
    rows = [torch.sigmoid(gates[name].detach().float().cpu()).tolist() for name in sorted(gates, key=_layer_index)]
    flat = [w for row in rows for w in row]
    counts = [0] * (len(EDGES) - 1)
    for weight in flat:
        counts[min(bisect.bisect_right(EDGES, weight) - 1, len(counts) - 1)] += 1
    return {
        "layers": len(rows), "heads": len(flat), "weights": rows,
        "mean": sum(flat) / len(flat), "min": min(flat), "max": max(flat),
        "histogram": [{"low": lo, "high": hi, "count": n} for lo, hi, n in zip(EDGES, EDGES[1:], counts)],
    }


def model_gates(model: torch.nn.Module) -> dict[str, Any] | None:
    """`gate_summary` of a loaded model (None when it has no Infini-attention gates, or its memory is off)."""
    if not _memory_on(getattr(model.config, SETTINGS_KEY, None)):
        return None
    return gate_summary(model.named_parameters())


def checkpoint_gates(checkpoint: Any) -> dict[str, Any] | None:
    """`gate_summary` of a checkpoint on disk, reading only its gate tensors."""
    names = [name for name in checkpoint.tensors if name.endswith(GATE_SUFFIX)]
    if not names or not _memory_on(checkpoint.config.get(SETTINGS_KEY)):
        return None
    return gate_summary((name, checkpoint.read(name)) for name in names)


def _memory_on(settings: Any) -> bool:
    """With `memory: false` (the ablation) the gates are never read: there is nothing to show."""
    return not isinstance(settings, dict) or settings.get("memory", True) is not False


def histogram_rows(summary: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(bin, heads in it, a bar scaled to the fullest bin) for each bin of the histogram."""
    top = max(b["count"] for b in summary["histogram"]) or 1
    rows = []
    for b in summary["histogram"]:
        closing = "]" if b["high"] == EDGES[-1] else ")"
        rows.append((f"[{b['low']:g}, {b['high']:g}{closing}", b["count"],
                     "█" * math.ceil(BAR_WIDTH * b["count"] / top)))
    return rows


def describe(summary: dict[str, Any]) -> str:
    return (f"{summary['heads']} gates ({summary['layers']} layers): mean {summary['mean']:.4g}, min "
            f"{summary['min']:.4g}, max {summary['max']:.4g}. A head takes this share of its output from the memory, "
            "the rest from attention within its segment.")


def histogram_lines(summary: dict[str, Any]) -> list[str]:
    """The histogram as a Markdown table with a bar per bin, then `describe`'s line."""
    lines = ["| memory weight sigmoid(β) | heads | |", "| --- | ---: | --- |"]
    lines += [f"| {span} | {count} | {bar} |" for span, count, bar in histogram_rows(summary)]
    return [*lines, "", describe(summary)]


def _layer_index(name: str) -> int:
    """model.layers.12.self_attn.memory_gate -> 12 (so that layer 10 sorts after layer 9)."""
    return int(name.removesuffix(GATE_SUFFIX).rsplit(".", 1)[-1])
