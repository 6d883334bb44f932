"""Whose code our commands run: only llm-retrofit's own shipped modeling file, from the checkpoint's own directory.

Issue 25, section 1. transformers, given `trust_remote_code=True`, imports the class each config.json `auto_map` entry
names: `module.Class` from the checkpoint, `other--module.Class` from another local directory or Hub repo, and a
`custom_generate/generate.py` beside config.json. Each row below takes a checkpoint patched with attention sinks (it
ships our byte-identical `modeling_retrofit_attention.py`) and changes it the way an attacker would; `retrofit eval`
(through the CLI), `finetune()` and a recipe's eval step (through the functions) must each refuse it with one message
naming what was found and the fix, leave it byte-identical and write nothing; and no attacker module may be imported:
every one of them writes a marker file when it is, and the control test shows transformers itself does import them.
The other loaders follow the same rule: a distillation teacher, a patch that calibrates on the model, an adapter's base.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import char_tokenizer, read_config, save_tiny, snapshot, tiny_model
from harness import refuse
from llm_retrofit import RetrofitError, finetune, patch, run_recipe
from llm_retrofit.cli import main
from llm_retrofit.errors import CheckpointError
from llm_retrofit.evaluation.perplexity import load_model

SINKS = "attention:pattern=sinks,sinks=2,window=8"
OURS = Path(__file__).resolve().parents[2] / "llm_retrofit" / "modeling" / "shipped" / "modeling_retrofit_attention.py"
OUR_ENTRY = {"AutoModelForCausalLM": "modeling_retrofit_attention.RetrofitLlamaForCausalLM"}  # what the patch writes


@dataclass
class Scene:
    """`model`: a copy of a sinks checkpoint the row tampers with; `marker`: written by any attacker module imported;
    `tmp`: the current directory (where a `user/repo--` reference finds a folder `user/repo`)."""

    model: Path
    marker: Path
    docs: Path
    tmp: Path


@pytest.fixture(scope="module")
def sinks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = save_tiny(tmp_path_factory.mktemp("base") / "m", max_position_embeddings=512)
    char_tokenizer().save_pretrained(base)
    return patch(base, SINKS, output=tmp_path_factory.mktemp("sinks") / "sinks")


@pytest.fixture
def scene(sinks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scene:
    model = tmp_path / "victim"
    shutil.copytree(sinks, model)
    docs = tmp_path / "docs.txt"
    docs.write_text("It was the best of times, it was the worst of times. " * 12)
    monkeypatch.chdir(tmp_path)
    return Scene(model, tmp_path / "ATTACKER-CODE-RAN", docs, tmp_path)


def plant(path: Path, marker: Path, body: str = "") -> None:
    """An attacker's module at `path`: it writes `marker` when imported (then `body`, or a copy of our file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((body or OURS.read_text()) + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")


def set_auto_map(scene: Scene, auto_map: object) -> None:
    config = read_config(scene.model)
    config["auto_map"] = auto_map
    (scene.model / "config.json").write_text(json.dumps(config))


# -- the attacks: each sets up its files and auto_map, and returns the part of the message that names the problem --

def another_directory(scene: Scene) -> str:
    plant(scene.tmp / "elsewhere" / "modeling_retrofit_attention.py", scene.marker)
    set_auto_map(scene, {"AutoModelForCausalLM": f"{scene.tmp / 'elsewhere'}--{OUR_ENTRY['AutoModelForCausalLM']}"})
    return "code of another directory or Hub repo"


def a_hub_repo(scene: Scene) -> str:
    # The Hub repo `someone/sinks`; a folder of that relative name is what transformers imports first (offline here).
    plant(scene.tmp / "someone" / "sinks" / "modeling_retrofit_attention.py", scene.marker)
    set_auto_map(scene, {"AutoModelForCausalLM": f"someone/sinks--{OUR_ENTRY['AutoModelForCausalLM']}"})
    return "code of another directory or Hub repo, 'someone/sinks'"


def our_class_in_their_module(scene: Scene) -> str:
    plant(scene.model / "modeling_their.py", scene.marker)
    set_auto_map(scene, {"AutoModelForCausalLM": "modeling_their.RetrofitLlamaForCausalLM"})
    return "a module llm-retrofit does not ship"


def only_their_code(scene: Scene) -> str:
    # Loaded without trust_remote_code this used to be measured and trained as the plain Llama, silently.
    plant(scene.model / "modeling_their.py", scene.marker, body="class TheirLlamaForCausalLM:\n    pass\n")
    set_auto_map(scene, {"AutoModelForCausalLM": "modeling_their.TheirLlamaForCausalLM"})
    return "a module llm-retrofit does not ship"


def an_extra_key(scene: Scene) -> str:
    plant(scene.model / "configuration_their.py", scene.marker,
          body="from transformers import LlamaConfig\n\nclass TheirConfig(LlamaConfig):\n    pass\n")
    set_auto_map(scene, {**OUR_ENTRY, "AutoConfig": "configuration_their.TheirConfig"})
    return "'AutoConfig': 'configuration_their.TheirConfig' (our patches write only AutoModelForCausalLM)"


def their_class_in_our_module(scene: Scene) -> str:
    set_auto_map(scene, {"AutoModelForCausalLM": "modeling_retrofit_attention.Backdoor"})
    return "a class llm-retrofit's module does not define"


def a_list_for_a_name(scene: Scene) -> str:
    set_auto_map(scene, {"AutoModelForCausalLM": [OUR_ENTRY["AutoModelForCausalLM"]]})
    return "not a 'module.Class' string"


def a_number_for_a_name(scene: Scene) -> str:
    set_auto_map(scene, {"AutoModelForCausalLM": 7})
    return "not a 'module.Class' string"


def not_a_mapping(scene: Scene) -> str:
    set_auto_map(scene, OUR_ENTRY["AutoModelForCausalLM"])
    return "not a mapping of auto classes to code"


def a_custom_generate(scene: Scene) -> str:
    plant(scene.model / "custom_generate" / "generate.py", scene.marker,
          body="def generate(model, *args, **kwargs):\n    return None\n")
    return "custom generate code"


ATTACKS: list[Callable[[Scene], str]] = [
    another_directory, a_hub_repo, our_class_in_their_module, only_their_code, an_extra_key,
    their_class_in_our_module, a_list_for_a_name, a_number_for_a_name, not_a_mapping, a_custom_generate,
]
IMPORTING = [another_directory, a_hub_repo, our_class_in_their_module, only_their_code, an_extra_key,
             a_custom_generate]  # the attacks whose file transformers would import under trust_remote_code=True
FIX = ["load the model yourself with transformers"]


def ids(attack: Callable[[Scene], str]) -> str:
    return attack.__name__.replace("_", "-")


@pytest.mark.parametrize("attack", IMPORTING, ids=ids)
def test_control_transformers_itself_imports_the_attackers_file(attack: Callable[[Scene], str], scene: Scene) -> None:
    """Without our check, what each row sets up runs: so the marker's absence below means something."""
    from transformers import AutoModelForCausalLM

    attack(scene)
    try:
        AutoModelForCausalLM.from_pretrained(scene.model, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - whether the model then loads does not matter: the code already ran
        pass
    assert scene.marker.exists()


@pytest.mark.parametrize("attack", ATTACKS, ids=ids)
def test_eval_refuses_code_that_is_not_ours(attack: Callable[[Scene], str], scene: Scene) -> None:
    problem = attack(scene)
    message = refuse(["eval", scene.model, "-d", scene.docs, "-l", "64"], expect=problem, untouched=[scene.model])
    for fix in FIX:
        assert fix in " ".join(message.split()), message
    assert not scene.marker.exists()


def test_eval_of_several_models_refuses_before_the_first_runs(scene: Scene, sinks: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import llm_retrofit.evaluation.perplexity as perplexity

    def evaluate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran before the refusal")

    monkeypatch.setattr(perplexity, "evaluate", evaluate)  # an evaluation of hours must not be lost to the last model
    problem = a_hub_repo(scene)
    refuse(["eval", sinks, scene.model, "-d", scene.docs, "-l", "64"], expect=problem, untouched=[scene.model])
    assert not scene.marker.exists()


@pytest.mark.parametrize("attack", ATTACKS, ids=ids)
def test_finetune_refuses_code_that_is_not_ours(attack: Callable[[Scene], str], scene: Scene) -> None:
    problem = attack(scene)
    before = snapshot(scene.model)
    with pytest.raises(CheckpointError) as refused:
        finetune(scene.model, scene.tmp / "tuned", data=[str(scene.docs)], steps=1, seq_len=32, batch_size=1)
    assert problem in str(refused.value) and all(fix in str(refused.value) for fix in FIX)
    assert snapshot(scene.model) == before and not (scene.tmp / "tuned").exists()
    assert not scene.marker.exists()


@pytest.mark.parametrize("attack", ATTACKS, ids=ids)
def test_a_recipes_eval_step_refuses_code_that_is_not_ours(attack: Callable[[Scene], str], scene: Scene) -> None:
    problem = attack(scene)
    recipe = scene.tmp / "measure.yaml"
    recipe.write_text(f"name: measure\ndescription: perplexity of the input\nsteps:\n"
                      f"  - eval: {{data: [{scene.docs}], lengths: [64]}}\n")
    before = snapshot(scene.model)
    with pytest.raises(RetrofitError) as refused:
        run_recipe(scene.model, recipe, output=scene.tmp / "run")
    assert problem in str(refused.value)
    assert snapshot(scene.model) == before and not scene.marker.exists()


def test_the_message_names_the_entry_and_the_fixes(scene: Scene) -> None:
    another_directory(scene)
    with pytest.raises(CheckpointError) as refused:
        load_model(scene.model)
    message = str(refused.value)
    assert message.startswith(f"{scene.model}: config.json's auto_map names code that is not llm-retrofit's: "
                              f"'AutoModelForCausalLM': '{scene.tmp / 'elsewhere'}--modeling_retrofit_attention.")
    assert "remove auto_map from config.json" in message
    assert '"AutoModelForCausalLM": "modeling_retrofit_attention.RetrofitLlamaForCausalLM"' in message
    assert "(trust_remote_code=True), which llm_retrofit.evaluate also takes" in message


# -- our own code still runs -----------------------------------------------------------------------------------


def test_our_own_sinks_checkpoint_loads_and_runs_our_code(sinks: Path, tmp_path: Path) -> None:
    model, _ = load_model(sinks)
    # The class comes from the checkpoint's own copy of our file (transformers names the module after the folder).
    assert type(model).__name__ == "RetrofitLlamaForCausalLM"
    assert type(model).__module__.startswith(f"transformers_modules.{sinks.name}.")
    ids_ = torch.arange(10, 70).unsqueeze(0)
    in_memory = patch(tiny_model(max_position_embeddings=512), SINKS)
    with torch.no_grad():
        torch.testing.assert_close(model(ids_).logits, in_memory(ids_).logits, atol=1e-5, rtol=1e-5)
        assert (model(ids_).logits - tiny_model(max_position_embeddings=512)(ids_).logits).abs().max() > 1e-3
    docs = tmp_path / "docs.txt"
    docs.write_text("It was the best of times, it was the worst of times. " * 12)
    result = CliRunner().invoke(main, ["eval", str(sinks), "-d", str(docs), "-l", "64"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("spec", ["attention:pattern=sinks,window=8", "attention:pattern=block_sparse,window=16,"
                                  "block_size=8", "infini:segment_length=16"])
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_every_patch_that_ships_code_writes_an_auto_map_our_loaders_run(spec: str, model_type: str,
                                                                        tmp_path: Path) -> None:
    from llm_retrofit.modeling.remote_code import runs_our_code

    window = {"sliding_window": None} if model_type == "mistral" else {}  # Infini replaces a window: none to start
    out = patch(save_tiny(tmp_path / "m", model_type, **window), spec, output=tmp_path / "out")
    assert runs_our_code(out, read_config(out)) is True


# -- inspect and patch say whose code a checkpoint carries ---------------------------------------------------------


def test_inspect_says_whose_code_a_checkpoint_loads(scene: Scene, tiny_llama: Path) -> None:
    ours = CliRunner().invoke(main, ["inspect", str(scene.model)])
    assert "custom code: llm-retrofit's own modeling_retrofit_attention.py, byte-identical" in " ".join(
        ours.output.split()), ours.output
    plain = CliRunner().invoke(main, ["inspect", str(tiny_llama), "--json"])
    assert json.loads(plain.output)["custom_code"]["verdict"] == "none"
    an_extra_key(scene)
    theirs = CliRunner().invoke(main, ["inspect", str(scene.model)])
    text = " ".join(theirs.output.split())
    assert theirs.exit_code == 0 and "custom code that is NOT llm-retrofit's: 'AutoConfig': " in text, theirs.output
    assert "retrofit eval and finetune refuse to load it" in text
    described = json.loads(CliRunner().invoke(main, ["inspect", str(scene.model), "--json"]).output)
    assert described["custom_code"]["verdict"] == "foreign"
    assert described["auto_map"] == {**OUR_ENTRY, "AutoConfig": "configuration_their.TheirConfig"}
    assert not scene.marker.exists()


def test_a_patch_that_carries_their_code_says_so(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llm_retrofit"):
        ours = CliRunner().invoke(main, ["patch", str(scene.model), "-p", "dtype:to=bfloat16", "-o", "ours"])
    assert ours.exit_code == 0 and "not llm-retrofit's" not in caplog.text, caplog.text
    a_hub_repo(scene)
    with caplog.at_level(logging.WARNING, logger="llm_retrofit"):
        theirs = CliRunner().invoke(main, ["patch", str(scene.model), "-p", "dtype:to=bfloat16", "-o", "theirs"])
    assert theirs.exit_code == 0, theirs.output
    assert "carries code that is not llm-retrofit's, from its source" in caplog.text
    assert "someone/sinks--modeling_retrofit_attention" in caplog.text and not scene.marker.exists()


# -- every other loader follows the same rule: the distillation teacher, calibration, an adapter's base ------------


LOADERS = [another_directory, a_hub_repo, only_their_code, an_extra_key, a_custom_generate]  # each imports a file
CALIBRATION = "gqa:num_key_value_heads=1,method=fit,calibration={docs},calibration_tokens=64"  # runs the model


def refused_with(problem: str, refused: pytest.ExceptionInfo[CheckpointError], scene: Scene) -> None:
    message = str(refused.value)
    assert message.startswith(f"{scene.model}") and problem in message, message  # the checkpoint (or a file of it)
    assert all(fix in " ".join(message.split()) for fix in FIX), message
    assert not scene.marker.exists()


@pytest.mark.parametrize("cache", [{}, {"top_k": 4, "cache": True}], ids=["live", "cached"])  # cached: loaded lazily
@pytest.mark.parametrize("attack", LOADERS, ids=ids)
def test_a_distillation_teacher_with_code_that_is_not_ours_is_refused(attack: Callable[[Scene], str], cache: dict,
                                                                       scene: Scene, sinks: Path) -> None:
    problem = attack(scene)
    before = snapshot(scene.model)
    with pytest.raises(CheckpointError) as refused:
        finetune(sinks, scene.tmp / "tuned", data=[str(scene.docs)], steps=1, seq_len=32, batch_size=1,
                 distill={"teacher": str(scene.model), **cache})
    refused_with(problem, refused, scene)
    assert snapshot(scene.model) == before
    assert not (scene.tmp / "tuned").exists() and not (scene.tmp / "tuned.distill-cache").exists()


@pytest.mark.parametrize("attack", LOADERS, ids=ids)
def test_a_calibration_on_code_that_is_not_ours_is_refused(attack: Callable[[Scene], str], scene: Scene) -> None:
    problem = attack(scene)
    before = snapshot(scene.model)
    with pytest.raises(CheckpointError) as refused:
        patch(scene.model, CALIBRATION.format(docs=scene.docs), output=scene.tmp / "fitted")
    refused_with(problem, refused, scene)
    assert snapshot(scene.model) == before and not (scene.tmp / "fitted").exists()


@pytest.fixture(scope="module")
def adapter(sinks: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained by our finetune on the sinks checkpoint (its base_model_name_or_path)."""
    docs = tmp_path_factory.mktemp("docs") / "docs.txt"
    docs.write_text("It was the best of times, it was the worst of times. " * 12)
    return finetune(sinks, tmp_path_factory.mktemp("adapter") / "adapter", data=[str(docs)], steps=1, seq_len=32,
                    batch_size=1, lora="lora:r=2,merge=false").path


@pytest.mark.parametrize("attack", LOADERS, ids=ids)
def test_an_adapter_whose_base_has_code_that_is_not_ours_is_refused(attack: Callable[[Scene], str], scene: Scene,
                                                                     adapter: Path) -> None:
    from llm_retrofit.training.lora import load_merged_adapter

    problem = attack(scene)
    theirs = scene.tmp / "adapter"
    shutil.copytree(adapter, theirs)
    config = json.loads((theirs / "adapter_config.json").read_text())
    (theirs / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(scene.model)}))
    before = snapshot(scene.model)
    with pytest.raises(CheckpointError) as refused:
        load_merged_adapter(theirs)
    refused_with(problem, refused, scene)
    assert snapshot(scene.model) == before


def ran_our_sinks_file(model: torch.nn.Module, sinks: Path) -> bool:
    """The class came from the checkpoint's own copy of our file (transformers names the module after the folder)."""
    return (type(model).__name__ == "RetrofitLlamaForCausalLM"
            and type(model).__module__.startswith(f"transformers_modules.{sinks.name}."))


def test_a_teacher_with_our_code_runs_it(sinks: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs.txt"
    docs.write_text("It was the best of times, it was the worst of times. " * 12)
    # The student is its own teacher: the KL is 0 only if the teacher runs the sinks pattern the student trains with
    # (as the plain Llama it sees every token, and its distribution differs: a KL near 1e-3 here).
    tuned = finetune(sinks, tmp_path / "tuned", data=[str(docs)], steps=1, seq_len=32, batch_size=1,
                     distill={"teacher": str(sinks)})
    assert tuned.kl_losses == [pytest.approx(0.0, abs=1e-6)], tuned.kl_losses


def test_a_calibration_on_our_code_runs_it(sinks: Path) -> None:
    from llm_retrofit.io.checkpoint import load_checkpoint
    from llm_retrofit.modeling.activations import _runnable
    from llm_retrofit.plan import checkpoint_view

    calibrated, _, _ = _runnable(checkpoint_view(load_checkpoint(sinks)))  # the skeleton its layers run in
    assert ran_our_sinks_file(calibrated, sinks), type(calibrated)


def test_an_adapter_on_our_code_runs_it(sinks: Path, adapter: Path) -> None:
    from llm_retrofit.training.lora import load_merged_adapter

    merged = load_merged_adapter(adapter)
    assert ran_our_sinks_file(merged, sinks), type(merged)
