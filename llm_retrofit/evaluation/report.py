"""What an evaluation found, and its renderings: JSON (every number and the run's settings), Markdown (for model
cards), a rich table (for the terminal), a perplexity-vs-length plot and a passkey heatmap (PNG).

The result is plain data, so a JSON file written by one run can be read back (`EvalResult.from_json`) and rendered
again, or merged with another run's, without the models.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvaluationError
from ..io.commit import replace_file
from .gates import describe, histogram_lines, histogram_rows


@dataclass
class DocumentNLL:
    """One document's summed NLL (nats) over the `tokens` it had scored at one length."""

    document: str
    nll: float
    tokens: int


@dataclass
class LengthResult:
    """Perplexity at one length: NLL summed over every scored token of every document long enough for it."""

    length: int
    nll: float
    tokens: int
    skipped: int  # documents shorter than `length`
    documents: list[DocumentNLL] = field(default_factory=list)

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll / self.tokens) if self.tokens else None


@dataclass
class PasskeyTrial:
    """One passkey prompt: where the key was hidden, what the model answered, and whether that was the key."""

    length: int  # the length asked for; the prompt is at most this long
    depth: float  # requested: 0 = key at the start of the filler, 1 = at its end
    key: str
    answer: str
    correct: bool
    prompt_tokens: int
    key_position: int  # token index where the key sentence begins


@dataclass
class ModelResult:
    name: str
    perplexity: list[LengthResult]
    passkey: list[PasskeyTrial] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the perplexity evaluation (not loading, not passkey)
    tokens_forwarded: int = 0  # tokens that went through the decoder
    tokens_scored: int = 0  # predictions that entered a perplexity, summed over lengths
    info: dict[str, Any] = field(default_factory=dict)  # dtype, device, context length, RoPE, BOS...
    chat: dict[str, Any] | None = None
    """Assistant-token perplexity of held-out conversations (evaluation/chat.py): conversations, tokens, nll,
    perplexity, truncated, seconds; None when no chat data was given."""

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_scored / self.seconds if self.seconds else None

    def at(self, length: int) -> LengthResult | None:
        return next((r for r in self.perplexity if r.length == length), None)

    def passkey_accuracy(self) -> dict[tuple[int, float], float]:
        """Fraction of trials answered correctly, for each (length, depth)."""
        cells: dict[tuple[int, float], list[bool]] = {}
        for trial in self.passkey:
            cells.setdefault((trial.length, trial.depth), []).append(trial.correct)
        return {cell: sum(hits) / len(hits) for cell, hits in sorted(cells.items())}

    def passkey_by_length(self) -> dict[int, float]:
        """Accuracy for each length, the mean over its depths (what model cards and the Markdown `mean` show)."""
        depths: dict[int, list[float]] = {}
        for (length, _depth), accuracy in self.passkey_accuracy().items():
            depths.setdefault(length, []).append(accuracy)
        return {length: sum(values) / len(values) for length, values in depths.items()}


@dataclass
class EvalResult:
    """Every model's results under one set of settings (lengths, protocol, documents...)."""

    settings: dict[str, Any]
    models: list[ModelResult]

    # -- data --------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        models = []
        for model in self.models:
            record = asdict(model)
            record["tokens_per_second"] = model.tokens_per_second
            for length, raw in zip(model.perplexity, record["perplexity"]):
                raw["perplexity"] = length.perplexity
                raw["evaluated"] = len(length.documents)
            record["passkey_accuracy"] = [
                {"length": length, "depth": depth, "accuracy": accuracy}
                for (length, depth), accuracy in model.passkey_accuracy().items()
            ]
            models.append(record)
        return {"settings": self.settings, "models": models}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            _write(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        models = []
        for raw in data["models"]:
            lengths = [
                LengthResult(r["length"], r["nll"], r["tokens"], r["skipped"], [DocumentNLL(**d) for d in r["documents"]])
                for r in raw["perplexity"]
            ]
            models.append(ModelResult(
                raw["name"], lengths, [PasskeyTrial(**t) for t in raw["passkey"]], raw["seconds"],
                raw["tokens_forwarded"], raw["tokens_scored"], raw["info"], raw.get("chat"),
            ))
        return cls(data["settings"], models)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def merge(cls, results: list[EvalResult]) -> EvalResult:
        """One result holding the models of several runs made with the same settings (a side-by-side comparison)."""
        if not results:
            raise EvaluationError("nothing to merge; pass at least one EvalResult.")
        settings = dict(results[0].settings)
        for other in results[1:]:
            differing = sorted(k for k in settings.keys() | other.settings.keys() if settings.get(k) != other.settings.get(k)
                               and not (k == "passkey" and None in (settings.get(k), other.settings.get(k))))
            if differing:
                raise EvaluationError(
                    f"cannot compare runs made with different settings ({', '.join(differing)}); evaluate the models "
                    "in one call, or with the same lengths, protocol and documents."
                )
            # A model measured without the passkey sits beside those measured with it: it has no trials.
            settings["passkey"] = settings.get("passkey") or other.settings.get("passkey")
        return cls(settings, [model for result in results for model in result.models])

    @property
    def lengths(self) -> list[int]:
        return list(self.settings["lengths"])

    # -- text --------------------------------------------------------------------------------------------------------

    def describe_protocol(self) -> str:
        s = self.settings
        how = "each document cut to the length, one forward pass" if s["protocol"] == "truncate" else (
            f"sliding window of the length, stride {s['stride'] or 'half the length'}, only new tokens scored"
        )
        arithmetic = sorted({m.info["arithmetic"] for m in self.models if m.info.get("arithmetic")})
        return (f"{s['protocol']} ({how}); {s['documents']} document{'s' if s['documents'] != 1 else ''}; BOS: {s['bos']}"
                + (f"; {' / '.join(arithmetic)}" if arithmetic else ""))

    def to_markdown(self, path: str | os.PathLike[str] | None = None) -> str:
        """Markdown tables for a model card: perplexity by length, documents skipped, and passkey accuracy."""
        lengths = self.lengths
        lines = [
            "| model | " + " | ".join(_short(n) for n in lengths) + " |",
            "| --- |" + " ---: |" * len(lengths),
        ]
        for model in self.models:
            lines.append(f"| {model.name} | " + " | ".join(_ppl(model.at(n)) for n in lengths) + " |")
        skipped = ", ".join(f"{_short(r.length)}: {r.skipped}" for r in self.models[0].perplexity) if self.models else ""
        lines += ["", f"Perplexity, {self.describe_protocol()}. Documents shorter than a length are skipped ({skipped})."]
        with_chat = [m for m in self.models if m.chat]
        if with_chat:
            lines += ["", "| model | conversations | assistant tokens | chat perplexity |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {m.name} | {m.chat['conversations']} | {m.chat['tokens']} | {m.chat['perplexity']:.3f} |"
                      for m in with_chat]
            lines += ["", "Chat perplexity: held-out conversations in the model's chat template, assistant tokens only."]
        with_passkey = [m for m in self.models if m.passkey]
        if with_passkey:
            depths = sorted({t.depth for m in with_passkey for t in m.passkey})
            lines += [
                "",
                "| model | length | " + " | ".join(f"depth {d:.0%}" for d in depths) + " | mean |",
                "| --- | ---: |" + " ---: |" * (len(depths) + 1),
            ]
            for model in with_passkey:
                accuracy, means = model.passkey_accuracy(), model.passkey_by_length()
                for length in sorted(means):
                    cells = [f"{a:.0%}" if (a := accuracy.get((length, d))) is not None else "-" for d in depths]
                    lines.append(f"| {model.name} | {_short(length)} | " + " | ".join(cells) + f" | {means[length]:.0%} |")
            trials = self.settings.get("passkey", {}).get("trials")
            lines += ["", f"Passkey retrieval accuracy (greedy decoding, {trials} trial(s) per cell)."]
        for model in (m for m in self.models if m.info.get("memory_gates")):
            lines += ["", f"Infini-attention memory gates of {model.name}:", "", *histogram_lines(model.info["memory_gates"])]
        text = "\n".join(lines) + "\n"
        if path is not None:
            _write(path, text)
        return text

    def table(self) -> Any:
        """A rich renderable: perplexity by model and length, throughput, and passkey accuracy if measured."""
        from rich.console import Group
        from rich.table import Table

        ppl = Table(title="perplexity", caption=self.describe_protocol(), title_justify="left")
        ppl.add_column("model")
        for length in self.lengths:
            ppl.add_column(_short(length), justify="right")
        ppl.add_column("tokens/s", justify="right")
        for model in self.models:
            rate = model.tokens_per_second
            ppl.add_row(model.name, *(_ppl(model.at(n)) for n in self.lengths), f"{rate:,.0f}" if rate else "-")
        if self.models:
            ppl.add_row("[dim]documents (skipped)[/dim]", *(
                f"[dim]{len(r.documents)} ({r.skipped})[/dim]" if (r := self.models[0].at(n)) else "-" for n in self.lengths
            ), "")
        with_chat = [m for m in self.models if m.chat]
        # With conversations only (`retrofit eval --chat` without --data), a table of empty lengths says nothing.
        parts: list[Any] = [] if with_chat and not self.settings.get("documents") else [ppl]
        if with_chat:
            chat = Table(title="chat perplexity (assistant tokens)", title_justify="left")
            for column in ("model", "conversations", "tokens", "perplexity"):
                chat.add_column(column, justify="left" if column == "model" else "right")
            for model in with_chat:
                chat.add_row(model.name, str(model.chat["conversations"]), f"{model.chat['tokens']:,}",
                             f"{model.chat['perplexity']:.3f}")
            parts.append(chat)
        for model in (m for m in self.models if m.passkey):
            accuracy = model.passkey_accuracy()
            depths = sorted({d for _, d in accuracy})
            keys = Table(title=f"passkey accuracy: {model.name}", title_justify="left")
            keys.add_column("length")
            for depth in depths:
                keys.add_column(f"{depth:.0%}", justify="right")
            for length in sorted({n for n, _ in accuracy}):
                keys.add_row(_short(length), *(_accuracy_cell(accuracy.get((length, d))) for d in depths))
            parts.append(keys)
        for model in (m for m in self.models if m.info.get("memory_gates")):
            gates = Table(title=f"memory gates sigmoid(β): {model.name}", title_justify="left",
                          caption=describe(model.info["memory_gates"]))
            for column in ("bin", "heads", ""):
                gates.add_column(column, justify="right" if column == "heads" else "left")
            for span, count, bar in histogram_rows(model.info["memory_gates"]):
                gates.add_row(span, str(count), bar)
            parts.append(gates)
        return Group(*parts)

    # -- pictures ----------------------------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """PNG: perplexity (log scale) against length (log2 scale), one line per model, on one chart."""
        from matplotlib import ticker

        figure, canvas = _figure(7, 4.5)
        ax = figure.add_subplot()
        for model in self.models:
            points = [(r.length, r.perplexity) for r in model.perplexity if r.perplexity is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=model.name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(self.lengths, [_short(n) for n in self.lengths])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        # Plain numbers on the log axis; within a decade the intermediate ticks are labelled too.
        ax.yaxis.set_major_formatter(ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"Perplexity vs context length ({self.settings['protocol']})")
        ax.grid(True, which="both", alpha=0.3)
        if self.models:
            ax.legend()
        return _save(figure, canvas, path)

    def plot_passkey(self, path: str | os.PathLike[str]) -> Path:
        """PNG: passkey accuracy as a depth x length heatmap, one panel per model."""
        models = [m for m in self.models if m.passkey]
        if not models:
            raise EvaluationError("no passkey results to plot; evaluate with passkey=True (--passkey).")
        figure, canvas = _figure(1.2 + 4.2 * len(models), 3.8)
        for index, model in enumerate(models, 1):
            accuracy = model.passkey_accuracy()
            lengths = sorted({n for n, _ in accuracy})
            depths = sorted({d for _, d in accuracy})
            grid = [[accuracy.get((n, d), math.nan) for n in lengths] for d in depths]
            ax = figure.add_subplot(1, len(models), index)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            for row, depth_values in enumerate(grid):
                for column, value in enumerate(depth_values):
                    if not math.isnan(value):
                        ax.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("depth of the key")
            ax.set_title(model.name, fontsize=10)
        figure.colorbar(image, ax=figure.axes, label="accuracy")
        figure.suptitle("Passkey retrieval")
        return _save(figure, canvas, path)


def _short(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _ppl(result: LengthResult | None) -> str:
    return f"{result.perplexity:.3f}" if result is not None and result.perplexity is not None else "-"


def _accuracy_cell(accuracy: float | None) -> str:
    if accuracy is None:
        return "-"
    colour = "green" if accuracy >= 0.9 else "yellow" if accuracy >= 0.5 else "red"
    return f"[{colour}]{accuracy:.0%}[/{colour}]"


def _figure(width: float, height: float) -> tuple[Any, Any]:
    # The object API with the Agg canvas: no pyplot global state, no display needed, no backend to switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    return figure, FigureCanvasAgg(figure)


def _write(path: str | os.PathLike[str], text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_file(Path(path), text, follow_symlinks=True)  # a file in a patched copy may be a link to the source's


def _save(figure: Any, canvas: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    canvas.print_png(png)
    replace_file(path, png.getvalue(), follow_symlinks=True)  # a plot in a patched copy may be a link to the source's
    return path
