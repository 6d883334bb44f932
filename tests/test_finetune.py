"""The finetune engine: freeze specs keep frozen tensors bit-identical (float32 and bfloat16 checkpoints), budgets,
gradient accumulation and the schedule per optimizer step, new-layer bookkeeping, and 2 processes reading what 1 reads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_retrofit import patch
from llm_retrofit.training.finetune import FinetuneError, FinetuneSettings, finetune, new_layers_of
from conftest import char_tokenizer, read_config, save_tiny, state_of

TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. " * 40


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def chars_model(path: Path, **overrides) -> Path:
    save_tiny(path, **{"max_position_embeddings": 512, **overrides})
    char_tokenizer().save_pretrained(path)
    return path


def test_training_only_new_layers_leaves_every_other_tensor_bit_identical(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    expanded = patch(base, "expand:every=3", output=tmp_path / "expanded")  # 3 layers -> 4, layer 3 is new
    out = finetune(expanded, tmp_path / "out", data=[str(corpus(tmp_path))], steps=3, seq_len=32, lr=1e-2,
                   train=["new_layers"])
    before, after = state_of(expanded), state_of(out.path)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Exact equality: frozen tensors are never touched by the optimizer and go back to disk in their own dtype.
    assert changed and all(name.startswith("model.layers.3.") for name in changed), sorted(changed)
    record = read_config(out.path)["retrofit_history"][-1]
    assert record["patch"] == "finetune" and record["finetune"]["steps"] == 3


def test_frozen_tensors_of_a_bfloat16_checkpoint_stay_bit_identical(tmp_path: Path) -> None:
    """Training runs in float32; bf16 -> fp32 -> bf16 is exact, so what was not trained goes back as it came."""
    base = chars_model(tmp_path / "base")
    bf16 = patch(base, "dtype:to=bfloat16", "expand:every=3", output=tmp_path / "bf16")  # layer 3 is new
    out = finetune(bf16, tmp_path / "out", data=[str(corpus(tmp_path))], steps=3, seq_len=32, lr=1e-2,
                   train=["new_layers"])
    before, after = state_of(bf16), state_of(out.path)
    assert before.keys() == after.keys() and {t.dtype for t in after.values()} == {torch.bfloat16}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.3.") for name in changed), sorted(changed)
    assert read_config(out.path)["dtype"] == "bfloat16"


def same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    """Two runs trained the same steps on the same rows. Their gradients are summed in another order (one batch of 2
    rows, or 2 micro-batches, or 2 processes), so they differ by float32 rounding; Adam divides each gradient
    component by its own magnitude, which turns that into at most a small fraction of lr = 1e-2 per step (measured:
    ~5e-5). Other data or another number of optimizer steps moves weights by ~lr: 1e-3 tells the two apart."""
    assert a.keys() == b.keys() == base.keys()
    assert max((a[n] - base[n]).abs().max().item() for n in a) > 5e-3, "the runs did train"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-3, msg=name)


def test_gradient_accumulation_steps_the_optimizer_and_the_schedule_once_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = chars_model(tmp_path / "base")
    learning_rates: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        learning_rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    # float32: bf16 autocast (the default where the CPU has AMX) rounds a batch of 2 rows otherwise than 2 of 1 row
    common = dict(data=[str(corpus(tmp_path))], steps=3, seq_len=32, lr=1e-2, lr_schedule="linear", warmup_steps=0,
                  bf16=False)
    accumulated = finetune(base, tmp_path / "accumulated", batch_size=1, grad_accum=2, **common)
    # A linear decay over 3 optimizer steps: lr * (3 - k) / 3 at step k. Stepped per micro-batch instead, the schedule
    # would run out twice as fast (1e-2, 3.3e-3, 0) and the optimizer would step 6 times.
    assert learning_rates == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    learning_rates.clear()
    batched = finetune(base, tmp_path / "batched", batch_size=2, grad_accum=1, **common)
    assert learning_rates == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])

    assert accumulated.tokens == batched.tokens == 3 * 2 * 32
    # 2 micro-batches of 1 row == 1 batch of the same 2 rows: the mean of two row losses, either way.
    assert accumulated.losses == pytest.approx(batched.losses, rel=1e-6)
    same_training(state_of(accumulated.path), state_of(batched.path), state_of(base))


@pytest.mark.parametrize("tied", [False, True], ids=["untied-source", "tied-source"])  # the head is written untied
def test_router_only_finetune_of_an_upcycled_moe_changes_only_routers(tmp_path: Path, tied: bool) -> None:
    base = chars_model(tmp_path / "base", tie_word_embeddings=tied)
    moe = patch(base, "moe:num_experts=2,top_k=1", output=tmp_path / "moe")
    out = finetune(moe, tmp_path / "out", data=[str(corpus(tmp_path))], steps=2, seq_len=32, lr=1e-2, train=["router"])
    before, after = state_of(moe), state_of(out.path)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith("block_sparse_moe.gate.weight") or
                       name.endswith("mlp.gate.weight")}, sorted(changed)


def test_the_cli_takes_lr_groups_schedule_and_bf16(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llm_retrofit.cli import main

    base = chars_model(tmp_path / "base")
    moe = patch(base, "moe:num_experts=2,top_k=1", output=tmp_path / "moe")
    arguments = ["finetune", str(moe), "-o", str(tmp_path / "out"), "-d", str(corpus(tmp_path)), "--steps", "2",
                 "--seq-len", "32", "--train", "router", "--train", "experts", "--lr", "0", "--lr-group", "router=1e-2",
                 "--lr-schedule", "constant", "--warmup-steps", "0", "--bf16", "false"]
    done = CliRunner().invoke(main, arguments)
    assert done.exit_code == 0, done.output
    before, after = state_of(moe), state_of(tmp_path / "out")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("gate.weight") for name in changed), "experts train at lr 0, routers at 1e-2"
    assert read_config(tmp_path / "out")["retrofit_history"][-1]["finetune"]["lr_schedule"] == "constant"
    bad = CliRunner().invoke(main, [*arguments[:4], "--steps", "1", "--lr-group", "router"])
    assert bad.exit_code == 2 and "'router' is not NAME=LR" in bad.output


def test_new_layers_follow_a_second_expansion() -> None:
    # 2 layers, expand every=1 -> [0, new, 1, new]; expand every=2 on those 4 inserts after positions 1 and 3:
    # [0, n1, +, 1, n3, +] so the first expansion's layers 1 and 3 move to 1 and 4, and 2 and 5 are added.
    history = [{"patch": "expand", "new_layers": [1, 3]}, {"patch": "expand", "new_layers": [2, 5]}]
    assert new_layers_of(history) == [1, 2, 4, 5]
    # SOLAR's dus copies layers: a copy of a new layer is new.
    assert new_layers_of([{"patch": "expand", "new_layers": [1]}, {"patch": "dus", "layer_sources": [0, 1, 1, 2]}]) == [1, 2]


def test_a_freeze_spec_that_matches_nothing_names_the_aliases(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    with pytest.raises(FinetuneError, match="new_layers.*records no expansion"):
        finetune(base, tmp_path / "out", data=[str(corpus(tmp_path))], steps=1, seq_len=32, train=["new_layers"])
    with pytest.raises(FinetuneError, match="matches no parameter; aliases are new_layers, router"):
        finetune(base, tmp_path / "out", data=[str(corpus(tmp_path))], steps=1, seq_len=32, train=["router"])
    assert not (tmp_path / "out").exists()


def test_budget_is_steps_or_tokens_never_both() -> None:
    with pytest.raises(FinetuneError, match="exactly one budget"):
        FinetuneSettings(steps=10, tokens=1000)
    with pytest.raises(FinetuneError, match="steps=0 must be at least 1"):
        FinetuneSettings(steps=0)
    # YAML reads 1e-4 (no dot) as text: it is still a learning rate; a word is not.
    assert FinetuneSettings(steps=1, lr="1e-4", lr_groups={"router": "1e-3"}).lr_groups == {"router": 1e-3}
    with pytest.raises(FinetuneError, match="finetune: lr='fast' is not valid; expected a number"):
        FinetuneSettings(steps=1, lr="fast")
    # 1000 tokens at 32 x 2 x 2 per step on 2 processes: ceil(1000 / 256) = 4 steps.
    assert FinetuneSettings(tokens=1000, seq_len=32, batch_size=2, grad_accum=2).total_steps(processes=2) == 4


def test_lr_groups_and_eval_loss_are_applied(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    # lr 0 for everything but the norms: only norms may change, which shows the group lr reached the optimizer.
    result = finetune(base, tmp_path / "out", data=[str(corpus(tmp_path))], steps=2, seq_len=32, lr=0.0,
                      lr_groups={"norm": 1e-2}, eval_every=1, eval_sequences=2, lr_schedule="constant")
    before, after = state_of(base), state_of(result.path)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("norm" in name for name in changed), sorted(changed)
    assert [step for step, _ in result.eval_losses] == [1, 2]


DDP = ("--multi_gpu",)  # on CPU, accelerate launches torchrun with the gloo backend


def accelerate_launch(
    *arguments: str, strategy=DDP, processes: int = 2, program: tuple[str, ...] = ("-m", "llm_retrofit"),
    succeed: bool = True,
) -> subprocess.CompletedProcess:
    """`accelerate launch [strategy] -m llm_retrofit ARGUMENTS` (or another program) on CPU processes talking over
    gloo; asserts success."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    with socket.socket() as free:  # a fresh port each launch: back-to-back launches on one port can collide
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", *strategy, "--num_processes", str(processes),
               "--main_process_port", port,
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *program, *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == succeed, done.stderr[-3000:]
    return done


def launch_two_processes(tmp_path: Path, base: Path, out: Path, *options: str, strategy=DDP) -> subprocess.CompletedProcess:
    # float32, as the one-process runs these are compared with: bf16 rounds other batch shapes differently
    done = accelerate_launch("finetune", str(base), "-o", str(out), "-d", str(corpus(tmp_path)), "--steps", "2",
                             "--seq-len", "32", "--bf16", "false", *options, strategy=strategy)
    assert done.stdout.count("wrote") == 1  # only the main process writes and reports
    return done


def test_two_processes_read_the_rows_one_process_reads(tmp_path: Path) -> None:
    """Each of N processes reads its own rows of every micro-batch: 2 processes x 1 row read the rows 1 process x 2
    rows reads, and DDP's gradient average over the processes is the batch mean, with accumulation on either side."""
    base = chars_model(tmp_path / "base")
    done = launch_two_processes(tmp_path, base, tmp_path / "two", "--batch-size", "1", "--grad-accum", "2",
                                "--lr", "1e-2")
    assert "2 steps, 256 tokens" in done.stdout  # 2 steps x 2 micro-batches x 32 tokens x 2 processes
    one = finetune(base, tmp_path / "one", data=[str(corpus(tmp_path))], steps=2, seq_len=32, lr=1e-2, batch_size=2,
                   grad_accum=2, bf16=False)
    assert one.tokens == 2 * 32 * 2 * 2
    same_training(state_of(tmp_path / "two"), state_of(one.path), state_of(base))


def fsdp_on_cpu_processes() -> None:
    """accelerate 1.16 turns an FSDP plugin on only for GPU-like process groups (accelerate/state.py,
    AcceleratorState.__init__: MULTI_CPU is not among the types it checks), so on CPU processes `fsdp` would silently
    run DDP, and so would `accelerate launch --use_fsdp`. Here the state takes the plugin on CPU processes too, so
    that accelerate's own FSDP2 preparation (fully_shard of each layer, the head's group, the root) runs over gloo."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    initialise = AcceleratorState.__init__

    def with_fsdp(self, *args, fsdp_plugin=None, **kwargs):  # type: ignore[no-untyped-def]
        initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # Every later AcceleratorState() (the optimizer wrapper, autocast) copies the process group's type back.
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    AcceleratorState.__init__ = with_fsdp  # type: ignore[method-assign]


def train_and_measure(base: str, out: str, corpus_path: str, fsdp: str, batch_size: str) -> None:
    """A 2-step float32 finetune that writes OUT.RANK.json: its losses, the distributed type, and the most bytes of
    parameters + gradients + AdamW state this process held at an optimizer step (each tensor's local shard)."""
    import json

    from accelerate import PartialState
    from torch.distributed.tensor import DTensor

    held: list[int] = []
    step = torch.optim.AdamW.step

    def measured_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        done = step(self, *args, **kwargs)  # the gradients are still there: zero_grad comes after
        tensors = [t for group in self.param_groups for p in group["params"]
                   for t in (p, p.grad, *self.state[p].values()) if isinstance(t, torch.Tensor)]
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        held.append(sum(t.numel() * t.element_size() for t in local))
        return done

    torch.optim.AdamW.step = measured_step  # type: ignore[method-assign]
    if fsdp == "fsdp":
        fsdp_on_cpu_processes()
    try:
        result = finetune(base, out, data=[corpus_path], steps=2, seq_len=32, lr=1e-2, bf16=False,
                          batch_size=int(batch_size), fsdp=fsdp == "fsdp")
    finally:
        torch.optim.AdamW.step = step  # type: ignore[method-assign]
    from accelerate.state import AcceleratorState

    state = PartialState()
    Path(f"{out}.{state.process_index}.json").write_text(json.dumps({
        "losses": result.losses, "bytes": max(held), "type": str(AcceleratorState().distributed_type)}))


def test_fsdp_holds_half_the_training_state_per_process_and_trains_what_one_process_trains(tmp_path: Path) -> None:
    """`fsdp: true` under 2 processes (FSDP2 through accelerate, on CPU over gloo): each process holds half of the
    parameters, gradients and optimizer state that one process holds, and the loss curve and the weights written
    are the one-process run's (2 rows per step either way)."""
    import json

    base, data = chars_model(tmp_path / "base"), corpus(tmp_path)
    script = tmp_path / "measure.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from test_finetune import train_and_measure; train_and_measure(*sys.argv[1:])\n")
    accelerate_launch(str(base), str(tmp_path / "fsdp"), str(data), "fsdp", "1", program=(str(script),))
    train_and_measure(str(base), str(tmp_path / "one"), str(data), "none", "2")
    one = json.loads((tmp_path / "one.0.json").read_text())
    shards = [json.loads((tmp_path / f"fsdp.{rank}.json").read_text()) for rank in (0, 1)]
    assert {shard["type"] for shard in shards} == {"DistributedType.FSDP"} and one["type"] == "DistributedType.NO"
    # The mean of the same 2 rows' losses, summed in another order: equal to float32 rounding.
    for shard in shards:
        assert shard["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert shard["bytes"] == pytest.approx(one["bytes"] / 2, rel=0.02), (shard["bytes"], one["bytes"])
    # Reduce-scatter sums the two rows' gradients in another order than one process does: the same training.
    same_training(state_of(tmp_path / "fsdp"), state_of(tmp_path / "one"), state_of(base))


def test_two_process_lora_writes_one_adapter_that_vanilla_peft_loads(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = chars_model(tmp_path / "base", tie_word_embeddings=True)
    adapter = tmp_path / "adapter"
    launch_two_processes(tmp_path, base, adapter, "--lr", "1e-2", "--lora", "lora:r=4,trainable=embed_tokens+norm,merge=false")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(3, 127, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3)

def test_a_bf16_finetune_after_a_float32_one_in_the_same_process_runs(tmp_path: Path) -> None:
    # accelerate keeps one state per process; a recipe run (or a notebook) may finetune in float32 and then in bf16.
    base = chars_model(tmp_path / "base")
    options = dict(data=[str(corpus(tmp_path))], steps=1, seq_len=32)
    finetune(base, tmp_path / "fp32", bf16=False, **options)
    finetune(base, tmp_path / "bf16", bf16=True, **options)
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"  # the second finetune's own choice, not the first's


def spy_on_training(monkeypatch: pytest.MonkeyPatch) -> dict:
    """What `_setup` builds: the model as it trains and the loss (with distillation, its teacher)."""
    from llm_retrofit.training import finetune as module

    seen: dict = {}
    trainable_model, loss_for = module._trainable_model, module.loss_for

    def model_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        network, restore = trainable_model(*args, **kwargs)
        # as it trains: the save casts the model to the checkpoint's dtype in place
        seen["dtypes"] = {name: p.dtype for name, p in network.named_parameters()}
        seen["trained"] = {name for name, p in network.named_parameters() if p.requires_grad}
        return network, restore

    def loss_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["loss"] = loss_for(*args, **kwargs)
        return seen["loss"]

    monkeypatch.setattr(module, "_trainable_model", model_spy)
    monkeypatch.setattr(module, "loss_for", loss_spy)
    return seen


def test_a_lora_finetune_of_a_bfloat16_checkpoint_holds_its_frozen_weights_in_bfloat16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 autocast the frozen base stays bf16 (no float32 copy); the adapter and the extra trainables are
    float32 master weights; the teacher runs in its own dtype; the merged output is bf16 and differs from the base by
    what was trained."""
    from transformers import AutoModelForCausalLM

    base = chars_model(tmp_path / "base", tie_word_embeddings=True)
    bf16 = patch(base, "dtype:to=bfloat16", output=tmp_path / "bf16")
    seen = spy_on_training(monkeypatch)
    merged = finetune(bf16, tmp_path / "merged", data=[str(corpus(tmp_path))], steps=2, seq_len=32, lr=1e-2,
                      bf16=True, lora={"r": 4, "trainable": ["norm"]}, distill={"teacher": str(bf16), "alpha": 0.5})
    dtypes, trained = seen["dtypes"], seen["trained"]
    assert trained and {dtypes[n] for n in trained} == {torch.float32}
    assert {dtypes[n] for n in dtypes.keys() - trained} == {torch.bfloat16}, "no float32 copy of a frozen weight"
    assert {p.dtype for p in seen["loss"].distiller.model.parameters()} == {torch.bfloat16}, "the teacher as stored"

    after, before = state_of(merged.path), state_of(bf16)
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("q_proj" in n for n in changed) and any("norm" in n for n in changed)
    assert not any("mlp" in n for n in changed), "what LoRA did not touch goes back bit-identical"

    assert AutoModelForCausalLM.from_pretrained(merged.path).dtype == torch.bfloat16


def test_computing_in_float32_loads_the_model_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bf16 autocast the matrix products run in float32 and need float32 weights: a bf16 base is upcast."""
    base = chars_model(tmp_path / "base")
    bf16 = patch(base, "dtype:to=bfloat16", output=tmp_path / "bf16")
    seen = spy_on_training(monkeypatch)
    finetune(bf16, tmp_path / "out", data=[str(corpus(tmp_path))], steps=1, seq_len=32, bf16=False,
             lora={"r": 4})
    assert set(seen["dtypes"].values()) == {torch.float32}


def test_fsdp_on_cpu_processes_is_refused_not_run_as_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate shards only across GPUs: 2 CPU processes asked for FSDP (the setting, or accelerate launch's flag)
    are run as DDP by accelerate, each holding the whole model; the finetune refuses that before loading the model."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llm_retrofit.training.finetune import _check_sharding

    cpu_processes = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"))
    with pytest.raises(FinetuneError, match="FSDP was asked for, but accelerate runs these 2 cpu processes as "
                                            "DistributedType.MULTI_CPU .it shards only across GPUs.; drop fsdp"):
        _check_sharding(FinetuneSettings(steps=1, fsdp=True), cpu_processes)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(FinetuneError, match="FSDP was asked for"):
        _check_sharding(FinetuneSettings(steps=1), cpu_processes)
    _check_sharding(FinetuneSettings(steps=1, fsdp=True), SimpleNamespace(**{**vars(cpu_processes), "num_processes": 1}))
