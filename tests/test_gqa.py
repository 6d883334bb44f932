"""GQA / MQA pooling: fewer key/value heads, the same plain architecture, and a fitted merge that beats the mean.

Tiny random models are built here with head_dim 16 (8 RoPE pairs), so the per-pair key transform has room to act.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import char_tokenizer, read_config, state_of, tiny_model
from llm_retrofit import PatchError, PatchSpecError, patch, pool_kv_heads
from llm_retrofit.patchers import parse_spec
from llm_retrofit.patchers.gqa import Shape, _merge_keys, _rotate_queries

HEAD_DIM = 16
IDS = torch.randint(32, 127, (2, 40), generator=torch.Generator().manual_seed(0))


def _documentation() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# Two disjoint pieces of the standard library's documentation: one to fit on, one held out.
CALIBRATION_TEXT, HELD_OUT_TEXT = _documentation()[:6000], _documentation()[20000:21000]

def make(
    path: Path,
    model_type: str = "llama",
    heads: int = 4,
    kv_heads: int = 4,
    identical_within: int | None = None,
    sharp: float = 1.0,
    seed: int = 0,
    **overrides: object,
) -> Path:
    """A tiny model saved with the one-character tokenizer. `identical_within=m` copies the first KV head of each
    block of m into the others (k_proj and v_proj rows and biases); `sharp` scales q_proj and k_proj so that
    attention is far from uniform (at init scale every key looks alike and pooling keys would change nothing)."""
    model = tiny_model(model_type, seed=seed, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=HEAD_DIM, **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.mul_(sharp)
            if identical_within:
                for projection in (attention.k_proj, attention.v_proj):
                    for tensor in (t for t in (projection.weight, projection.bias) if t is not None):
                        blocks = tensor.view(kv_heads // identical_within, identical_within, HEAD_DIM, -1)
                        blocks[:, 1:] = blocks[:, :1].clone()
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def logits(model_or_path: torch.nn.Module | Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    model = model_or_path if isinstance(model_or_path, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(model_or_path)
    with torch.no_grad():
        return model.eval()(ids).logits


def text_ids(text: str) -> torch.Tensor:
    return torch.tensor([[ord(c) if 32 <= ord(c) < 127 or c == "\n" else 0 for c in text]])


def kl_to(original: torch.Tensor, pooled: torch.Tensor) -> float:
    """Mean KL(original || pooled) of the next-token distributions, in nats per token."""
    log_p, log_q = original.log_softmax(-1), pooled.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


# -- what a pooled model is ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_the_output_is_the_plain_architecture_with_fewer_kv_heads(model_type: str, tmp_path: Path) -> None:
    source = make(tmp_path / "m", model_type, heads=8, kv_heads=4, **({"sliding_window": 32} if model_type == "mistral" else {}))
    output = patch(source, "gqa:num_key_value_heads=2,calibration_tokens=512", output=tmp_path / "gqa")
    model = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no trust_remote_code
    assert type(model).__name__ == type(AutoModelForCausalLM.from_pretrained(source)).__name__
    config = read_config(output)
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 8
    assert config.get("sliding_window") == read_config(source).get("sliding_window")
    state = state_of(output)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * HEAD_DIM, 64)
    assert state["model.layers.0.self_attn.v_proj.weight"].shape == (2 * HEAD_DIM, 64)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (8 * HEAD_DIM, 64)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("method", ["mean", "first", "fit"])
@pytest.mark.parametrize(
    ("model_type", "heads", "kv_heads", "groups", "bias"),
    [
        ("llama", 4, 4, 2, False),  # MHA -> GQA
        ("llama", 4, 4, 1, False),  # MHA -> MQA
        ("mistral", 8, 4, 2, False),  # GQA -> fewer groups
        ("llama", 4, 4, 2, True),  # attention_bias: biases merged and rotated with their rows
    ],
)
def test_heads_identical_within_groups_pool_exactly(
    method: str, model_type: str, heads: int, kv_heads: int, groups: int, bias: bool, tmp_path: Path
) -> None:
    source = make(tmp_path / "m", model_type, heads, kv_heads, identical_within=kv_heads // groups, sharp=4.0,
                  attention_bias=bias)
    calibration = ",calibration_tokens=512" if method == "fit" else ""
    output = patch(source, f"gqa:num_key_value_heads={groups},method={method}{calibration}", output=tmp_path / "gqa")
    # mean and first compute the very same numbers. fit rotates and rescales each query pair by the inverse of what
    # it applied to the merged key, in float64 then rounded to float32: logits agree to float32 rounding.
    torch.testing.assert_close(logits(output), logits(source), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fit_is_closer_to_the_original_than_mean_and_first_on_held_out_text(bias: bool, tmp_path: Path) -> None:
    source = make(tmp_path / "m", heads=4, kv_heads=4, sharp=4.0, attention_bias=bias)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(CALIBRATION_TEXT)
    held_out = text_ids(HELD_OUT_TEXT).view(4, 250)  # within the tiny models' 256 positions
    original = logits(source, held_out)
    distance = {}
    for method in ("mean", "first", "fit"):
        spec = f"gqa:num_key_value_heads=1,method={method}" + (f",calibration={calibration}" if method == "fit" else "")
        distance[method] = kl_to(original, logits(patch(source, spec, output=tmp_path / method), held_out))
    assert distance["fit"] < distance["mean"] and distance["fit"] < distance["first"], distance


def test_the_per_pair_key_transform_commutes_with_rope() -> None:
    """Scaling and rotating a key head's RoPE pair (i, i + d/2) by a complex c, and its query by 1 / conj(c), leaves
    q.k after transformers' own RoPE unchanged at every pair of positions; mixing two pairs does not."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    shape = Shape(heads=1, kv_heads=1, groups=1, head_dim=HEAD_DIM)  # one head, merged with itself
    q_rows, k_rows = torch.randn(HEAD_DIM, 32, generator=generator), torch.randn(HEAD_DIM, 32, generator=generator)
    x = torch.randn(5, 32, generator=generator)
    c = torch.complex(torch.randn(1, 1, HEAD_DIM // 2, generator=generator), torch.randn(1, 1, HEAD_DIM // 2, generator=generator))
    k_new = _merge_keys(k_rows, c.to(torch.complex128), shape)
    q_new = _rotate_queries(q_rows, (1 / c.conj()).to(torch.complex128), shape)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=HEAD_DIM, num_attention_heads=1, rope_theta=10000.0))

    def scores(q_weight: torch.Tensor, k_weight: torch.Tensor, positions: list[int]) -> torch.Tensor:
        position_ids = torch.tensor([positions])
        cos, sin = rotary(x[None], position_ids)
        q, k = (x[None, None, : len(positions)] @ w.T for w in (q_weight, k_weight))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q[0, 0] @ k[0, 0].T

    for positions in ([0, 1, 2, 3, 4], [7, 100, 1000, 4097, 30000]):
        torch.testing.assert_close(scores(q_new, k_new, positions), scores(q_rows, k_rows, positions), rtol=1e-4, atol=1e-4)
    # The control: a transform that mixes pair 0 into pair 1 is undone in the queries too, yet does not commute.
    mix = torch.eye(HEAD_DIM)
    mix[1, 0] = 0.7
    mixed = scores(torch.linalg.inv(mix).T @ q_rows, mix @ k_rows, [7, 100, 1000, 4097, 30000])
    assert not torch.allclose(mixed, scores(q_rows, k_rows, [7, 100, 1000, 4097, 30000]), rtol=1e-2, atol=1e-2)
    # ... although at a single shared position the same transform is invisible, which is why positions differ above.
    torch.testing.assert_close(scores(torch.linalg.inv(mix).T @ q_rows, mix @ k_rows, [0] * 5),
                               scores(q_rows, k_rows, [0] * 5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["mean", "first", "fit"])
def test_streamed_and_in_memory_give_the_same_weights(method: str, tmp_path: Path) -> None:
    source = make(tmp_path / "m", heads=8, kv_heads=4, sharp=4.0, attention_bias=True)
    spec = f"gqa:num_key_value_heads=2,method={method}" + (",calibration_tokens=512" if method == "fit" else "")
    streamed = state_of(patch(source, spec, output=tmp_path / "gqa"))
    loaded = AutoModelForCausalLM.from_pretrained(source)
    loaded.name_or_path = str(source)  # where the in-memory calibration finds the tokenizer
    in_memory = {name: t.detach() for name, t in patch(loaded, spec).state_dict().items()}
    assert streamed.keys() <= in_memory.keys()
    for name, tensor in streamed.items():
        # Both executors run the same fp32 model on the same tokens through the same code: bit-identical.
        assert torch.equal(tensor, in_memory[name]), name


def test_python_api_pools_a_loaded_model(tmp_path: Path) -> None:
    source = make(tmp_path / "m", heads=4, kv_heads=4, identical_within=2)
    model = AutoModelForCausalLM.from_pretrained(source)
    pooled = pool_kv_heads(model, 2, method="mean")
    assert pooled.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(pooled), logits(model), rtol=0, atol=1e-5)
    written = pool_kv_heads(source, 1, method="fit", calibration_tokens=256, output=tmp_path / "mqa")
    assert read_config(written)["num_key_value_heads"] == 1


def test_a_dry_run_of_fit_loads_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llm_retrofit.cli import main

    source = make(tmp_path / "m", heads=4, kv_heads=4)
    for file in source.glob("tokenizer*"):
        file.unlink()  # were the dry run to load the model for calibration, it would fail here
    result = CliRunner().invoke(main, ["patch", str(source), "-p", "gqa:num_key_value_heads=2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "num_key_value_heads: 4 -> 2" in result.output


# -- what is refused -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [3, 4, 8])
def test_a_group_count_that_does_not_divide_the_kv_heads_is_refused_with_the_valid_ones(groups: int, tmp_path: Path) -> None:
    source = make(tmp_path / "m", heads=8, kv_heads=4)
    with pytest.raises(PatchError, match=rf"num_key_value_heads={groups} must be fewer than this model's 4 .*use one of \[1, 2\]"):
        patch(source, f"gqa:num_key_value_heads={groups},method=mean", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_model_with_one_kv_head_has_nothing_to_pool(tmp_path: Path) -> None:
    source = make(tmp_path / "m", heads=4, kv_heads=1)
    with pytest.raises(PatchError, match="it has only one, so there is nothing to pool"):
        patch(source, "gqa:num_key_value_heads=1,method=mean", output=tmp_path / "x")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gqa", "needs num_key_value_heads"),
        ("gqa:num_key_value_heads=0", "must be a positive integer"),
        ("gqa:num_key_value_heads=1,method=avg", "expected one of mean, first, fit"),
        ("gqa:num_key_value_heads=1,method=mean,calibration=bundled:python-docs", "read only by method=fit"),
        ("gqa:num_key_value_heads=1,calibration_tokens=4", "calibration_tokens=4 is too few"),
    ],
)
def test_impossible_settings_are_refused(spec: str, message: str) -> None:
    with pytest.raises(PatchSpecError, match=message):
        parse_spec(spec)


def test_the_api_checks_the_method_too(tmp_path: Path) -> None:
    """The API reads its values with the spec's reader: the same message as `gqa:...,method=avg`."""
    with pytest.raises(PatchSpecError, match="patch 'gqa': method='avg' is not valid; expected one of mean, first, fit"):
        pool_kv_heads(tmp_path, 1, method="avg")


def test_fit_after_another_patch_is_refused(tmp_path: Path) -> None:
    source = make(tmp_path / "m", heads=4, kv_heads=4)
    with pytest.raises(PatchError, match="gqa: method=fit runs the model .* make it the first patch"):
        patch(source, "dtype:to=bfloat16", "gqa:num_key_value_heads=2", output=tmp_path / "x")


def test_a_bad_calibration_source_fails_before_anything_is_written(tmp_path: Path) -> None:
    from llm_retrofit import DataError

    source = make(tmp_path / "m", heads=4, kv_heads=4)
    with pytest.raises(DataError):
        patch(source, f"gqa:num_key_value_heads=2,calibration={tmp_path / 'nowhere.txt'}", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- recovery: distillation from the original model ------------------------------------------------------------------


def test_the_pooled_model_trains_under_distillation(tmp_path: Path) -> None:
    from llm_retrofit.training.finetune import finetune

    source = make(tmp_path / "m", heads=4, kv_heads=4, sharp=4.0)
    pooled = patch(source, "gqa:num_key_value_heads=1,method=mean", output=tmp_path / "pooled")
    text = tmp_path / "train.txt"
    text.write_text(CALIBRATION_TEXT)
    result = finetune(pooled, tmp_path / "out", data=[str(text)], seq_len=64, steps=60, batch_size=2, lr=3e-3,
                      lr_schedule="constant", bf16=False, distill={"teacher": "base", "alpha": 1.0})
    # The training loss falls: the last 6 steps against the first 6 (12 rows each).
    assert sum(result.losses[-6:]) < 0.5 * sum(result.losses[:6]), result.losses
    # And the model moved towards the original on text it never trained on, measured here with transformers alone:
    # the KL of its next-token distributions to the original's.
    held_out = text_ids(HELD_OUT_TEXT).view(4, 250)
    original = logits(source, held_out)
    assert kl_to(original, logits(result.path, held_out)) < 0.5 * kl_to(original, logits(pooled, held_out))
    record = read_config(result.path)["retrofit_history"]
    assert [r["patch"] for r in record] == ["gqa", "finetune"]
    assert record[-1]["params"]["distill"]["teacher"] == str(source.resolve())  # teacher: base is the unpooled model


def test_the_card_states_the_kv_cache_saving(tmp_path: Path) -> None:
    from llm_retrofit.publishing.card import render_card

    source = make(tmp_path / "m", heads=4, kv_heads=4)
    pooled = patch(source, "gqa:num_key_value_heads=1,method=mean", output=tmp_path / "pooled")
    # 3 layers x (keys + values) x head_dim 16 x 4 bytes (float32) = 384 bytes per KV head.
    assert read_config(pooled)["retrofit_history"][-1]["kv_cache_bytes_per_token"] == {
        "before": 4 * 384, "after": 384, "dtype": "float32"}
    card = render_card(pooled).read_text()
    assert "KV cache per token: 1,536 bytes before, 384 after (float32), 75% smaller." in card
    halved = patch(patch(source, "dtype:to=bfloat16", output=tmp_path / "bf16"), "gqa:num_key_value_heads=2,method=mean",
                   output=tmp_path / "bf16-gqa")
    assert "768 bytes before, 384 after (bfloat16), 50% smaller" in render_card(halved).read_text()
