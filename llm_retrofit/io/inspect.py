"""`retrofit inspect`: what a checkpoint is, from its config and tensor headers alone (no weights are read)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .checkpoint import Checkpoint
from .provenance import HISTORY_KEY


def describe(checkpoint: Checkpoint, custom_code: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The facts of `checkpoint`; `custom_code` is whose code its auto_map loads, as `modeling.remote_code.code_report`
    judges it (the CLI passes it: that judgement belongs to the room that knows our shipped files)."""
    config = checkpoint.config
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else None)
    dtypes = Counter(str(meta.dtype).removeprefix("torch.") for meta in checkpoint.tensors.values())
    weight_bytes = sum((checkpoint.path / name).stat().st_size for name in checkpoint.weight_files)
    return {
        "path": str(checkpoint.path),
        "architecture": checkpoint.architecture.class_name,
        "model_type": config.get("model_type"),
        "parameters": sum(meta.numel for meta in checkpoint.tensors.values()),
        "layers": config.get("num_hidden_layers"),
        "attention_heads": heads,
        "kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": head_dim,
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "context_length": config.get("max_position_embeddings"),
        "rope_parameters": config.get("rope_parameters"),
        "sliding_window": config.get("sliding_window"),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "dtype": dict(dtypes),
        "weight_files": len(checkpoint.weight_files),
        "size_on_disk_bytes": weight_bytes,
        "missing_tensors": checkpoint.missing_tensors(),
        "incomplete": checkpoint.incompleteness(),
        "history": config.get(HISTORY_KEY, []),
        "auto_map": config.get("auto_map"),
        "custom_code": dict(custom_code) if custom_code is not None else None,
    }


def render(description: dict[str, Any]) -> Any:
    """A rich renderable: the facts as a two-column table, then the patch history."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    shown = {
        "path": description["path"],
        "architecture": f"{description['architecture']} ({description['model_type']})",
        "parameters": f"{description['parameters']:,} ({description['parameters'] / 1e6:.1f} M)",
        "layers": description["layers"],
        "attention heads": description["attention_heads"],
        "KV heads": description["kv_heads"],
        "head dim": description["head_dim"],
        "hidden size": description["hidden_size"],
        "vocab size": description["vocab_size"],
        "context length": description["context_length"],
        "RoPE": description["rope_parameters"],
        "sliding window": description["sliding_window"],
        "tied embeddings": description["tie_word_embeddings"],
        "dtype": ", ".join(f"{d} ({n} tensors)" for d, n in description["dtype"].items()),
        "size on disk": f"{description['size_on_disk_bytes'] / 1e6:,.1f} MB in {description['weight_files']} file(s)",
    }
    for key, value in shown.items():
        facts.add_row(key, str(value))
    parts: list[Any] = [facts]
    if description["incomplete"]:
        parts.append(f"[red]the checkpoint is incomplete: {escape(description['incomplete'])}[/red]")
    code = description.get("custom_code")
    if code is not None:
        parts.append(_custom_code_line(code))
    history = Table(title="patch history", title_justify="left")
    for column in ("#", "patch", "params", "time", "source weights xxh3"):
        history.add_column(column)
    for i, record in enumerate(description["history"], 1):
        params = ", ".join(f"{k}={v}" for k, v in record.get("params", {}).items() if v is not None)
        history.add_row(str(i), record.get("patch", "?"), params, record.get("time", ""), record.get("source_weights_xxh3", "")[:16])
    parts.append(history if description["history"] else "patch history: none (not rewritten by llm-retrofit)")
    return Group(*parts)


def _custom_code_line(code: Mapping[str, Any]) -> str:
    """One line (rich markup) on whose code the checkpoint's auto_map loads, from `describe`'s `custom_code`."""
    from rich.markup import escape

    files = ", ".join(code["files"])
    if code["verdict"] == "none":
        return "custom code: none (transformers' own classes load it)"
    if code["verdict"] == "llm-retrofit":
        return (f"custom code: llm-retrofit's own {escape(files)}, byte-identical to this version's (eval and finetune "
                "run it)")
    if code["verdict"] == "foreign":
        return (f"[red]custom code that is NOT llm-retrofit's: {escape('; '.join(code['entries']))}. retrofit eval "
                "and finetune refuse to load it; trust_remote_code=True would run it.[/red]")
    return f"[red]custom code: {escape(code['problem'])}[/red]"
