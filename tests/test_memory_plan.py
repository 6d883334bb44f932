"""The memory plan: what `--dry-run` says each step holds at its peak, and the refusal of a step that will not fit.

The parameter counts are checked against transformers' and peft's own models (independent references); the refusals
by making the machine look small (the free memory the plan reads is replaced, nothing else)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llm_retrofit.cli import main
from llm_retrofit.modeling import memory
from llm_retrofit.modeling.cost import Pass
from llm_retrofit.modeling.cost import Shape
from llm_retrofit.modeling.memory import footprint
from llm_retrofit.recipes import RecipeError, dry_run

from conftest import save_tiny, tiny_model

SHAPES = {
    "llama": ("llama", {}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": 64}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


@pytest.mark.parametrize("name", SHAPES)
def test_the_plan_counts_the_parameters_transformers_builds(name: str) -> None:
    model_type, overrides = SHAPES[name]
    model = tiny_model(model_type, **overrides)
    assert Shape.of(model.config.to_dict()).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", ["lora:r=8", "lora:r=4,target_modules=all-linear",
                                  "lora:r=16,trainable=embed_tokens+norm", "lora:r=2,target_modules=q_proj+down_proj"])
def test_an_adapter_trains_as_many_parameters_as_peft_makes_trainable(spec: str) -> None:
    from llm_retrofit.training.lora import parse_lora

    lora = parse_lora(spec)
    model = tiny_model()
    trainable = sum(p.numel() for p in lora.attach(model).parameters() if p.requires_grad)
    assert lora.trained_parameters(model.config.to_dict()) == trainable


def test_weights_are_held_in_the_dtype_each_pass_keeps() -> None:
    config = tiny_model().config.to_dict() | {"dtype": "bfloat16"}
    params = Shape.of(config).params
    assert footprint(Pass(64, config)).weights == 2 * params  # eval: the checkpoint's own dtype
    assert footprint(Pass(64, config, training=True, adapter_params=100)).weights == 2 * params + 4 * 100
    full = footprint(Pass(64, config, training=True))
    assert (full.weights, full.training_state) == (4 * params, 12 * params)  # float32 masters, grads, AdamW moments
    shape = Shape.of(config)  # the embedding, then one layer at a time, in float32
    assert footprint(Pass(64, config, streamed=4096)).weights == 4 * max(shape.layer_params, shape.vocab * shape.hidden)


def test_calibration_memory_does_not_grow_with_depth() -> None:
    """The issue's target: a calibration's peak grows by at most 1.3x from 30 to 120 layers."""
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
              "vocab_size": 49152, "tie_word_embeddings": True, "num_hidden_layers": 30}
    shallow = footprint(Pass(2048, config, streamed=8192)).total
    deep = footprint(Pass(2048, config | {"num_hidden_layers": 120}, streamed=8192)).total
    assert deep == shallow


@pytest.fixture
def small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one with 1 GB free."""
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 1 << 30)
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


LONG_FINETUNE = """
name: too-long
description: a full finetune at a length no small machine holds
steps:
  - finetune: {steps: 1, seq_len: 131072}
"""


def test_a_recipe_step_that_will_not_fit_is_refused_before_anything_runs(tmp_path: Path, small_machine: None) -> None:
    model = save_tiny(tmp_path / "tiny")
    recipe = tmp_path / "too-long.yaml"
    recipe.write_text(LONG_FINETUNE)
    with pytest.raises(RecipeError, match=r"step finetune will not fit in memory.*1.07 GB free.*gradient_checkpointing"):
        dry_run(model, recipe)
    result = CliRunner().invoke(main, ["patch", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "will not fit in memory" in result.output
    assert not (tmp_path / "out").exists()


def test_an_eval_larger_than_memory_is_placed_not_refused(tmp_path: Path, small_machine: None) -> None:
    """Weights that do not fit go to disk (accelerate's placement); only what runs beside them must fit."""
    model = save_tiny(tmp_path / "tiny", hidden_size=1024, intermediate_size=4096, vocab_size=32000)  # 0.4 GB
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("name: e\ndescription: an eval\nsteps:\n  - eval: {lengths: [64], data: [bundled:python-docs]}\n")
    plan = dry_run(model, recipe)  # 1.07 GB free: less than the whole 1.19 GB, more than all but the weights
    assert "1.19 GB (weights 0.45 GB placed over CPU memory and disk where short" in plan


def test_the_dry_run_prints_each_steps_peak_and_the_largest(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "tiny")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LONG_FINETUNE.replace("131072", "128"))
    lines = dry_run(model, recipe).splitlines()
    step = lines.index("1. finetune (finetune)")
    assert any(line.startswith("   peak memory: ") and "training state" in line for line in lines[step:])
    assert lines[-1].startswith("peak memory:") and "(finetune)" in lines[-1] and "free on cpu" in lines[-1]


def test_a_patch_dry_run_says_what_it_holds(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "tiny")
    streamed = CliRunner().invoke(main, ["patch", str(model), "--patch", "dtype:to=float16", "--dry-run"])
    assert "peak memory: a few tensors at a time" in streamed.output
    fitted = CliRunner().invoke(main, ["patch", str(model), "--patch", "gqa:num_key_value_heads=1,method=fit",
                                       "--dry-run"])
    assert fitted.exit_code == 0 and "peak memory: " in fitted.output and "weights" in fitted.output


def test_a_calibration_that_will_not_fit_is_refused(tmp_path: Path, small_machine: None) -> None:
    model = save_tiny(tmp_path / "tiny")
    result = CliRunner().invoke(main, ["patch", str(model), "--patch",
                                       "gqa:num_key_value_heads=1,method=fit,calibration_tokens=100000000",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "will not fit in memory" in result.output and "calibration_tokens" in result.output
    assert not (tmp_path / "out").exists()


# -- the estimates against measured peaks -----------------------------------------------------------------------------

MEASURE_PEAK = """
import sys
from llm_retrofit.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("VmHWM", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def measured_peak(*args: str) -> int:
    """The peak RSS in bytes of `retrofit ARGS` in a fresh interpreter (everything it loads and runs counted)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split("VmHWM")[-1].split()[0]) * 1024


def smollm2_steps(model: Path, scratch: Path) -> dict[str, tuple[list[str], Pass]]:
    """Each kind of step as the CLI runs it on SmolLM2-135M, and the pass the plan prices it by. Training runs in
    float32 (`--bf16 false`), what the plan counts; under bf16 autocast the activations are smaller."""
    from llm_retrofit.io.checkpoint import load_checkpoint
    from llm_retrofit.training.lora import parse_lora

    config = dict(load_checkpoint(model).config)
    lora = parse_lora("lora:r=16,trainable=embed_tokens+norm")
    training = ["--data", "bundled:python-docs", "--steps", "1", "--bf16", "false", "--gradient-checkpointing"]
    return {
        "eval": (["eval", str(model), "--lengths", "2048", "--data", "bundled:python-docs", "--max-docs", "1",
                  "--autocast", "off"], Pass(2048, config)),
        "gqa-fit": (["patch", str(model), "--patch", "gqa:num_key_value_heads=1,method=fit,calibration_tokens=8192",
                     "-o", str(scratch / "gqa")], Pass(2048, config, streamed=8192)),
        "finetune-lora": (["finetune", str(model), "--lora", lora.spec(), "--seq-len", "2048", *training,
                           "-o", str(scratch / "lora")],
                          Pass(2048, config, training=True, checkpointing=True,
                               adapter_params=lora.trained_parameters(config))),
        "finetune-full": (["finetune", str(model), "--seq-len", "1024", *training, "-o", str(scratch / "full")],
                          Pass(1024, config, training=True, checkpointing=True)),
    }


@pytest.mark.parametrize("step", ["eval", "gqa-fit", "finetune-lora", "finetune-full"])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(step: str, smollm2: Path, tmp_path: Path) -> None:
    argv, priced = smollm2_steps(smollm2, tmp_path)[step]
    estimate, peak = footprint(priced).total, measured_peak(*argv)
    assert abs(estimate - peak) <= 0.25 * peak, f"{step}: estimated {estimate / 1e9:.2f} GB, measured {peak / 1e9:.2f} GB"
