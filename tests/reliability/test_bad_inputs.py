"""Bad models, bad specs and bad places to write: one row per defect of issue 12, section 4 (items 3, 6, 7, 8, 11).

Every row damages a copy of a tiny model (or the environment) the way a hostile tester did, runs one `retrofit`
command, and holds it to the harness's contract: a non-zero exit, one message naming the problem and the fix, no
traceback, the model byte-identical, no output and no staging directory left behind. Rows that evaluate forbid the
evaluation from starting where the refusal must come first (an evaluation can take hours; losing it at the end to an
unwritable --json is the defect).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, save_tiny
from harness import refuse

TOKEN = "hf_" + "q" * 34  # a token-shaped secret: no message may ever show it


@dataclass
class Place:
    """Where a row runs: `model` a damaged copy of the tiny model, `good` the model itself (only ever read), `docs` a
    text of 520 tokens, `out` not there yet."""

    model: Path
    good: Path
    docs: Path
    out: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


Damage = Callable[[Place], None]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny(tmp_path_factory.mktemp("pristine") / "m", max_position_embeddings=512)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def place(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Place:
    model = tmp_path / "m"
    shutil.copytree(pristine, model)
    docs = tmp_path / "docs.txt"
    docs.write_text("It was the best of times. " * 20)
    return Place(model, pristine, docs, tmp_path / "out", tmp_path, monkeypatch)


# -- ways to damage a model --------------------------------------------------------------------------------------


def config(**changes: object) -> Damage:
    """Set config.json keys (None: remove the key)."""

    def damage(place: Place) -> None:
        path = place.model / "config.json"
        values = json.loads(path.read_text())
        for key, value in changes.items():
            values.pop(key, None) if value is None else values.__setitem__(key, value)
        path.write_text(json.dumps(values))  # json writes NaN as NaN, as the old patches did

    return damage


def truncate(keep: int) -> Damage:
    def damage(place: Place) -> None:
        weights = place.model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:keep])

    return damage


def remove(name: str) -> Damage:
    return lambda place: (place.model / name).unlink()


def sharded(weight_map: object) -> Damage:
    """The weights moved to a shard, with an index whose weight_map is `weight_map`."""

    def damage(place: Place) -> None:
        (place.model / "model.safetensors").rename(place.model / "model-00001-of-00001.safetensors")
        index = {"metadata": {}, "weight_map": weight_map}
        (place.model / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


def header(change: Callable[[dict], None]) -> Damage:
    """Rewrite model.safetensors' JSON header with `change`, keeping the data bytes as they are."""

    def damage(place: Place) -> None:
        write_header(place.model / "model.safetensors", change)

    return damage


def write_header(path: Path, change: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    entries = json.loads(data[8 : 8 + length])
    change(entries)
    encoded = json.dumps(entries).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def overlap(entries: dict) -> None:
    """The second norm of layer 0 reads the bytes of the first: the output would carry the wrong weights."""
    first = entries["model.layers.0.input_layernorm.weight"]["data_offsets"]
    entries["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = list(first)


def beyond_the_file(entries: dict) -> None:
    name = "model.norm.weight"
    begin, end = entries[name]["data_offsets"]
    entries[name]["data_offsets"] = [begin + 10**6, end + 10**6]


def wrong_size(entries: dict) -> None:
    entries["model.norm.weight"]["shape"] = [32]  # 64 float32 values are stored


def gap(entries: dict) -> None:
    """One tensor fewer in the header: its bytes, between two others, belong to no tensor (and it is missing)."""
    del entries["model.embed_tokens.weight"]


def nan_weight(name: str) -> Damage:
    def damage(place: Place) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(place.model / "model.safetensors")
        tensors[name][0] = float("nan")
        save_file(tensors, place.model / "model.safetensors", metadata={"format": "pt"})

    return damage


def symlink_loop(place: Place) -> None:
    (place.tmp / "loop").symlink_to(place.tmp / "loop2")
    (place.tmp / "loop2").symlink_to(place.tmp / "loop")


def disk_full(place: Place) -> None:
    """os.write fails with ENOSPC for every file under the test's directory (the disk fills while writing)."""
    real = os.write

    def write(fd: int, data: object) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(place.tmp)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)  # type: ignore[arg-type]

    place.monkeypatch.setattr(os, "write", write)


def read_only(place: Place) -> None:
    """The directory of the output is on a read-only file system: creating anything in it fails with EROFS."""
    real = os.mkdir

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if Path(os.fspath(path)).parent == place.out.parent:  # type: ignore[arg-type]
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))  # type: ignore[arg-type]
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    place.monkeypatch.setattr(os, "mkdir", mkdir)


def no_evaluation(place: Place) -> None:
    """The evaluation must never start: the refusal comes first."""
    import llm_retrofit.evaluation.perplexity as perplexity

    def evaluate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran before the refusal")

    place.monkeypatch.setattr(perplexity, "evaluate", evaluate)


def results_lost_to_a_full_disk(place: Place) -> None:
    """The evaluation runs; the disk is full when its JSON is written."""
    from llm_retrofit.evaluation.report import EvalResult

    def to_json(self: object, path: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))  # type: ignore[arg-type]

    place.monkeypatch.setattr(EvalResult, "to_json", to_json)


def calibration(text: str) -> Damage:
    """A calibration text at {tmp}/calibration.txt (the tiny model's tokenizer has a token per character, no BOS)."""

    def damage(place: Place) -> None:
        (place.tmp / "calibration.txt").write_text(text)

    return damage


def both(*damages: Damage) -> Damage:
    def damage(place: Place) -> None:
        for each in damages:
            each(place)

    return damage


def unwritable(directory: str) -> bool:
    """True where even root cannot create a file in `directory` (/proc, /sys)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory)
    except OSError:
        return True
    os.close(fd)
    os.unlink(probe)
    return False


def without_cuda(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.is_available(), reason=reason)


EVAL = "eval {m} -d {docs} -l 64"
PATCH = "patch {m} -p linear:factor=2 -o {out}"
INCOMPLETE = "is incomplete: config.json says num_hidden_layers=5 but the weights hold 3 layer(s)"
CORRUPT = "is not a readable safetensors file: "
BLOCK_SPARSE = "attention:pattern=block_sparse,window=64"

CASES = [
    # 4.3: eval (and every command that runs a local checkpoint) runs our checkpoint checks; patch refuses an
    # incomplete checkpoint before writing anything
    pytest.param(config(model_type="gpt2"), EVAL, "model_type 'gpt2' is not supported; llm-retrofit rewrites llama, "
                 "ministral, mistral, mixtral checkpoints", id="eval-model-type-gpt2"),
    pytest.param(config(num_hidden_layers=5), EVAL, INCOMPLETE, id="eval-config-counts-more-layers-than-the-weights"),
    pytest.param(truncate(20000), EVAL, "model.safetensors is not a readable safetensors file: tensor 'lm_head.weight' "
                 "ends at byte 32768 of a 16936-byte data section. It is corrupt or truncated",
                 id="eval-truncated-weights"),
    pytest.param(remove("model.safetensors"), EVAL, "has a config.json but no weights: expected model.safetensors",
                 id="eval-weights-missing"),
    pytest.param(sharded({"model.norm.weight": "model-00002-of-00002.safetensors"}), EVAL,
                 "shard model-00002-of-00002.safetensors named in the index", id="eval-shard-missing"),
    pytest.param(both(config(num_hidden_layers=5), no_evaluation), "eval {good} {m} -d {docs} -l 64", INCOMPLETE,
                 id="eval-of-two-models-the-second-incomplete"),
    pytest.param(config(num_hidden_layers=5), "finetune {m} -o {out} -d {docs} --steps 1 --seq-len 32", INCOMPLETE,
                 id="finetune-config-counts-more-layers-than-the-weights"),
    pytest.param(config(num_hidden_layers=5), "search-rope {m} --target-length 1024 -d {docs} -o {tmp}/f.json",
                 INCOMPLETE, id="search-rope-config-counts-more-layers-than-the-weights"),
    pytest.param(config(num_hidden_layers=5), PATCH, INCOMPLETE, id="patch-config-counts-more-layers-than-the-weights"),
    pytest.param(config(num_hidden_layers=5), "patch {m} -p linear:factor=2 --dry-run", INCOMPLETE,
                 id="patch-dry-run-of-an-incomplete-checkpoint"),
    pytest.param(sharded({}), PATCH, "is incomplete: it holds no tensors at all (an empty weight file or 'weight_map')",
                 id="patch-empty-weight-map"),
    # 4.6: raw tracebacks for mistakes of the user or the machine
    pytest.param(disk_full, "patch {m} -p dtype:to=bfloat16 -o {out}", "cannot write {out}: No space left on device; "
                 "the disk is full; free space, or write the output to a disk with room", id="patch-disk-full"),
    pytest.param(disk_full, "convert {m} {out} --dtype bfloat16", "cannot write {out}: No space left on device",
                 id="convert-disk-full"),
    pytest.param(read_only, PATCH, "cannot write {out}: Read-only file system; the file system is read-only; write "
                 "the output to a writable one", id="patch-output-on-a-read-only-file-system"),
    pytest.param(no_evaluation, EVAL + " --json /proc/retrofit/eval.json", "cannot write /proc/retrofit/eval.json: No "
                 "such file or directory; that directory takes no new files",
                 id="eval-json-where-nothing-can-be-written"),
    pytest.param(no_evaluation, EVAL + " --plot /sys/retrofit-ppl.png", "cannot write /sys/retrofit-ppl.png: ",
                 id="eval-plot-where-root-may-not-write",
                 marks=pytest.mark.skipif(not unwritable("/sys"), reason="/sys is writable here")),
    pytest.param(results_lost_to_a_full_disk, EVAL + " --json {tmp}/eval.json", "cannot write {tmp}/eval.json: No "
                 "space left on device", id="eval-json-on-a-full-disk"),
    pytest.param(None, "export {m} {tmp}/m.gguf", "export writes byte-level BPE tokenizers",
                 id="export-word-level-tokenizer"),
    pytest.param(remove("tokenizer.json"), "export {m} {tmp}/m.gguf", "has no tokenizer.json; a GGUF carries its "
                 "tokenizer", id="export-without-a-tokenizer"),
    pytest.param(config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
                 "export {m} {tmp}/m.gguf", "cannot be exported to GGUF: dynamic NTK", id="export-dynamic-ntk"),
    pytest.param(None, "export {m} {tmp}/m.bin", "does not end in .gguf", id="export-output-not-gguf"),
    pytest.param(None, "export {m} {tmp}/m.gguf --dtype q4_k", "Invalid value for '--dtype'", id="export-dtype-q4_k"),
    pytest.param(None, "export {m} {tmp}/nowhere/m.gguf", "{tmp}/nowhere does not exist; create it first",
                 id="export-into-a-missing-directory"),
    pytest.param(None, "patch {m} -p expand:num_new_layers=0 -o {out}", "expand: num_new_layers=0 must be a positive "
                 "integer (the layers to add)", id="expand-num-new-layers-0"),
    pytest.param(None, "patch {m} -p expand:every=0 -o {out}", "expand: every=0 must be a positive integer (original "
                 "layers per added one)", id="expand-every-0"),
    pytest.param(None, "patch {m} -p gqa:num_key_value_heads=3 -o {out}", "gqa: num_key_value_heads=3 must be fewer "
                 "than this model's 2 key/value heads and divide them; use one of [1]", id="gqa-heads-not-a-divisor"),
    pytest.param(None, "patch {m} -p gqa:num_key_value_heads=2,method=mean -o {out}", "gqa: num_key_value_heads=2 "
                 "must be fewer than this model's 2 key/value heads", id="gqa-as-many-heads-as-before"),
    pytest.param(None, "patch {m} -p gqa:num_key_value_heads=1,method=mean,calibration={docs} -o {out}",
                 "gqa: calibration and calibration_tokens are read only by method=fit", id="gqa-calibration-with-mean"),
    pytest.param(None, "patch {m} -p gqa:num_key_value_heads=1,calibration={tmp}/nowhere.txt -o {out}",
                 "{tmp}/nowhere.txt", id="gqa-calibration-source-missing"),
    pytest.param(None, "patch {m} -p dtype:to=bfloat16 -p gqa:num_key_value_heads=1 -o {out}",
                 "gqa: method=fit runs the model to compute its result; make it the first patch of the chain",
                 id="gqa-fit-after-another-patch"),
    pytest.param(None, "patch {m} -p yarn:factor=inf -o {out}", "patch 'yarn': factor='inf' is not valid; expected a "
                 "finite number", id="yarn-factor-inf"),
    pytest.param(None, "patch {m} -p linear:factor=nan -o {out}", "patch 'linear': factor='nan' is not valid; expected "
                 "a finite number", id="linear-factor-nan"),
    pytest.param(no_evaluation, EVAL + " --device bogus", "device 'bogus' is not a device; pass cpu, cuda or cuda:N",
                 id="eval-device-bogus"),
    pytest.param(no_evaluation, EVAL + " --device cuda", "device 'cuda': CUDA is not available here",
                 id="eval-device-cuda-without-cuda", marks=without_cuda("this machine has CUDA")),
    pytest.param(no_evaluation, EVAL + " --max-memory cpu:1GiB", "max_memory 'cpu:1GiB' is not DEVICE=SIZE,...; "
                 "write it as cuda:0=20GiB,cpu=64GiB", id="eval-max-memory-malformed"),
    pytest.param(no_evaluation, EVAL + " --max-memory gpu=1GiB", "max_memory names 'gpu', which is not a device; use "
                 "cpu, mps or cuda:N", id="eval-max-memory-unknown-device"),
    pytest.param(no_evaluation, EVAL + " --device-map cdua", "device_map 'cdua' is neither a placement (auto, "
                 "balanced, balanced_low_0, sequential) nor a device", id="eval-device-map-bogus"),
    pytest.param(config(num_hidden_layers=None), PATCH, "config.json has no 'num_hidden_layers', which every "
                 "Llama-family config gives", id="config-without-num-hidden-layers"),
    pytest.param(config(num_hidden_layers="3"), PATCH, 'config.json: num_hidden_layers is "3", but it must be a '
                 "positive integer", id="config-num-hidden-layers-a-string"),
    pytest.param(config(num_hidden_layers="3"), "inspect {m}", 'num_hidden_layers is "3", but it must be a positive '
                 "integer", id="inspect-config-num-hidden-layers-a-string"),
    pytest.param(sharded(["model.norm.weight"]), PATCH, "model.safetensors.index.json is not a valid shard index: its "
                 "'weight_map' must map each tensor name to the file holding it", id="index-weight-map-a-list"),
    # 4.7: NaN and inf never reach config.json
    pytest.param(None, "patch {m} -p dynamic:factor=nan -o {out}", "patch 'dynamic': factor='nan' is not valid; "
                 "expected a finite number", id="dynamic-factor-nan"),
    pytest.param(None, "patch {m} -p yarn:factor=2,beta_fast=nan -o {out}", "patch 'yarn': beta_fast='nan' is not "
                 "valid; expected a finite number", id="yarn-beta-fast-nan"),
    pytest.param(None, "patch {m} -p yarn:factor=2,beta_fast=1,beta_slow=32 -o {out}", "yarn: beta_fast=1.0, "
                 "beta_slow=32.0 must be finite with 0 < beta_slow < beta_fast", id="yarn-beta-fast-below-beta-slow"),
    pytest.param(None, "patch {m} -p llama3:factor=2,low_freq_factor=4,high_freq_factor=1 -o {out}",
                 "llama3: low_freq_factor=4.0, high_freq_factor=1.0 must be finite with 0 < low_freq_factor < "
                 "high_freq_factor", id="llama3-low-freq-factor-above-high"),
    pytest.param(None, "patch {m} -p llama3:factor=2,low_freq_factor=4,high_freq_factor=4 -o {out}",
                 "0 < low_freq_factor < high_freq_factor", id="llama3-low-freq-factor-equal-to-high"),
    pytest.param(config(rope_parameters={"rope_type": "dynamic", "factor": float("nan"), "rope_theta": 10000.0}), EVAL,
                 "config.json holds NaN, which is not a JSON number", id="eval-config-written-with-nan"),
    # 4.8: safetensors headers that lie are refused, as the safetensors library refuses them
    pytest.param(header(overlap), "patch {m} -p dtype:to=bfloat16 -o {out}", CORRUPT + "tensor "
                 "'model.layers.0.post_attention_layernorm.weight' starts at byte", id="header-overlapping-offsets"),
    pytest.param(header(overlap), EVAL, "inside the bytes of another tensor", id="eval-header-overlapping-offsets"),
    pytest.param(header(beyond_the_file), PATCH, CORRUPT + "tensor 'model.norm.weight' ends at byte",
                 id="header-offsets-beyond-the-file"),
    pytest.param(header(wrong_size), PATCH, CORRUPT + "tensor 'model.norm.weight' has 256 bytes, its shape needs 128",
                 id="header-size-not-dtype-times-shape"),
    pytest.param(header(gap), PATCH, "of its data section belong to no tensor", id="header-gap-between-tensors"),
    # 4.11: the smaller ones
    pytest.param(lambda place: place.docs.write_text(""), EVAL, "nothing to measure: none of the 1 document(s) is as "
                 "long as the shortest length, 64 tokens (the longest has 0)", id="eval-empty-document"),
    pytest.param(None, "eval {m} -d {docs} -l 1024,2048", "nothing to measure: none of the 1 document(s) is as long "
                 "as the shortest length, 1024 tokens (the longest has 520). Pass shorter lengths",
                 id="eval-every-document-shorter-than-every-length"),
    pytest.param(nan_weight("model.norm.weight"), EVAL,
                 "the weights of {m} hold NaN or inf (first in model.norm.weight)", id="eval-nan-weights"),
    pytest.param(symlink_loop, "inspect {tmp}/loop", "{tmp}/loop is a loop of symbolic links",
                 id="model-a-symlink-loop"),
    pytest.param(symlink_loop, "eval {tmp}/loop -d {docs} -l 64", "is a loop of symbolic links",
                 id="eval-model-a-symlink-loop"),
    pytest.param(None, f"push {{m}} alice/m --token {TOKEN}", "HF_HUB_OFFLINE is set, so huggingface_hub makes no "
                 "requests; unset it to push. Nothing was written or sent", id="push-offline-writes-no-card"),
    pytest.param(config(num_hidden_layers=10**8), PATCH, "config.json says num_hidden_layers=100000000 but the "
                 "weights hold 3 layer(s)", id="config-claims-1e8-layers"),
    pytest.param(config(num_hidden_layers=1e8), PATCH, "num_hidden_layers is 100000000.0, but it must be a positive "
                 "integer", id="config-num-hidden-layers-1e8-a-float"),
    pytest.param(None, "patch {m} -p linear:factor=2,factor=3 -o {out}", "'linear:factor=2,factor=3': factor is given "
                 "twice; give each parameter once", id="spec-key-repeated"),
    # issue 25, section 2: what a new user tried with the new patchers
    pytest.param(None, f"patch {{m}} -p {BLOCK_SPARSE},block_size=0 -o {{out}}", "attention: block_size=0 must be a "
                 "positive number of tokens per block, e.g. block_size=128 (the default)", id="block-size-0"),
    pytest.param(None, f"patch {{m}} -p {BLOCK_SPARSE},block_size=-1 -o {{out}}", "attention: block_size=-1 must be a "
                 "positive number of tokens per block, e.g. block_size=128", id="block-size-negative"),
    pytest.param(None, f"patch {{m}} -p {BLOCK_SPARSE},block_size=16,seed=-5 -o {{out}}", "attention: seed=-5 must be "
                 ">= 0, e.g. seed=0", id="block-sparse-seed-negative"),
    pytest.param(calibration(""), "patch {m} -p gqa:num_key_value_heads=1,calibration={tmp}/calibration.txt -o {out}",
                 "gqa: calibration={tmp}/calibration.txt holds no text, too few to fit a merge (at least 16; the "
                 "default reads 8192); give a longer text, or method=mean", id="gqa-calibration-empty"),
    pytest.param(calibration("twelve chars"), "patch {m} -p gqa:num_key_value_heads=1,calibration={tmp}/calibration."
                 "txt -o {out}", "gqa: calibration={tmp}/calibration.txt holds 12 tokens, too few to fit a merge (at "
                 "least 16", id="gqa-calibration-12-tokens"),
    pytest.param(None, "patch {m} -p gqa:num_key_value_heads=1,calibration_tokens=12 -o {out}", "gqa: "
                 "calibration_tokens=12 is too few to fit a merge; give at least 16", id="gqa-calibration-tokens-12"),
    pytest.param(None, "patch {m} -p infini:segment_length=64,gate_init=nan -o {out}", "patch 'infini': "
                 "gate_init='nan' is not valid; expected a finite number", id="infini-gate-init-nan"),
    pytest.param(None, "patch {m} -p infini:segment_length=64,gate_init=1e300 -o {out}", "infini: gate_init=1e+300 is "
                 "outside [-30, 30]", id="infini-gate-init-1e300"),
    pytest.param(None, "patch {m} -p infini:segment_length=64,memory=maybe -o {out}", "patch 'infini': memory='maybe' "
                 "is not valid; expected true or false", id="infini-memory-not-a-bool"),
    pytest.param(None, "patch {m} -p attention:pattern=Sinks,window=64 -o {out}", "patch 'attention': pattern='Sinks' "
                 "is not valid; expected one of dense, sliding, sinks, block_sparse",
                 id="attention-pattern-capitalised"),
]


@pytest.mark.parametrize(("damage", "command", "expect"), CASES)
def test_a_bad_input_is_refused_in_one_line(damage: Damage | None, command: str, expect: str, place: Place) -> None:
    if damage is not None:
        damage(place)
    names = {"m": place.model, "good": place.good, "docs": place.docs, "out": place.out, "tmp": place.tmp}
    args = shlex.split(command.format(**names))
    output = refuse(args, expect=expect.format(**names), untouched=[place.model], absent=[place.out])
    last = output.rstrip("\n").split("\n")[-1]  # what came before it is progress bars, on stderr
    assert last.startswith("Error: ") and expect.format(**names) in last, f"not one line:\n{output}"
    assert TOKEN not in output


def test_inspect_flags_a_config_claiming_1e8_layers_at_once(place: Place) -> None:
    """inspect describes an incomplete checkpoint rather than refusing it, and its check costs what the weights hold,
    not what config.json claims (10^8 layers of names were a hang)."""
    from click.testing import CliRunner

    from llm_retrofit.cli import main

    config(num_hidden_layers=10**8)(place)
    result = CliRunner().invoke(main, ["inspect", str(place.model), "--json"])
    assert result.exit_code == 0, result.output
    description = json.loads(result.output)
    assert description["incomplete"].startswith("config.json says num_hidden_layers=100000000 but the weights hold 3")
    assert description["missing_tensors"][0] == "model.layers.3.self_attn.q_proj.weight"
    assert len(description["missing_tensors"]) == 9, "the first absent layer's tensors, not 10^8 layers of them"


@pytest.mark.parametrize("command", ["patch {m} -p dtype:to=float64 -o {out}", "convert {m} {out} --dtype float64"])
def test_a_disk_that_really_fills_gives_one_line_and_leaves_nothing_on_it(command: str, place: Place,
                                                                          small_disk: Path) -> None:
    out = small_disk / "out"
    weights = sum(f.stat().st_size for f in place.model.glob("*.safetensors"))
    assert 2 * weights > 256 << 10, "the float64 copy must not fit, or nothing is tested"
    args = shlex.split(command.format(m=place.model, out=out))
    output = refuse(args, expect=f"cannot write {out}: No space left on device", untouched=[place.model], absent=[out])
    assert output.rstrip("\n").split("\n")[-1].startswith("Error: "), output
    assert list(small_disk.iterdir()) == [], "the staging directory is removed from the full disk"


# -- the Python API: the same values refused as the command line refuses them, with our errors ------------------

API_CASES = [  # (function of llm_retrofit.api, its arguments after the model, the message)
    pytest.param("add_infini_memory", {"segment_length": 64, "gate_init": float("nan")}, "patch 'infini': "
                 "gate_init=nan is not valid; expected a finite number", id="api-infini-gate-init-nan"),
    pytest.param("add_infini_memory", {"segment_length": 64, "gate_init": 1e300}, "infini: gate_init=1e+300 is outside "
                 "[-30, 30]", id="api-infini-gate-init-1e300"),
    pytest.param("add_infini_memory", {"segment_length": 64, "update": "bogus"}, "patch 'infini': update='bogus' is "
                 "not valid; expected one of linear, delta", id="api-infini-update-bogus"),
    pytest.param("add_infini_memory", {"segment_length": 64, "memory": "maybe"}, "patch 'infini': memory='maybe' is "
                 "not valid; expected true or false", id="api-infini-memory-maybe"),
    pytest.param("pool_kv_heads", {"num_key_value_heads": 1.5}, "patch 'gqa': num_key_value_heads=1.5 is not valid; "
                 "expected an integer", id="api-gqa-heads-1.5"),
    pytest.param("set_attention", {"pattern": "Sinks", "window": 64}, "patch 'attention': pattern='Sinks' is not "
                 "valid; expected one of dense, sliding, sinks, block_sparse", id="api-attention-pattern-capitalised"),
    pytest.param("set_attention", {"pattern": "sliding", "window": True}, "patch 'attention': window=True is not "
                 "valid; expected an integer", id="api-attention-window-a-bool"),
    pytest.param("set_attention", {"pattern": "sliding", "windw": 64}, "patch 'attention' has no parameter 'windw'; "
                 "its parameters are impl", id="api-attention-unknown-keyword"),
    pytest.param("set_attention", {"pattern": "block_sparse", "window": 64, "seed": -5}, "attention: seed=-5 must be "
                 ">= 0", id="api-block-sparse-seed-negative"),
]


@pytest.mark.parametrize("loaded", [False, True], ids=["checkpoint", "loaded-model"])
@pytest.mark.parametrize(("function", "arguments", "expect"), API_CASES)
def test_the_python_api_refuses_what_the_cli_refuses(function: str, arguments: dict, expect: str, loaded: bool,
                                                      place: Place) -> None:
    import llm_retrofit.api as api
    from harness import tree_state
    from llm_retrofit import RetrofitError
    from transformers import AutoModelForCausalLM

    before = tree_state(place.model)
    model = AutoModelForCausalLM.from_pretrained(place.model) if loaded else place.model
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()} if loaded else {}
    write = {} if loaded else {"output": place.out}
    with pytest.raises(RetrofitError) as caught:
        getattr(api, function)(model, **arguments, **write)
    assert expect in str(caught.value) and len(str(caught.value).splitlines()) == 1, str(caught.value)
    assert tree_state(place.model) == before and not place.out.exists()
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor), f"{name} changed"
