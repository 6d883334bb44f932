"""The `eval` step: `evaluate` on the step's model (and the base, and baselines patched from it, beside it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import EvaluationError
from ...modeling.cost import Pass
from ..schema import EvalSettings, Recipe, Step
from .base import PlannedStep, Planning, RunState, StepKind, StepOutcome, check_settings

if TYPE_CHECKING:

    from ...plan import ModelView
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


_PRICED = ("lengths", "protocol", "stride", "passkey", "passkey_lengths", "passkey_depths", "passkey_trials")
"""The keywords of `evaluate` that decide its passes."""


class EvalStep(StepKind):
    kind: ClassVar[str] = "eval"
    memory_advice: ClassVar[str] = ("lower the longest of lengths, or place the model across devices and offload "
                                     "(device_map, max_memory: docs/evaluation.md)")
    writes_directory: ClassVar[bool] = True

    def check(self, recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None) -> None:
        check_settings(recipe, step, params, EvalSettings)

    def plan(self, item: PlannedStep, planning: Planning) -> None:
        if item.unknown:
            return
        settings = EvalSettings.read(item.params)
        lengths = settings.measured_lengths()
        labels = settings.labels()
        item.notes.append(f"{len(labels)} model(s) ({', '.join(labels)}) at lengths {lengths}: up to {max(lengths)} "
                          f"tokens per document per model{', plus passkey prompts' if settings.passkey else ''}")

    def passes(self, step: Step, params: dict[str, Any], shape: ModelView, base: ModelView) -> list[Pass]:
        """`evaluate`'s passes (`forward_lengths`) on each model, every document taken as long enough for the
        longest length (the data is not read before the run): `max_docs` documents per data source, or one."""
        from ...evaluation.perplexity import forward_lengths

        settings = EvalSettings.read(params)
        options = {key: value for key, value in settings.evaluate_options().items() if key in _PRICED}
        lengths = settings.measured_lengths()
        sizes = [max(lengths)] * ((settings.max_docs or 1) * len(settings.data))
        compared = [dict(base.config)] if settings.compare_base else []
        for _, patcher in settings.baseline_patchers():  # patched from the input in memory
            shaped = patcher.shape_plan(base)
            compared += [dict(shaped.config)] if shaped is not None else []
        passes = [Pass(tokens, dict(shape.config)) for tokens in forward_lengths(shape.config, sizes, **options)]
        options["passkey"] = options.get("passkey", False) and settings.passkey_compared
        return passes + [Pass(tokens, config) for config in compared
                         for tokens in forward_lengths(config, sizes, **options)]

    def describe(self, step: Step, params: dict[str, Any]) -> str:
        settings = EvalSettings.read(params)
        return (f"{', '.join(settings.labels())} on {', '.join(settings.data)} at lengths "
                f"{settings.measured_lengths()}" + (", plus passkey" if settings.passkey else "")
                + (f", plus chat on {', '.join(settings.chat)}" if settings.chat else ""))

    def run(self, step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
        """eval.json and eval.md (every model), card-eval.json (what a card reads) and the plot in `directory`."""
        from ...evaluation.documents import load_documents
        from ...evaluation.perplexity import evaluate
        from ...evaluation.report import EvalResult
        from ...publishing.card import evaluation_summary

        settings = EvalSettings.read(params)
        data = list(settings.data)
        documents = load_documents(data, max_docs=settings.max_docs)
        options = settings.evaluate_options()
        if settings.chat:
            from ...evaluation.conversations import load_conversations

            options["chat"] = load_conversations(settings.chat)
        directory.mkdir(parents=True)
        results = _alternatives(settings, state.base, documents, options)
        model, tokenizer = _loadable(state.model, options)
        results.append(evaluate(model, documents, tokenizer=tokenizer, name=settings.labels()[-1], **options))
        result = EvalResult.merge(results)
        result.to_json(directory / "eval.json")
        (directory / "eval.md").write_text(result.to_markdown())
        summary = evaluation_summary(result, ", ".join([*data, *settings.chat]))
        (directory / "card-eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_path = str(result.plot(directory / "perplexity.png")) if settings.plot else None
        return StepOutcome({"output": str(directory), **_headline(summary)},
                           eval_results=str(directory / "card-eval.json"), plot=plot_path)


def _alternatives(settings: EvalSettings, base: str, documents: list[Any], options: dict[str, Any]) -> list[Any]:
    """The columns before the step's model: the recipe's input (`compare_base`) and each baseline patched from it
    in memory."""
    from ...evaluation.perplexity import evaluate
    from ...plan import apply_to_model

    results = []
    options = options | ({"passkey": False} if not settings.passkey_compared else {})
    if settings.compare_base or settings.baselines:
        model, tokenizer = _loadable(base, options)
        if settings.baselines and _spread(model):
            raise EvaluationError(
                "baselines are patched from the base model in memory, which needs it whole on one device, but it "
                "was spread over devices or disk (it does not fit, or device_map/max_memory say so); evaluate each "
                "baseline as a patch step and an eval step of its own, or drop device_map/max_memory.")
        if settings.compare_base:
            results.append(evaluate(model, documents, tokenizer=tokenizer, name="before", **options))
        for label, patcher in settings.baseline_patchers():
            alternative = apply_to_model(model, [patcher])
            results.append(evaluate(alternative, documents, tokenizer=tokenizer, name=label, **options))
            del alternative
        del model
    return results


def _loadable(path: str, options: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model directory, or an adapter directory (merged onto its base in memory), with its tokenizer, placed as
    the step's dtype, device_map, max_memory and offload_folder say (`load_model`)."""
    from ...evaluation.perplexity import load_model
    from ...modeling.placement import place_loaded

    placement = {key: options.get(key) for key in ("device_map", "max_memory", "offload_folder")}
    if (Path(path) / "adapter_config.json").is_file():
        from transformers import AutoTokenizer

        from ...training.lora import load_merged_adapter

        model = place_loaded(load_merged_adapter(path, options.get("dtype")), **placement)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    return load_model(path, dtype=options.get("dtype"), **placement)


def _spread(model: PreTrainedModel) -> bool:
    """Whether accelerate placed the model over several devices or disk (its state dict then holds meta tensors)."""
    places = {str(place) for place in (getattr(model, "hf_device_map", None) or {}).values()}
    return len(places) > 1 or "disk" in places


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """`${steps.eval.perplexity}`: the evaluated model's perplexity at its longest length."""
    table = summary["perplexity"].get(summary["model"]) or {}
    if not table:
        return {}
    longest = max(table, key=int)
    return {"perplexity": table[longest], "length": int(longest)}
