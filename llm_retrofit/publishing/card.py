"""Model cards: the README.md of a rewritten checkpoint or adapter, rendered from the templates in `templates/`.

Everything a card says is read from the directory: the patch history in config.json (`retrofit_history`), or the
adapter's adapter_config.json; the recipe (`retrofit_recipe.yaml`) if one is there; the evaluation results and plot
passed in. The YAML metadata is built with huggingface_hub's `ModelCardData`, so it has the field names and layout the
Hub indexes (`base_model`, `base_model_relation`, `model-index`...), and the finished card is parsed back with
`ModelCard` and checked before it is written.

A card remembers what it was made from in an HTML comment at its end (invisible on the Hub): a hash of the state it
describes (the config; for an adapter also its weights), the repo id, the base model given, the evaluation and the
plot. Rendering again (`retrofit card DIR`, or `retrofit push` to another repo id) keeps them while that state is
unchanged, and drops them, with a warning, once the model has been patched further or the card was copied from the
source model: results of other weights must not be shown as this model's. (A checkpoint retrained outside
llm-retrofit with config.json left as it was is not noticed.)

The evaluation results file (written by `retrofit eval`, or by hand) is JSON of this shape; every key is optional
but at least one of `perplexity`, `passkey` and `chat` must be there:

    {
      "model": "smollm2-yarn",                          # which column is this model; default: the last one
      "dataset": {"name": "PG-19 test", "type": "pg19"},  # what the perplexity was measured on
      "perplexity": {"smollm2": {"2048": 9.1, "8192": 41.7}, "smollm2-yarn": {"2048": 9.3, "8192": 10.2}},
      "passkey":    {"smollm2": {"2048": 1.0, "8192": 0.0},  "smollm2-yarn": {"2048": 1.0, "8192": 0.9}},
      "chat":       {"smollm2": 72.9, "smollm2-yarn": 73.4}   # assistant-token perplexity of held-out conversations
    }

Perplexity and passkey map a model label to {context length in tokens: value}; passkey values are retrieval accuracy
in [0, 1]. The card shows one table per measure (rows: lengths, columns: models) and puts this model's numbers in the
`model-index` metadata. Several such files (evaluations on several data sets, as the long-context recipe makes: its
training domain and another one) give a section each, in the order given.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from xxhash import xxh3_64

from .._version import __version__
from ..io.checkpoint import Checkpoint, SafetensorsFile, load_checkpoint
from ..io.commit import replace_file
from ..errors import CheckpointError, PublishError
from .lineage import CARD_FILE, REPO_ID, card_metadata, describe_source, license_of
from .patch_notes import base_model_relation, limitation, patch_info, record_note
from .serving import markdown_table, serve_check
from ..io.provenance import HISTORY_KEY

if TYPE_CHECKING:
    import jinja2
    from huggingface_hub import ModelCardData

    from ..evaluation.report import EvalResult

log = logging.getLogger(__name__)

RECIPE_FILE = "retrofit_recipe.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TAG = "llm-retrofit"
TEMPLATES = Path(__file__).parent / "templates"
_STATE = re.compile(r"<!-- llm-retrofit-card (\{.*?\}) -->", re.S)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RELATIONS = ("adapter", "merge", "quantized", "finetune")
GENERIC_DATASET = "long-documents"
"""The dataset type of results that name no type of their own (ours): the card's model-index types them by their
name instead, so that each data set is a result of its own."""


EvalSource = str | os.PathLike[str] | Mapping[str, Any]


@dataclass(frozen=True)
class Evaluation:
    """Evaluation results for the card: the tables, and which column is this model."""

    perplexity: dict[str, dict[int, float]]
    passkey: dict[str, dict[int, float]]
    model: str
    dataset_name: str
    dataset_type: str
    chat: dict[str, float] = field(default_factory=dict)  # model label -> held-out assistant-token perplexity

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": {"name": self.dataset_name, "type": self.dataset_type},
            "perplexity": {m: {str(k): v for k, v in row.items()} for m, row in self.perplexity.items()},
            "passkey": {m: {str(k): v for k, v in row.items()} for m, row in self.passkey.items()},
            **({"chat": dict(self.chat)} if self.chat else {}),
        }


def load_evaluation(source: str | os.PathLike[str] | Mapping[str, Any]) -> Evaluation:
    """Read evaluation results (a JSON file, or the parsed dict) of the shape in this module's docstring."""
    where = "the evaluation results"
    if not isinstance(source, Mapping):
        where = str(source)
        try:
            source = json.loads(Path(source).expanduser().read_text())
        except FileNotFoundError:
            raise PublishError(f"{where} does not exist; pass the JSON file `retrofit eval` wrote.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PublishError(f"{where} is not JSON ({e}); pass the file `retrofit eval` wrote.") from None
    if not isinstance(source, Mapping):
        raise PublishError(f"{where} must hold a JSON object with 'perplexity' and/or 'passkey'.")
    if "models" in source and "settings" in source:  # the file `retrofit eval --json` writes
        source = _from_eval_result(source)
    tables = {key: _table(source.get(key), key, where) for key in ("perplexity", "passkey")}
    chat = _chat_table(source.get("chat"), where)
    if not any(tables.values()) and not chat:
        raise PublishError(f"{where} has no results: expected 'perplexity' and/or 'passkey', each mapping a model "
                           'name to {context length: value}, e.g. {"perplexity": {"my-model": {"4096": 7.9}}}, or '
                           "'chat', mapping a model name to its assistant-token perplexity.")
    labels = list(dict.fromkeys([*(label for table in tables.values() for label in table), *chat]))
    model = source.get("model", labels[-1])
    if model not in labels:
        raise PublishError(f"{where}: 'model' is {model!r}, which has no results; use one of {', '.join(labels)}.")
    dataset = source.get("dataset") or {}
    if not isinstance(dataset, Mapping):
        raise PublishError(f"{where}: 'dataset' must be an object like {{\"name\": \"PG-19\", \"type\": \"pg19\"}}.")
    return Evaluation(
        perplexity=tables["perplexity"],
        passkey=tables["passkey"],
        model=str(model),
        dataset_name=str(dataset.get("name", "long documents")),
        dataset_type=str(dataset.get("type", GENERIC_DATASET)),
        chat=chat,
    )


def _from_eval_result(data: Mapping[str, Any]) -> dict[str, Any]:
    """`retrofit eval --json` output -> the tables above."""
    from ..evaluation.report import EvalResult

    return evaluation_summary(EvalResult.from_dict(dict(data)))


def evaluation_summary(result: EvalResult, dataset: str | None = None) -> dict[str, Any]:
    """An evaluation in the shape of this module's docstring (what `load_evaluation` reads): {model: {length: value}}
    per measure, passkey as accuracy per length (the mean over depths). `dataset` names what was measured (default:
    the result's data sources). A length without a perplexity (no document was that long) is left out, as a card
    table shows no number for it."""
    perplexity = {m.name: {str(r.length): r.perplexity for r in m.perplexity if r.perplexity is not None}
                  for m in result.models}
    passkey = {m.name: {str(n): a for n, a in m.passkey_by_length().items()} for m in result.models if m.passkey}
    chat = {m.name: m.chat["perplexity"] for m in result.models if m.chat}
    name = dataset or ", ".join(map(str, result.settings.get("data", []))) or "long documents"
    summary: dict[str, Any] = {"model": result.models[-1].name, "dataset": {"name": name, "type": GENERIC_DATASET},
                               "perplexity": perplexity}
    if passkey:
        summary["passkey"] = passkey
    if chat:
        summary["chat"] = chat
    return summary


def _chat_table(raw: Any, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in raw.values()):
        raise PublishError(f"{where}: 'chat' must map a model name to its assistant-token perplexity, e.g. "
                           '{"chat": {"my-model": 12.5}}.')
    return {str(label): float(value) for label, value in raw.items()}


def _table(raw: Any, key: str, where: str) -> dict[str, dict[int, float]]:
    if raw is None:
        return {}
    example = f'{{"{key}": {{"my-model": {{"4096": 7.9}}}}}}'
    if not isinstance(raw, Mapping):
        raise PublishError(f"{where}: '{key}' must map a model name to {{context length: value}}, e.g. {example}.")
    table: dict[str, dict[int, float]] = {}
    for label, row in raw.items():
        if not isinstance(row, Mapping):
            raise PublishError(f"{where}: '{key}' of {label!r} must be {{context length: value}}, e.g. {example}.")
        try:
            table[str(label)] = {int(length): float(value) for length, value in row.items()}
        except (TypeError, ValueError):
            raise PublishError(
                f"{where}: '{key}' of {label!r} has a length or value that is not a number ({dict(row)}); "
                f"expected e.g. {example}."
            ) from None
    return table


# ------------------------------------------------------------------------------------------- the directory read


@dataclass
class ModelDirectory:
    """A checkpoint or peft adapter directory, as far as cards and uploads need to know it."""

    path: Path
    is_adapter: bool
    config: dict[str, Any]  # config.json, or adapter_config.json for an adapter
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.config.get(HISTORY_KEY, []))

    @cached_property
    def state_hash(self) -> str:
        """Identifies the state of the model a card describes.

        For a checkpoint, its config: every patch changes it (at least its history), and hashing the weights of a
        large model would cost minutes. An adapter is retrained under the same config, so its (small) weights count.
        """
        digest = xxh3_64(json.dumps(self.config, sort_keys=True).encode())
        if self.is_adapter:
            for name in ADAPTER_WEIGHTS:
                if (self.path / name).is_file():
                    digest.update((self.path / name).read_bytes())
        return digest.hexdigest()

    def missing(self) -> list[str]:
        """What a complete upload would lack: required tensors, or the adapter's weights."""
        if self.is_adapter:
            return [] if any((self.path / name).is_file() for name in ADAPTER_WEIGHTS) else list(ADAPTER_WEIGHTS[:1])
        assert self.checkpoint is not None
        return self.checkpoint.missing_tensors()


def open_model_directory(path: str | os.PathLike[str]) -> ModelDirectory:
    """Read a local checkpoint directory (config.json + weights) or peft adapter directory (adapter_config.json)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PublishError(f"{directory} is not a directory; pass a checkpoint or adapter directory on this machine.")
    adapter_config = directory / ADAPTER_CONFIG
    if adapter_config.is_file():
        try:
            config = json.loads(adapter_config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{adapter_config} is not valid JSON ({e}); save the adapter again.") from None
        if not isinstance(config, dict) or "peft_type" not in config:
            raise CheckpointError(f"{adapter_config} has no 'peft_type'; save the adapter again with peft.")
        if (directory / ADAPTER_WEIGHTS[0]).is_file():
            SafetensorsFile(directory / ADAPTER_WEIGHTS[0])  # a corrupt or truncated file fails here, with its fix
        return ModelDirectory(directory.resolve(), True, config)
    checkpoint = load_checkpoint(directory)
    return ModelDirectory(checkpoint.path, False, checkpoint.config, checkpoint)


@dataclass(frozen=True)
class ExistingCard:
    """The README.md already in the directory: whether llm-retrofit wrote it, and what it was made from."""

    exists: bool
    ours: bool
    metadata: dict[str, Any]
    state: dict[str, Any]


def read_existing_card(directory: Path) -> ExistingCard:
    readme = directory / CARD_FILE
    if not readme.is_file():
        return ExistingCard(False, False, {}, {})
    metadata = card_metadata(readme)
    match = _STATE.search(readme.read_text(encoding="utf-8", errors="replace"))
    state: dict[str, Any] = {}
    if match:
        try:
            state = json.loads(match.group(1))
        except json.JSONDecodeError:
            state = {}
    ours = TAG in (metadata.get("tags") or []) and bool(state)
    return ExistingCard(True, ours, metadata, state)


# --------------------------------------------------------------------------------------------------- rendering


def render_card(
    path: str | os.PathLike[str],
    *,
    eval_results: EvalSource | list[EvalSource] | None = None,
    plot: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    name: str | None = None,
) -> Path:
    """Write (or refresh) the README.md model card of a checkpoint or adapter directory; returns its path.

    `eval_results` is a JSON file (or dict) of the shape in this module's docstring, or a list of them (one section
    each); `plot` a PNG, or a list of them, copied beside the card and embedded. `repo_id` is where the model is (or will be) on the Hub, for the loading snippet; `base_model`
    overrides the base model's repo id when the history names only a local path. What is not given is carried over
    from the card already there if llm-retrofit wrote it for this same state of the model (see the module docstring);
    a card of another state lends only its license. `name` is the model's name in the title and the model-index
    (default: the repo's name, else the one the card already gives, else the directory's). The file is rewritten
    only if its content changes.
    """
    model = open_model_directory(path)
    content = card_content(model, eval_results=eval_results, plot=plot, repo_id=repo_id, base_model=base_model,
                           name=name)
    readme = model.path / CARD_FILE
    if not readme.is_file() or readme.read_text(encoding="utf-8", errors="replace") != content:
        replace_file(readme, content)  # the README of a patched copy may be the source's, hard-linked
        log.info("wrote %s", readme)
    return readme


def card_content(
    model: ModelDirectory,
    *,
    eval_results: EvalSource | list[EvalSource] | None = None,
    plot: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    name: str | None = None,
) -> str:
    """The text of the card (see `render_card`); copies the plot into the directory, writes nothing else."""
    from huggingface_hub import ModelCard

    existing = read_existing_card(model.path)
    previous = existing.state if existing.ours else {}
    # A card made for another state of the model (patched since, or copied from the source by `retrofit patch`)
    # lends nothing but its license: its evaluation, repo id and base model may belong to another model.
    carried = previous if previous.get("state_xxh3") == model.state_hash else {}
    if previous and not carried and _carried_evaluations(previous) and eval_results is None:
        log.warning("the evaluation in %s describes another state of the model; it is left out: evaluate this "
                    "model and pass the results", model.path / CARD_FILE)
    repo_id = repo_id or carried.get("repo_id")
    base_override = base_model or carried.get("base_model")
    if base_override and not REPO_ID.match(base_override):
        raise PublishError(f"base model {base_override!r} is not a Hub repo id (owner/name); pass the id of the model "
                           "this one was made from.")
    if repo_id and not re.match(r"^([A-Za-z0-9][\w.-]*/)?[\w.-]+$", repo_id):
        raise PublishError(f"{repo_id!r} is not a Hub repo id; pass owner/name.")
    evaluations = [load_evaluation(e) for e in _as_list(eval_results)] if eval_results is not None else [
        load_evaluation(e) for e in _carried_evaluations(carried)
    ]
    plots = _place_plots(model.path, _as_list(plot)) if plot is not None else [
        plot_name for plot_name in _carried_plots(carried) if (model.path / plot_name).is_file()
    ]
    name = name or (repo_id.split("/")[-1] if repo_id else carried.get("name")) or model.path.name
    facts = _facts(model, existing, repo_id, base_override) | {"name": name}
    data = _card_data(facts, evaluations)
    state = {
        "state_xxh3": model.state_hash,
        "repo_id": repo_id,
        "name": name,
        "base_model": base_override,
        "evaluations": [e.to_json() for e in evaluations],
        "plots": plots,
    }
    sections = [{"evaluation": e, "tables": _tables(e)} for e in evaluations]
    body = _environment().get_template("README.md.j2").render(
        **facts, evaluations=sections, plots=plots, state=_comment_json(state)
    )
    try:
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")  # parses the YAML and the model-index back
    except ValueError as e:
        raise PublishError(f"the model card of {model.path} does not parse back ({e}); please report this.") from None
    validate_card(card, adapter=model.is_adapter)
    return str(card)


def _facts(
    model: ModelDirectory, existing: ExistingCard, repo_id: str | None, base_override: str | None
) -> dict[str, Any]:
    """Everything the template and the metadata need, from the directory alone."""
    history = model.history
    if model.is_adapter:
        source = describe_source(model.config.get("base_model_name_or_path"))
        patches = [_adapter_patch(model.config)]
    else:
        source = describe_source(_base_source(history))
        patches = [_history_patch(record) for record in history]
    relation = base_model_relation({str(record.get("patch")) for record in history}, model.is_adapter)
    base = base_override or source.repo_id
    license_ = license_of(existing.metadata) or source.license
    files = {p.name for p in model.path.iterdir()}
    recipe = model.path / RECIPE_FILE
    return {
        "load_id": repo_id or model.path.name,
        "is_adapter": model.is_adapter,
        "base_model": base,
        "relation": relation if base else None,
        "source": _source_label(source.name),
        "license": license_,
        "patches": patches,
        "tags": list(dict.fromkeys([TAG, *(p["name"] for p in patches)])),
        "model": _model_facts(model),
        "recipe": recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
        "recipe_file": RECIPE_FILE,
        "trust_remote_code": "auto_map" in model.config,
        "serving": None if model.is_adapter else markdown_table(serve_check(model.config)),
        "has_tokenizer": bool(files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}),
        "limitations": _limitations(patches),
        "versions": _versions(model, history),
    }


def _base_source(history: list[dict[str, Any]]) -> str | None:
    """The source that names the base model: the latest Hub repo id the model was loaded from (its parent in the
    Hub's model tree), else the first record's source (a local path, GGUF file or cache directory, read for hints)."""
    for record in reversed(history):
        source = str(record.get("source") or "")
        if REPO_ID.match(source) and not Path(source).expanduser().exists():
            return source
    return history[0].get("source") if history else None


def _source_label(source: str | None) -> str | None:
    """A repo id as it is; a local path by its last component (the card is public, the home directory is not)."""
    if not source or (REPO_ID.match(source) and not Path(source).expanduser().exists()):
        return source
    return Path(source).name


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _carried_evaluations(state: Mapping[str, Any]) -> list[Any]:
    """The evaluations a card's state remembers (cards written by llm-retrofit 0.1.0 remembered one, as `evaluation`)."""
    return list(state.get("evaluations") or ([state["evaluation"]] if state.get("evaluation") else []))


def _carried_plots(state: Mapping[str, Any]) -> list[str]:
    return list(state.get("plots") or ([state["plot"]] if state.get("plot") else []))


def _tables(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Markdown tables, one per measure: a row per context length, a column per model."""
    measures = [
        ("Perplexity by context length (lower is better)", evaluation.perplexity, lambda v: f"{v:.2f}"),
        ("Passkey retrieval accuracy by context length", evaluation.passkey, lambda v: f"{v:.0%}"),
    ]
    tables = []
    for title, table, show in measures:
        if not table:
            continue
        columns = list(table)
        lengths = sorted({length for row in table.values() for length in row})
        lines = [
            "| context length | " + " | ".join(_cell(c) for c in columns) + " |",
            "|---:|" + "---:|" * len(columns),
        ]
        for length in lengths:
            cells = [show(table[c][length]) if length in table[c] else "–" for c in columns]
            lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
        tables.append({"title": title, "lines": lines})
    if evaluation.chat:
        columns = list(evaluation.chat)
        tables.append({"title": "Chat perplexity on held-out conversations (assistant tokens, lower is better)",
                       "lines": ["| | " + " | ".join(_cell(c) for c in columns) + " |", "|---|" + "---:|" * len(columns),
                                 "| perplexity | " + " | ".join(f"{evaluation.chat[c]:.2f}" for c in columns) + " |"]})
    return tables


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _history_patch(record: Mapping[str, Any]) -> dict[str, Any]:
    name = str(record.get("patch", "?"))
    params = {k: v for k, v in (record.get("params") or {}).items() if v is not None}
    entry = _patch_entry(name, params)
    note = record_note(dict(record))  # facts of this record (a pooling's KV-cache saving) after the explanation
    if note:
        entry["info"] = replace(entry["info"], explanation=f"{entry['info'].explanation} {note}")
    return entry


def _adapter_patch(config: Mapping[str, Any]) -> dict[str, Any]:
    name = str(config["peft_type"]).lower()
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_dora", "use_rslora")
    params = {k: config[k] for k in keys if config.get(k) not in (None, False, [])}
    if isinstance(params.get("target_modules"), list):
        params["target_modules"] = sorted(params["target_modules"])
    return _patch_entry(name, params)


def _patch_entry(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "params": params, "info": patch_info(name)}


def _model_facts(model: ModelDirectory) -> dict[str, Any]:
    if model.is_adapter or model.checkpoint is None:
        return {}
    from ..evaluation.gates import checkpoint_gates, histogram_lines
    from ..io.inspect import describe

    facts = describe(model.checkpoint)
    return {
        "architecture": facts["architecture"],
        "parameters": facts["parameters"],
        "layers": facts["layers"],
        "heads": f"{facts['attention_heads']} attention, {facts['kv_heads']} key/value",
        "context_length": facts["context_length"],
        "rope_parameters": facts["rope_parameters"],
        "sliding_window": facts["sliding_window"],
        "dtype": ", ".join(facts["dtype"]),
        "memory_gates": histogram_lines(gates) if (gates := checkpoint_gates(model.checkpoint)) else None,
    }


def _limitations(patches: list[dict[str, Any]]) -> list[str]:
    lines = [limitation(p["name"], p["params"]) for p in patches]
    return list(dict.fromkeys(line for line in lines if line))


def _versions(model: ModelDirectory, history: list[dict[str, Any]]) -> list[str]:
    lines = []
    for record in history:
        versions = record.get("versions") or {}
        line = ", ".join(f"{k} {v}" for k, v in versions.items())
        if line:
            lines.append(f"`{record.get('patch', '?')}` applied with {line}")
    if model.is_adapter and model.config.get("peft_version"):
        lines.append(f"adapter saved with peft {model.config['peft_version']}")
    lines.append(f"card written by llm_retrofit {__version__} with huggingface_hub {version('huggingface_hub')}")
    return lines


def _card_data(facts: dict[str, Any], evaluations: list[Evaluation]) -> ModelCardData:
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    types = _DatasetTypes()
    for evaluation in evaluations:
        documents = types.of(evaluation.dataset_name, evaluation.dataset_type)
        for length, value in sorted(evaluation.perplexity.get(evaluation.model, {}).items()):
            results.append(EvalResult(
                task_type="text-generation", task_name="Long-context language modeling",
                dataset_type=documents, dataset_name=evaluation.dataset_name,
                metric_type="perplexity", metric_name=f"Perplexity at {length} tokens", metric_value=value,
                metric_config=f"context_length={length}",
            ))
        passkey = types.of(f"passkey after {evaluation.dataset_name}", "passkey")
        for length, value in sorted(evaluation.passkey.get(evaluation.model, {}).items()):
            results.append(EvalResult(
                task_type="text-generation", task_name="Passkey retrieval",
                dataset_type=passkey, dataset_name="Passkey retrieval (synthetic)",
                metric_type="accuracy", metric_name=f"Passkey accuracy at {length} tokens", metric_value=value,
                metric_config=f"context_length={length}",
            ))
        if evaluation.model in evaluation.chat:
            results.append(EvalResult(
                task_type="text-generation", task_name="Chat (assistant tokens of held-out conversations)",
                dataset_type=types.of(f"chat on {evaluation.dataset_name}", "chat"),
                dataset_name=evaluation.dataset_name, metric_type="perplexity",
                metric_name="Assistant-token perplexity", metric_value=evaluation.chat[evaluation.model],
            ))
    extra: dict[str, Any] = {}
    if facts["base_model"]:
        extra["base_model_relation"] = facts["relation"]
    return ModelCardData(
        base_model=facts["base_model"],
        library_name="peft" if facts["is_adapter"] else "transformers",
        pipeline_tag="text-generation",
        tags=facts["tags"],
        eval_results=results or None,
        model_name=facts["name"] if results else None,
        **facts["license"],
        **extra,
    )


class _DatasetTypes:
    """The `dataset.type` of each result of the model-index, one per data set.

    The Hub (huggingface_hub's `eval_results_to_model_index`) puts every result of one task and dataset type in one
    entry, under the name of the first: two evaluations typed alike (ours, `long-documents`) would show the second
    data set's numbers as the first's. So results of our generic type are typed by their data set's name, and a type
    another data set already took gets a number."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}

    def of(self, owner: str, given: str) -> str:
        base = _slug(owner) if given == GENERIC_DATASET else given
        candidate, number = base, 1
        while self.owners.setdefault(candidate, owner) != owner:
            number += 1
            candidate = f"{base}-{number}"
        return candidate


def _slug(text: str) -> str:
    """`bundled:python-docs[:1]` -> `bundled-python-docs-1`: a dataset type of letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or GENERIC_DATASET


def _place_plots(directory: Path, plots: list[str | os.PathLike[str]]) -> list[str]:
    """Copy the plots beside the card; two of one name (each eval step writes perplexity.png) are told apart by the
    name of their folder (03-eval-perplexity.png), so that neither overwrites the other."""
    names = [Path(p).name for p in plots]
    return [_place_plot(directory, p, f"{Path(p).parent.name}-{name}" if names.count(name) > 1 else name)
            for p, name in zip(plots, names)]


def _place_plot(directory: Path, plot: str | os.PathLike[str], name: str) -> str:
    """Copy the plot beside the card as `name` (it is uploaded with the model and embedded by a relative link).

    The copy replaces a plot of that name rather than writing into it: the one there may be a hard link to the
    source model's plot, which must keep showing the source model.
    """
    source = Path(plot).expanduser()
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PublishError(f"cannot read the plot {source}: {e.strerror}; pass an existing PNG file.") from None
    if not data.startswith(_PNG_SIGNATURE):
        raise PublishError(f"{source} is not a PNG image; pass the PNG plot `retrofit eval` wrote.")
    target = directory / name
    if not (target.exists() and os.path.samefile(target, source)):  # the same file is already in place
        replace_file(target, data)
    return name


def _comment_json(state: dict[str, Any]) -> str:
    """JSON safe inside an HTML comment (no `>`, so no `-->`)."""
    return json.dumps(state, sort_keys=True).replace(">", "\\u003e")


def _environment() -> jinja2.Environment:
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,  # a misspelt variable is a bug, not an empty string in someone's card
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Markdown, not HTML; values go through the `cell` and `code` filters where needed
    )
    environment.filters["cell"] = _cell
    environment.filters["code"] = _inline_code
    environment.filters["fence"] = lambda text: "`" * max(3, _longest_backtick_run(text) + 1)
    environment.filters["pyrepr"] = lambda value: json.dumps(value)
    environment.filters["urlquote"] = quote
    environment.filters["params"] = lambda params: ", ".join(
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()
    )
    return environment


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _inline_code(value: Any) -> str:
    text = str(value)
    ticks = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


# -------------------------------------------------------------------------------------------------- validation


def validate_card(card: Any, *, adapter: bool) -> None:
    """Check a parsed `ModelCard` the way the Hub will, before anything is written or uploaded.

    Raises PublishError naming the field and the fix. The Hub checks the same metadata again when the card is
    committed (`/api/validate-yaml`).
    """
    data = card.data.to_dict()
    problems = []
    base = data.get("base_model")
    relation = data.get("base_model_relation")
    for item in [base] if isinstance(base, str) else base or []:
        if not (isinstance(item, str) and REPO_ID.match(item)):
            problems.append(f"base_model {item!r} is not a Hub repo id (owner/name)")
    if relation is not None and relation not in RELATIONS:
        problems.append(f"base_model_relation {relation!r} is not one of {', '.join(RELATIONS)}")
    if relation is not None and not base:
        problems.append("base_model_relation is set but base_model is not")
    if base and relation is None:
        problems.append("base_model is set without base_model_relation")
    expected_library = "peft" if adapter else "transformers"
    if data.get("library_name") != expected_library:
        problems.append(f"library_name is {data.get('library_name')!r}, expected {expected_library!r}")
    if TAG not in (data.get("tags") or []):
        problems.append(f"the tags lack {TAG!r}")
    if data.get("pipeline_tag") != "text-generation":
        problems.append(f"pipeline_tag is {data.get('pipeline_tag')!r}, expected 'text-generation'")
    if problems:
        raise PublishError(
            f"the model card is not valid: {'; '.join(problems)}. Run `retrofit card DIR` to write a fresh one."
        )
