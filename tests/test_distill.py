"""Distillation in the finetune: the loss is (1 - alpha) * LM + alpha * T^2 * KL(teacher || student), computed from
hidden states a chunk of positions at a time; the teacher is live, or its top-k log-probs come from a cache on disk.

The tiny models are random Llamas built here (conftest's `tiny_model`, 128-token vocabulary, a character tokenizer),
so every number below is computed in milliseconds on a CPU.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm_retrofit import patch
from llm_retrofit.training.distill import (DistillSpec, TopK, distill_loss, kl_full, kl_top_k, parse_distill,
                                           top_k_of)
from llm_retrofit.training.finetune import FinetuneError, FinetuneSettings, finetune
from conftest import char_tokenizer, read_config, save_tiny, state_of, tiny_model
from test_finetune import chars_model, corpus, same_training


def student_model(path: Path, seed: int, sharpness: float = 1.0) -> Path:
    """A tiny model with the character tokenizer; another seed is another random model with the same vocabulary.
    `sharpness` scales the LM head: a random model's next-token distribution is nearly uniform, a scaled one's is
    peaked, as a trained teacher's is (so there is something to learn from it)."""
    model = tiny_model(seed=seed, max_position_embeddings=512)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def common(tmp_path: Path, **options):  # type: ignore[no-untyped-def]
    return dict(data=[str(corpus(tmp_path))], seq_len=32, **options)


# -- the maths ---------------------------------------------------------------------------------------------------


def test_kl_with_the_teacher_as_the_student_is_zero() -> None:
    logits = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 3
    # The same log-softmax on both sides: every term p * (log p - log q) is exactly 0.
    assert torch.equal(kl_full(logits, logits.clone(), 2.0), torch.zeros(6))
    # Top k: the kept tokens cancel exactly, and the tail term is eps * log(eps / r) with r the student's mass off
    # the teacher's top k, which is eps again (up to float32 rounding of a sum over 120 tokens).
    assert kl_top_k(logits, top_k_of(logits, 8, 2.0), 2.0).abs().max() < 1e-6


def test_the_loss_matches_a_hand_computed_example() -> None:
    """Two positions, a vocabulary of 4, T = 2, alpha = 0.25, written out with explicit softmax formulas."""
    student = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.3, 0.1, -0.4]]
    teacher = [[2.0, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -2.0]]
    targets = [0, 1]
    T, alpha = 2.0, 0.25

    def softmax(row: list[float], t: float) -> list[float]:
        exps = [math.exp(x / t) for x in row]
        return [e / sum(exps) for e in exps]

    kl = [T * T * sum(p * math.log(p / q) for p, q in zip(softmax(t, T), softmax(s, T)))
          for s, t in zip(student, teacher)]
    ce = [-math.log(softmax(s, 1.0)[y]) for s, y in zip(student, targets)]
    expected_total = (1 - alpha) * sum(ce) / 2 + alpha * sum(kl) / 2
    # d total / d logits: (1 - alpha) (softmax(s) - onehot) / N + alpha T (softmax(s/T) - softmax(t/T)) / N
    expected_grad = [[(1 - alpha) * (softmax(s, 1.0)[i] - (i == y)) / 2
                      + alpha * T * (softmax(s, T)[i] - softmax(t, T)[i]) / 2 for i in range(4)]
                     for s, t, y in zip(student, teacher, targets)]

    hidden = torch.tensor(student, requires_grad=True)  # the identity head: the hidden states are the logits
    loss = distill_loss(torch.nn.Identity(), hidden, torch.tensor(targets), torch.tensor(teacher),
                        temperature=T, alpha=alpha, chunk=1)
    loss.total.backward()
    assert loss.total.item() == pytest.approx(expected_total, rel=1e-6)
    assert loss.kl.item() == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert loss.lm.item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    torch.testing.assert_close(hidden.grad, torch.tensor(expected_grad), rtol=1e-5, atol=1e-7)


def test_top_k_kl_is_below_the_full_kl_by_exactly_the_tails_share_and_its_gradient_within_2_T_eps() -> None:
    """The stated bound (training/distill.py): 0 <= KL - KL_K = eps * KL(p_tail/eps || q_tail/r), and per position
    |grad KL_K - grad KL|_1 <= 2 T eps w.r.t. the student's logits. The tail divergence is computed here from the
    full distributions with explicit masks, not with the code's formula."""
    generator = torch.Generator().manual_seed(1)
    T, k = 1.5, 16
    teacher = torch.randn(32, 128, generator=generator) * 2
    student = (teacher + torch.randn(32, 128, generator=generator)).requires_grad_(True)
    cached = top_k_of(teacher, k, T)
    full, truncated = kl_full(student, teacher, T), kl_top_k(student, cached, T)

    p, q = F.softmax(teacher / T, -1).double(), F.softmax(student.detach() / T, -1).double()
    off = torch.ones_like(p, dtype=torch.bool).scatter(-1, cached.indices, False)
    eps, r = (p * off).sum(-1), (q * off).sum(-1)
    tail_kl = torch.where(off, (p / eps[:, None]) * ((p / eps[:, None]) / (q / r[:, None])).log(), 0).sum(-1)
    torch.testing.assert_close(eps, cached.tail.double(), rtol=1e-5, atol=1e-7)
    assert (truncated <= full + 1e-5).all()
    torch.testing.assert_close((full - truncated).double(), T * T * eps * tail_kl, rtol=1e-3, atol=2e-5)

    grad_full, = torch.autograd.grad(full.sum(), student)
    grad_top, = torch.autograd.grad(kl_top_k(student, cached, T).sum(), student)
    gap = (grad_full - grad_top).abs().sum(-1).double()
    assert (gap <= 2 * T * eps + 1e-5).all(), (gap - 2 * T * eps).max()
    assert gap.max() > 0.05 * (2 * T * eps).max(), "the tails differ, so the gradients do (the bound is not vacuous)"


def test_alpha_zero_is_exactly_the_lm_loss() -> None:
    model = tiny_model().train()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    reference = model(input_ids=ids, labels=ids).loss
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 64)
    teacher = torch.randn(hidden.shape[0], 128)
    loss = distill_loss(model.lm_head, hidden, ids[:, 1:].reshape(-1), teacher, temperature=2.0, alpha=0.0, chunk=7)
    assert torch.equal(loss.total, loss.lm), "alpha 0 is the LM loss itself, not lm + 0 * kl"
    assert loss.kl.item() > 0, "the KL is still measured"
    grads = torch.autograd.grad(loss.total, list(model.parameters()))
    # transformers' loss sums the same cross-entropies in another order (one pass instead of chunks of 7): equal up
    # to float32 rounding.
    assert loss.total.item() == pytest.approx(reference.item(), rel=1e-6)
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_a_finetune_with_alpha_zero_trains_what_the_plain_finetune_trains(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    teacher = student_model(tmp_path / "teacher", seed=3)
    plain = finetune(base, tmp_path / "plain", **common(tmp_path, steps=3, lr=1e-2))
    distilled = finetune(base, tmp_path / "distilled",
                         **common(tmp_path, steps=3, lr=1e-2, distill={"teacher": str(teacher), "alpha": 0.0}))
    assert distilled.losses == pytest.approx(plain.losses, rel=1e-5)
    assert distilled.lm_losses == distilled.losses and min(distilled.kl_losses) > 0
    same_training(state_of(plain.path), state_of(distilled.path), state_of(base))


# -- the finetune ------------------------------------------------------------------------------------------------


def test_a_student_that_is_its_teacher_has_zero_kl(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    expanded = patch(base, "expand:every=3", output=tmp_path / "expanded")  # the same function as base at init
    result = finetune(expanded, tmp_path / "out", **common(tmp_path, steps=1, distill={"teacher": "base"}))
    # The new block adds exact zeros, so both models compute the same logits bit for bit before the first update.
    assert result.kl_losses == [0.0]
    assert result.distill is not None and result.distill["teacher_path"] == str(base.resolve())


def test_a_teacher_larger_than_memory_is_placed_and_teaches_the_same(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_retrofit.modeling import placement

    real_load = placement.load_placed
    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0, sharpness=8.0)
    settings = common(tmp_path, steps=2, distill={"teacher": str(teacher), "alpha": 1.0})
    whole = finetune(student, tmp_path / "whole", **settings)
    # A machine with 1 kB free: the teacher no longer fits whole, so accelerate keeps every weight on disk.
    monkeypatch.setattr(placement, "free_memory", lambda device: 1024)
    loaded = []
    monkeypatch.setattr(placement, "load_placed", lambda *args: loaded.append(real_load(*args)) or loaded[-1])
    placed = finetune(student, tmp_path / "placed", **settings)
    assert set(loaded[0].hf_device_map.values()) == {"disk"}
    assert placed.kl_losses == pytest.approx(whole.kl_losses, rel=1e-6)


@pytest.mark.parametrize("options", [
    pytest.param({}, id="full"),
    # The two random models' LM heads differ most: the adapter trains a copy of the head too (a peft
    # modules_to_save wrapper, which the chunked loss must reach through).
    pytest.param({"lora": {"r": 8, "alpha": 16, "target_modules": "all-linear", "trainable": "lm_head+norm"},
                  "gradient_checkpointing": True}, id="lora-gradient-checkpointing"),
    pytest.param({"distill_extra": {"top_k": 16, "cache": True}}, id="top-k-cached"),
    pytest.param({"s2_attn": True}, id="s2-attn"),  # the student trains with shifted groups, the teacher does not
])
def test_a_student_learns_its_teacher(tmp_path: Path, options: dict) -> None:
    options = dict(options)
    extra = options.pop("distill_extra", {})
    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0, sharpness=8.0)
    spec = {"teacher": str(teacher), "temperature": 1.0, "alpha": 1.0} | extra
    # 2 rows per step over the corpus's rows, for 3 epochs: the same rows come back, so a falling KL is learning.
    options = {"lr": 1e-2} | options
    result = finetune(student, tmp_path / "out", **common(tmp_path, steps=12, batch_size=2, lr_schedule="constant",
                                                          distill=spec, **options))
    before, after = kl_on_the_corpus(student, teacher, tmp_path), kl_on_the_corpus(result.path, teacher, tmp_path)
    assert after < 0.7 * before, (before, after)
    assert result.losses == result.kl_losses, "alpha 1: the loss is the KL alone"


def kl_on_the_corpus(student: Path, teacher: Path, tmp_path: Path) -> float:
    """KL(teacher || student) per position over the corpus's first 256 characters, with transformers' own loading
    (an adapter through peft) and softmaxes written here: a measure of the result independent of the training code."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[ord(c) for c in corpus(tmp_path).read_text()[:256]]])
    if (student / "adapter_config.json").is_file():
        model = AutoPeftModelForCausalLM.from_pretrained(student)
    else:
        model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        q = model(input_ids=ids).logits.log_softmax(-1)
        p = AutoModelForCausalLM.from_pretrained(teacher)(input_ids=ids).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_cached_top_k_gives_the_live_top_k_loss_and_the_second_run_never_loads_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0)
    spec = {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.5, "top_k": 16}
    settings = common(tmp_path, steps=4, batch_size=2, lr=1e-2)
    live = finetune(student, tmp_path / "live", **settings, distill=spec)
    shared = tmp_path / "shared-cache"
    first = finetune(student, tmp_path / "first", **settings, distill=spec | {"cache": str(shared)})
    assert first.distill["cache_rows_computed"] > 0
    # The cache holds exactly what the live run computed: the same losses, to the bit.
    assert first.losses == live.losses and first.kl_losses == live.kl_losses

    from transformers import AutoModelForCausalLM

    loaded: list[str] = []
    load = AutoModelForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        loaded.append(str(path))
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    second = finetune(student, tmp_path / "second", **settings, distill=spec | {"cache": str(shared)})
    assert second.distill["cache_rows_computed"] == 0 and second.distill["cache_rows_read"] > 0
    assert str(teacher.resolve()) not in loaded and loaded, "the student was loaded, the teacher was not"
    assert second.losses == live.losses
    # The teacher's mass outside its top 16 (of a 128-token, nearly uniform random model): reported, and it bounds
    # the gradient gap (previous tests).
    assert 0 < second.distill["teacher_tail_mass"] < 1


def test_a_cache_made_for_other_rows_or_another_teacher_is_not_reused(tmp_path: Path) -> None:
    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0)
    other = student_model(tmp_path / "other", seed=2)
    cache = str(tmp_path / "cache")
    spec = {"teacher": str(teacher), "top_k": 8, "cache": cache}
    first = finetune(student, tmp_path / "a", **common(tmp_path, steps=2), distill=spec)
    runs = {
        "seq_len": finetune(student, tmp_path / "b", **(common(tmp_path, steps=2) | {"seq_len": 48}), distill=spec),
        "teacher": finetune(student, tmp_path / "c", **common(tmp_path, steps=2), distill=spec | {"teacher": str(other)}),
        "top_k": finetune(student, tmp_path / "d", **common(tmp_path, steps=2), distill=spec | {"top_k": 4}),
    }
    for what, run in runs.items():
        assert run.distill["cache_rows_read"] == 0 and run.distill["cache_rows_computed"] > 0, what
        assert run.distill["cache_dir"] != first.distill["cache_dir"], what
    again = finetune(student, tmp_path / "e", **common(tmp_path, steps=2), distill=spec)
    assert again.distill["cache_rows_computed"] == 0 and again.distill["cache_dir"] == first.distill["cache_dir"]


def test_a_damaged_cached_row_is_computed_again(tmp_path: Path) -> None:
    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0)
    spec = {"teacher": str(teacher), "top_k": 8, "cache": str(tmp_path / "cache")}
    first = finetune(student, tmp_path / "a", **common(tmp_path, steps=1), distill=spec)
    rows = sorted(Path(first.distill["cache_dir"]).glob("row-*.pt"))
    rows[0].write_bytes(rows[0].read_bytes()[:100])  # cut short, as a full disk would leave it
    again = finetune(student, tmp_path / "b", **common(tmp_path, steps=1), distill=spec)
    assert again.distill["cache_rows_computed"] == 1 and again.losses == first.losses


def test_the_history_record_and_the_card_show_the_distillation(tmp_path: Path) -> None:
    from llm_retrofit.publishing.card import render_card

    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0)
    result = finetune(student, tmp_path / "out", **common(tmp_path, steps=2),
                      distill={"teacher": str(teacher), "temperature": 2.0, "alpha": 0.75})
    record = read_config(result.path)["retrofit_history"][-1]
    assert record["params"]["distill"] == {"teacher": str(teacher.resolve()), "temperature": 2.0, "alpha": 0.75,
                                           "top_k": None, "final_kl": round(result.kl_losses[-1], 5)}
    assert record["finetune"]["final_lm_loss"] == round(result.lm_losses[-1], 5)
    assert result.to_json()["distill"]["final_kl"] == result.kl_losses[-1]
    assert str(teacher.resolve()) in render_card(result.path).read_text()


def test_the_cli_takes_distill_and_documents_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llm_retrofit.cli import main

    help_text = " ".join(CliRunner().invoke(main, ["finetune", "--help"]).output.split())
    assert "--distill SPEC Distil a teacher, e.g. teacher=base,temperature=2,alpha=0.5" in help_text
    assert "--distill teacher=base,temperature=2,alpha=0.9,top_k=64,cache=true" in help_text  # the example
    base = chars_model(tmp_path / "base")
    expanded = patch(base, "expand:every=3", output=tmp_path / "expanded")
    done = CliRunner().invoke(main, ["finetune", str(expanded), "-o", str(tmp_path / "out"), "-d",
                                     str(corpus(tmp_path)), "--steps", "2", "--seq-len", "32", "--bf16", "false",
                                     "--distill", "teacher=base,temperature=2,alpha=0.5,top_k=8,cache=true"])
    assert done.exit_code == 0, done.output
    # teacher == student at the first step; in float32 (under bf16 autocast the top-k tail term of two equal models
    # can round to just below zero, printed -0.0000)
    assert ", kl 0.0000 -> " in done.output
    assert list((tmp_path / "out.distill-cache").iterdir()), "cache: true keeps the cache beside the output"


def test_a_recipe_distils_from_its_input_model(tmp_path: Path) -> None:
    from llm_retrofit.recipes.runner import run_recipe
    from llm_retrofit.recipes.schema import parse_recipe

    base = chars_model(tmp_path / "base")
    recipe = parse_recipe(
        "name: distil\ndescription: expand, then train the new block against the input model\nsteps:\n"
        "  - patch: expand\n    with: {every: 3}\n"
        f"  - finetune:\n      data: [{corpus(tmp_path)}]\n      seq_len: 32\n      steps: 2\n"
        "      train: [new_layers]\n      distill: {teacher: base, temperature: 2.0, alpha: 0.9, top_k: 8, cache: true}\n",
        "distil.yaml")
    run = run_recipe(base, recipe, output=tmp_path / "run")
    result = run.results["finetune"]
    assert result["distill"]["teacher_path"] == str(base.resolve()) and result["distill"]["first_kl"] < 1e-6
    assert Path(result["distill"]["cache_dir"]).is_relative_to(tmp_path / "run"), "the cache is in the run's directory"


# -- bad settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distill, message", [
    pytest.param({"teacher": "base", "temprature": 2}, r"distill has no parameter 'temprature'; its parameters are "
                 r"teacher \(str\), temperature \(float\), alpha", id="unknown-key"),
    pytest.param({"teacher": "base", "temperature": 0}, "distill: temperature=0 must be above 0", id="temperature-0"),
    pytest.param({"teacher": "base", "temperature": -1}, "distill: temperature=-1 must be above 0",
                 id="temperature-negative"),
    pytest.param({"teacher": "base", "alpha": 1.5}, r"distill: alpha=1.5 must be in \[0, 1\]", id="alpha-above-1"),
    pytest.param({"teacher": "base", "alpha": -0.1}, r"distill: alpha=-0.1 must be in \[0, 1\]", id="alpha-negative"),
    pytest.param({"alpha": 0.5}, "distill: give the teacher, e.g. distill: {teacher: base", id="no-teacher"),
    pytest.param({"teacher": "base", "cache": True}, "distill: cache: true stores the teacher's top_k log-probs",
                 id="cache-without-top-k"),
    pytest.param({"teacher": "base", "top_k": 0}, "distill: top_k=0 must be at least 1", id="top-k-0"),
    pytest.param({"teacher": "base", "temperature": "hot"}, "distill: temperature='hot' is not valid; expected a number",
                 id="temperature-not-a-number"),
    pytest.param("teacher=base,alpha", "'teacher=base,alpha': 'alpha' is not key=value", id="cli-text-without-a-value"),
    pytest.param({"teacher": "base", "cache": "yes"}, "distill: cache: true stores", id="cache-yes-is-true-as-text"),
    pytest.param(7, "distill=7 is not valid; expected a mapping", id="not-a-mapping"),
])
def test_a_bad_distill_setting_is_one_clear_error(distill: object, message: str) -> None:
    with pytest.raises(FinetuneError, match=message) as caught:
        FinetuneSettings(steps=1, distill=distill)
    assert len(str(caught.value).splitlines()) == 1


def test_the_cli_text_and_the_mapping_are_the_same_spec() -> None:
    assert parse_distill("teacher=base,temperature=2,alpha=0.25,top_k=32,cache=true") == DistillSpec(
        "base", 2.0, 0.25, 32, True)
    assert parse_distill("distill:teacher=t/,cache=out/cache,top_k=4").cache == "out/cache"


def test_a_teacher_that_cannot_be_found_is_refused_before_training(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    data = common(tmp_path, steps=1)
    with pytest.raises(FinetuneError, match="distill: teacher=.*nowhere does not exist; give a checkpoint directory"):
        finetune(base, tmp_path / "out", **data, distill={"teacher": str(tmp_path / "nowhere")})
    with pytest.raises(FinetuneError, match="teacher: base means the model before the patch, but this checkpoint's "
                                            "history records no patch"):
        finetune(base, tmp_path / "out", **data, distill={"teacher": "base"})
    expanded = patch(base, "expand:every=3", output=tmp_path / "expanded")
    patch(base, "dtype:to=bfloat16", in_place=True)  # in place: the expansion's source now holds other weights
    with pytest.raises(FinetuneError, match="it holds other weights than the patch was applied to"):
        finetune(expanded, tmp_path / "out", **data, distill={"teacher": "base"})
    gone = chars_model(tmp_path / "gone")
    orphan = patch(gone, "expand:every=3", output=tmp_path / "orphan")
    shutil.rmtree(gone)
    with pytest.raises(FinetuneError, match=r"teacher: base is .*gone \(the source of the 'expand' patch in the "
                                            r"history\), which no longer exists"):
        finetune(orphan, tmp_path / "out", **data, distill={"teacher": "base"})
    other_vocabulary = save_tiny(tmp_path / "wide", vocab_size=256, max_position_embeddings=512)
    with pytest.raises(FinetuneError, match="has a vocabulary of 256 tokens and the student 128"):
        finetune(base, tmp_path / "out", **data, distill={"teacher": str(other_vocabulary)})
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.distill-cache").exists()


def test_the_top_k_of_a_whole_vocabulary_is_the_full_kl() -> None:
    """k = V keeps every token: no tail (eps = 0), and the lumped KL is the full one."""
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(5, 128, generator=generator), torch.randn(5, 128, generator=generator)
    everything = top_k_of(teacher, 128, 1.0)
    assert torch.equal(everything.tail, torch.zeros(5))
    torch.testing.assert_close(kl_top_k(student, everything, 1.0), kl_full(student, teacher, 1.0), rtol=1e-5, atol=1e-6)
    assert isinstance(everything[1:3], TopK) and len(everything[1:3]) == 2


def test_two_processes_distil_what_one_process_distils(tmp_path: Path) -> None:
    """DDP: each process computes its rows' loss through the chunked head, outside the model's forward; the gradients
    of the decoder and of the head must still be averaged over the processes (2 x 1 row == 1 x 2 rows)."""
    from test_finetune import accelerate_launch

    student = student_model(tmp_path / "student", seed=1)
    teacher = student_model(tmp_path / "teacher", seed=0, sharpness=8.0)
    spec = {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.5, "top_k": 16, "cache": True}
    done = accelerate_launch("finetune", str(student), "-o", str(tmp_path / "two"), "-d", str(corpus(tmp_path)),
                             "--steps", "2", "--seq-len", "32", "--batch-size", "1", "--lr", "1e-2", "--bf16", "false",
                             "--distill", ",".join(f"{k}={v}" for k, v in spec.items()))
    assert done.stdout.count("wrote") == 1 and ", kl " in done.stdout
    # float32 in both: bf16 autocast (the default where the CPU has AMX) rounds a batch of 2 rows otherwise than 2 of 1
    one = finetune(student, tmp_path / "one", **common(tmp_path, steps=2, batch_size=2, lr=1e-2, bf16=False),
                   distill=spec)
    same_training(state_of(tmp_path / "two"), state_of(one.path), state_of(student))
    rows = {p.name for p in (tmp_path / "two.distill-cache").rglob("row-*.pt")}
    assert rows == {p.name for p in (tmp_path / "one.distill-cache").rglob("row-*.pt")}, "each row cached once"
