"""The one mechanism every patcher uses: a tensor plan, and the two executors that run plans (`apply_to_checkpoint`
and `apply_to_model`).

A patcher looks at a `ModelView` (config + the dtype and shape of every tensor, no data) and returns a `TensorPlan`:
the new config, and for each output tensor the input tensors it needs and a function that computes it (or nothing,
for a tensor passed through unchanged). Plans compose, so `--patch a --patch b` is one plan and one pass over the
weights.

- `apply_to_checkpoint` streams a plan over a checkpoint on disk, one tensor at a time, into a new directory or in
  place (atomically, see `commit`). Unchanged tensors are copied byte for byte without decoding; a plan that changes
  only the config hard-links the weight files instead of rewriting them.
- `apply_to_model` runs the same plan over a loaded model's state dict and rebuilds the model from the new config.

A patch that is runtime behaviour rather than weights (an attention pattern, a memory) also puts into its plan the
files to ship with the checkpoint (a self-contained modeling file that config.json's `auto_map` names) and a hook that
installs the behaviour on a live model; see `TensorPlan.files` and `TensorPlan.installs`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .architectures import Architecture, architecture_of
from .io.checkpoint import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    WEIGHT_FILE,
    Checkpoint,
    SafetensorsFile,
    TensorMeta,
    decode,
    raw_bytes,
    refuse_incomplete_output,
)
from .io.engine_config import MIRROR_KEYS, without_rope_mirrors, write_config
from .io.commit import crash_test_point, link_or_copy, staged_directory
from .io.progress import Progress, quiet_libraries
from .errors import OutputError, PatchError
from .io.provenance import HISTORY_KEY, Fingerprinter, WeightFiles, make_records, with_stamp
from .io.writer import DEFAULT_MAX_SHARD_SIZE, SafetensorsWriter, layout_shards, parse_size, write_index

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

Compute = Callable[..., torch.Tensor]
Install = Callable[["PreTrainedModel"], "PreTrainedModel"]


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: computed by `compute(*inputs)`, or, without `compute`, the single input unchanged."""

    meta: TensorMeta
    inputs: tuple[str, ...]
    compute: Compute | None = None

    @property
    def is_copy(self) -> bool:
        return self.compute is None

    def run(self, read: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
        tensor = self.compute(*map(read, self.inputs)) if self.compute else read(self.inputs[0])
        if tensor.dtype != self.meta.dtype or tuple(tensor.shape) != self.meta.shape:
            raise PatchError(
                f"internal error: {name} came out {tensor.dtype} {tuple(tensor.shape)} but its plan promised "
                f"{self.meta.dtype} {self.meta.shape}; please report this."
            )
        return tensor


@dataclass(frozen=True)
class _Chained:
    """`outer` applied to the outputs of earlier tasks, each fed its own slice of the flat input list."""

    outer: Compute
    earlier: tuple[TensorTask, ...]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        args, start = [], 0
        for task in self.earlier:
            own = tensors[start : start + len(task.inputs)]
            start += len(task.inputs)
            args.append(task.compute(*own) if task.compute else own[0])
        return self.outer(*args)


@dataclass(frozen=True)
class ModelView:
    """What a patcher may look at: the config and every tensor's dtype and shape (never the data).

    `origin` is what the weights can be run from, for the few patches that need activations (a MoE router from
    hidden states, a LongRoPE search): the checkpoint directory or the loaded model. `modeling.activations` loads and
    runs it; the executors never do. Only the first patch of a chain gets one: later patches see a model that
    exists only as a plan.
    """

    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    origin: Path | PreTrainedModel | None = None

    @cached_property
    def architecture(self) -> Architecture:
        return architecture_of(self.config)

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.config.get(HISTORY_KEY, []))


@dataclass
class TensorPlan:
    config: dict[str, Any]
    tensors: dict[str, TensorTask]
    notes: dict[str, Any] = field(default_factory=dict)
    """Facts a patcher wants in its provenance record (e.g. which layers are new), beside its parameters."""
    applied: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(patch name, params + notes) of every patch this plan contains, in order: the history records to write."""
    files: dict[str, str] = field(default_factory=dict)
    """Files shipped with the checkpoint (name -> text), such as the modeling file `auto_map` names: written inside
    the staged directory, so the atomic commit covers them."""
    installs: list[Install] = field(default_factory=list)
    """What `apply_to_model` runs on the rebuilt model to give it the behaviour the shipped files and config keys give a
    checkpoint (an attention kernel, the classes `auto_map` names), in patch order."""

    @classmethod
    def identity(cls, view: ModelView) -> TensorPlan:
        return cls(dict(view.config), {name: TensorTask(meta, (name,)) for name, meta in view.tensors.items()})

    @property
    def view(self) -> ModelView:
        return ModelView(self.config, {name: task.meta for name, task in self.tensors.items()})

    def then(self, later: TensorPlan) -> TensorPlan:
        """This plan followed by `later` (whose inputs name this plan's outputs), as one plan over our inputs."""
        tensors = {}
        for name, task in later.tensors.items():
            earlier = tuple(self.tensors[i] for i in task.inputs)
            if task.is_copy:
                tensors[name] = earlier[0]
            else:
                inputs = tuple(i for e in earlier for i in e.inputs)
                tensors[name] = TensorTask(task.meta, inputs, _Chained(task.compute, earlier))  # type: ignore[arg-type]
        _refuse_conflicts(self, later)
        files = {name: text for name, text in self.files.items() if name in shipped_files(later.config)}
        return TensorPlan(later.config, tensors, applied=self.applied + later.applied, files=files | later.files,
                          installs=self.installs + later.installs)

    def rewrites_weights(self, source: Mapping[str, TensorMeta]) -> bool:
        """False when every tensor passes through under its own name: only the config changes."""
        return self.tensors.keys() != source.keys() or any(
            not task.is_copy or task.inputs != (name,) for name, task in self.tensors.items()
        )


def shipped_files(config: Mapping[str, Any]) -> set[str]:
    """The files of the checkpoint that config.json's `auto_map` points into (`module.Class` -> `module.py`).

    As transformers reads a reference: `repo--module.Class` is code of another directory or Hub repo, so no file of
    this checkpoint (a `module.py` beside it is not what would load); a list (a tokenizer's slow and fast classes)
    names one file per entry."""
    references = config.get("auto_map")
    if not isinstance(references, Mapping):
        return set()
    named = [ref for value in references.values() for ref in (value if isinstance(value, list) else [value])]
    return {f"{ref.rsplit('.', 1)[0]}.py" for ref in named if isinstance(ref, str) and "--" not in ref and "." in ref}


def _refuse_conflicts(earlier: TensorPlan, later: TensorPlan) -> None:
    """Two runtime patches may not both decide which class loads the model, nor ship different files of one name:
    the second would silently undo the first."""
    before, after = earlier.config.get("auto_map") or {}, later.config.get("auto_map") or {}
    # A later patch that keeps the earlier auto_map (it copied the config) or removes it on purpose is fine.
    clashing = [key for key in before if key in after and after[key] != before[key]]
    clashing += [name for name in later.files if name in earlier.files and later.files[name] != earlier.files[name]]
    if clashing and earlier.applied and later.applied:
        raise PatchError(
            f"{later.applied[0][0]} and {earlier.applied[-1][0]} both need to set {', '.join(clashing)}: they "
            "replace the attention of the model in two incompatible ways. Apply one of them."
        )


class Planner(Protocol):
    """What the executors need of a patcher. Every patcher is a `spec.Patcher`; it is described here by its shape,
    not imported, because spec.py imports this module for the types a patcher returns (no import cycle)."""

    @property
    def name(self) -> str: ...

    def plan(self, model: ModelView) -> TensorPlan: ...

    def params(self) -> dict[str, Any]: ...

    def spec(self) -> str: ...


def build_plan(source: ModelView, patchers: Sequence[Planner], force: bool = False) -> TensorPlan:
    plan = TensorPlan.identity(source)
    for patcher in patchers:
        view = source if patcher is patchers[0] else plan.view
        _refuse_repeat(view.history, patcher, force)
        step = patcher.plan(view)
        step.applied = [(patcher.name, {"params": patcher.params(), **step.notes})]
        plan = plan.then(step)
    return plan


def _refuse_repeat(history: list[dict[str, Any]], patcher: Planner, force: bool) -> None:
    if force or not history:
        return
    last = history[-1]
    if last.get("patch") == patcher.name and last.get("params") == patcher.params():
        raise PatchError(
            f"{patcher.spec()} was already applied to this model ({last.get('time')}); applying it twice is almost "
            "certainly a mistake. Pass --force (force=True) to apply it again anyway."
        )


@dataclass
class PlanSummary:
    """What a plan would do, for `--dry-run`."""

    config_changes: dict[str, tuple[Any, Any]]
    added: list[str]
    changed: list[str]
    removed: list[str]
    bytes_to_write: int
    rewrites_weights: bool

    @classmethod
    def of(cls, plan: TensorPlan, source: ModelView) -> PlanSummary:
        keys = sorted(set(plan.config) | set(source.config))
        derived = {HISTORY_KEY, *MIRROR_KEYS}  # the RoPE mirrors follow rope_parameters: not changes of their own
        config_changes = {
            key: (source.config.get(key), plan.config.get(key))
            for key in keys
            if key not in derived and source.config.get(key) != plan.config.get(key)
        }
        rewrites = plan.rewrites_weights(source.tensors)
        return cls(
            config_changes=config_changes,
            added=[name for name in plan.tensors if name not in source.tensors],
            changed=[n for n, t in plan.tensors.items() if n in source.tensors and (not t.is_copy or t.inputs != (n,))],
            removed=[name for name in source.tensors if name not in plan.tensors],
            bytes_to_write=sum(t.meta.nbytes for t in plan.tensors.values()) if rewrites else 0,
            rewrites_weights=rewrites,
        )

    def render(self, limit: int = 8) -> str:
        lines = ["config changes:" if self.config_changes else "config changes: none"]
        lines += [f"  {key}: {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in self.config_changes.items()]
        for label, names in (("added", self.added), ("changed", self.changed), ("removed", self.removed)):
            lines.append(f"tensors {label}: {len(names)}")
            lines += [f"  {name}" for name in names[:limit]]
            if len(names) > limit:
                lines.append(f"  ... and {len(names) - limit} more")
        if self.rewrites_weights:
            lines.append(f"weights to write: {self.bytes_to_write / 1e9:.3f} GB")
        else:
            lines.append("weights to write: none (config-only patch; weight files are reused)")
        return "\n".join(lines)


def _record_history(
    plan: TensorPlan, patches: Sequence[tuple[str, dict[str, Any]]], source: str, source_hash: str
) -> None:
    plan.config[HISTORY_KEY] = plan.config.get(HISTORY_KEY, []) + make_records(patches, source, source_hash)


# ----------------------------------------------------------------------------------------- apply_to_checkpoint: on disk


def apply_to_checkpoint(
    checkpoint: Checkpoint,
    patchers: Sequence[Planner],
    *,
    output: str | Path | None = None,
    in_place: bool = False,
    max_shard_size: int | str | None = None,
    force: bool = False,
    record: Sequence[tuple[str, dict[str, Any]]] | None = None,
) -> Path:
    """Run the patchers' plan over `checkpoint`, writing to `output` or, with `in_place`, over the checkpoint itself.

    `record` replaces the (name, {"params": ...}) entries written to the history (`convert` records itself).

    What else the directory holds depends on where the result goes:
    - in place, everything that is not replaced (the config, and when the weights are rewritten the weight files and
      their index) stays as it was: hidden files and folders (`.git/`, `.gitattributes`), subfolders (`original/`),
      weights in other formats, files we know nothing of, with their modes; the new files take the modes of the old.
      People patch git clones of Hub repos in place, and a rewrite must not cost them anything of theirs.
    - to a new directory, the new checkpoint gets the model's top-level files (tokenizer, generation config, chat
      template, card, license...), hard-linked, and nothing else: hidden entries belong to the source directory,
      not to the model (a `.git/` copied into a new directory is a second, wrong clone; `.cache/` of
      `hf download --local-dir` describes the source's files), and subfolders of Hub repos hold the same weights in
      other formats (`original/`, `onnx/`, `gguf/`), which would contradict the rewritten ones.
    """
    if (output is None) == (not in_place):
        raise OutputError("pass exactly one of output=DIR or in_place=True (on the command line: -o DIR or --in-place).")
    target = checkpoint.path if in_place else Path(output).expanduser()  # type: ignore[arg-type]
    if not in_place and target.resolve() == checkpoint.path:
        raise OutputError(f"the output {target} is the source itself; use --in-place to rewrite it.")
    checkpoint.require_complete()  # transformers would fill what an incomplete output lacks with random weights
    plan = build_plan(checkpoint_view(checkpoint), patchers, force)
    refuse_incomplete_output(plan.config, plan.view.tensors)
    # Files an earlier runtime patch shipped that this config no longer loads (or that this plan ships anew) must not
    # be carried into the result: a stale modeling file beside a config that no longer names it misleads readers.
    superseded = (shipped_files(checkpoint.config) - shipped_files(plan.config)) | set(plan.files)
    rewrite = plan.rewrites_weights(checkpoint.tensors) or max_shard_size is not None
    # Identified before anything is read or linked, so that the fingerprint is known to be of these files' state.
    source_weights = WeightFiles(checkpoint)
    fingerprinter = Fingerprinter(
        checkpoint.tensors, checkpoint.read_raw, known=source_weights.recorded_fingerprint(checkpoint.history)
    )

    def read(name: str) -> torch.Tensor:
        raw = checkpoint.read_raw(name)
        fingerprinter.observe(name, raw)
        return decode(raw, checkpoint.tensors[name])

    replaced = ["config.json", *sorted(superseded)]
    if rewrite:
        replaced = checkpoint.weight_files + _own_index(checkpoint) + replaced  # weights first: see staged_directory
        if in_place:
            _warn_of_other_weights(checkpoint, replaced)
    # In place, staged_directory carries over everything not replaced; to a new directory we choose what goes.
    with staged_directory(target, in_place=in_place, replaces=replaced) as staging:
        if rewrite:
            shard_bytes = parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE)
            write_weights(plan, read, staging, shard_bytes, raw_source=checkpoint.safetensors_file)
        elif not in_place:
            for file_name in checkpoint.weight_files + _index_files(checkpoint):
                link_or_copy(checkpoint.path / file_name, staging / file_name)
        if not in_place:
            for auxiliary in checkpoint.auxiliary_files():
                if auxiliary.name not in superseded:
                    link_or_copy(auxiliary, staging / auxiliary.name)
        for name, text in plan.files.items():
            (staging / name).write_text(text)
        source_hash = fingerprinter.result()
        _record_history(plan, plan.applied if record is None else record, checkpoint.source, source_hash)
        # Unless rewritten, the output's weight files are the source's (linked, or carried over in place), so the
        # next patch may reuse this hash; a stamp vouches for it (see WeightFiles).
        stamp = None if rewrite else source_weights.stamp(source_hash)
        plan.config[HISTORY_KEY] = with_stamp(plan.config[HISTORY_KEY], stamp)
        write_config(staging, plan.config)
    return target


def checkpoint_view(checkpoint: Checkpoint) -> ModelView:
    return ModelView(checkpoint.config, checkpoint.tensors, origin=checkpoint.path)


def _index_files(checkpoint: Checkpoint) -> list[str]:
    return [p.name for p in checkpoint.path.glob("*.index.json")]


def _own_index(checkpoint: Checkpoint) -> list[str]:
    """The shard index the weights were read through, if any; the index of weights in another format is not ours."""
    single, index = (SAFE_SINGLE, SAFE_INDEX) if checkpoint.is_safetensors else (BIN_SINGLE, BIN_INDEX)
    return [index] if single not in checkpoint.weight_files and (checkpoint.path / index).is_file() else []


def _warn_of_other_weights(checkpoint: Checkpoint, replaced: Sequence[str]) -> None:
    """An in-place rewrite keeps weight files it does not read (another format, a consolidated copy); say so, since
    they now disagree with the rewritten weights."""
    others = sorted(p.name for p in checkpoint.path.iterdir() if WEIGHT_FILE.match(p.name) and p.name not in replaced)
    if others:
        log.warning("kept %s in %s as they were: they are not the weights this rewrite reads, so they still hold the "
                    "old model; delete them if they are not needed", ", ".join(others), checkpoint.path)


def write_weights(
    plan: TensorPlan,
    read: Callable[[str], torch.Tensor],
    directory: Path,
    max_shard_bytes: int,
    raw_source: Callable[[str], SafetensorsFile | None] = lambda name: None,
) -> None:
    """Compute and write every tensor of `plan` into safetensors shards in `directory`, one tensor at a time.

    `raw_source(name)` may give the safetensors file holding an input, so that unchanged tensors are copied as bytes.
    """
    metas = {name: task.meta for name, task in plan.tensors.items()}
    layout = layout_shards(metas, max_shard_bytes)
    total = sum(meta.nbytes for meta in metas.values())
    with Progress(total, "writing weights", "B", unit_scale=True) as progress:
        for file_name, names in layout.items():
            with SafetensorsWriter(directory / file_name, {name: metas[name] for name in names}) as writer:
                for name in names:
                    task = plan.tensors[name]
                    source_file = raw_source(task.inputs[0]) if task.is_copy else None
                    if source_file is not None:
                        writer.copy_raw(name, source_file, task.inputs[0])
                    else:
                        writer.write(name, task.run(read, name))
                    progress.update(metas[name].nbytes)
            crash_test_point("shard-written")
    write_index(directory, layout, metas)


# --------------------------------------------------------------------------------------- apply_to_model: a loaded model


def model_view(model: PreTrainedModel) -> tuple[ModelView, dict[str, torch.Tensor]]:
    """The view of a loaded model, and its tensors, named as in its checkpoint.

    transformers 5 keeps some weights in a different layout in memory than on disk (Mixtral's experts are fused);
    `revert_weight_conversion` gives the on-disk names, so a plan means the same thing to both executors. A tied
    lm_head is not stored.
    """
    from transformers.core_model_loading import revert_weight_conversion

    state = dict(model.state_dict())
    # `model.to(torch.bfloat16)` leaves config.dtype as it was: the tensors say what the model is, not the config.
    config = {**model.config.to_dict(), "dtype": str(model.dtype).removeprefix("torch.")}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    state = revert_weight_conversion(model, state)
    view = ModelView(config, {n: TensorMeta(t.dtype, tuple(t.shape)) for n, t in state.items()}, origin=model)
    return view, state


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with no two sharing memory. A copy under a new name (an untied LM head, a duplicated layer) is its
    input itself in memory, and the rebuilt model would keep the two as one: trained together, never apart."""
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if tensor.numel() and tensor.data_ptr() in seen:
            tensors[name] = tensor.clone()
        seen.add(tensor.data_ptr())
    return tensors


def apply_to_model(model: PreTrainedModel, patchers: Sequence[Planner], *, force: bool = False) -> PreTrainedModel:
    """Run the patchers' plan over a loaded model; returns a new model (the input is left as it was)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    view, state = model_view(model)
    plan = build_plan(view, patchers, force)
    source = str(getattr(model, "name_or_path", "") or "<model in memory>")
    source_hash = Fingerprinter(view.tensors, lambda name: raw_bytes(state[name])).result()
    _record_history(plan, plan.applied, source, source_hash)
    new_state = _unshared({name: task.run(state.__getitem__, name) for name, task in plan.tensors.items()})
    # Without mirrors: a stale one (a top-level original_max_position_embeddings the model came with) would win over
    # rope_parameters in transformers, and the model in memory would differ from the saved one.
    config = CONFIG_MAPPING[plan.config["model_type"]].from_dict(without_rope_mirrors(plan.config))
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # Tensors only an installed behaviour has (Infini's gates) are loaded once the install hooks have made them.
    # (Only then: without hooks every tensor is the plain class's, under its on-disk name, which for a Mixtral is
    # not its in-memory name.)
    added: dict[str, torch.Tensor] = {}
    if plan.installs:
        with torch.device("meta"):
            known = set(model_class(config).state_dict())
        added = {name: new_state.pop(name) for name in list(new_state) if name not in known}
    with quiet_libraries():  # no loading bar or load report for a model rebuilt from tensors we hold
        new_model = model_class.from_pretrained(None, config=config, state_dict=new_state, dtype=config.dtype)
    for install in plan.installs:
        new_model = install(new_model)
    if added:
        unexpected = new_model.load_state_dict(added, strict=False).unexpected_keys
        if unexpected:
            raise PatchError(f"internal error: the patched model has no place for {', '.join(unexpected)}; please "
                             "report this.")
    new_model.train(model.training)
    return new_model.to(model.device)
