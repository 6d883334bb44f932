"""What only a GPU can check: the flash-attention backend, a bf16 finetune step, the LongRoPE search at 4x and the
eval at 32k on the real model. Marked `gpu`; each skips, saying why, where there is no CUDA device (or no
flash-attn package). On a GPU machine: `python -m pytest -m gpu`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import read_config, tiny_model
from test_finetune import chars_model, corpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]


def test_flash_attention_2_gives_sdpas_logits_and_perplexity(tmp_path: Path) -> None:
    pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    from transformers import AutoModelForCausalLM

    from llm_retrofit import evaluate

    path = tmp_path / "tiny"
    # head_dim 64: flash attention's kernels cover head dims that are multiples of 8 up to 256
    tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64).save_pretrained(path)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0)).cuda()
    logits, perplexities = {}, {}
    for impl in ("sdpa", "flash_attention_2"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=impl).cuda()
        with torch.no_grad():
            logits[impl] = model(input_ids=ids).logits.float()
        found = evaluate(model, [ids[0].tolist()], lengths=[128, 256], progress=False)
        perplexities[impl] = [r.perplexity for r in found.models[0].perplexity]
    # Two bf16 kernels with different summation orders: equal to bf16 rounding (8 mantissa bits).
    assert torch.allclose(logits["sdpa"], logits["flash_attention_2"], atol=5e-2, rtol=2e-2)
    assert perplexities["flash_attention_2"] == pytest.approx(perplexities["sdpa"], rel=1e-2)


def test_a_bf16_finetune_step_on_the_gpu_trains_and_saves_the_checkpoints_dtype(tmp_path: Path, caplog) -> None:
    import logging

    from llm_retrofit import finetune

    base = chars_model(tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="llm_retrofit"):
        result = finetune(base, tmp_path / "out", data=[str(corpus(tmp_path))], steps=4, seq_len=64, lr=1e-2,
                          bf16="auto")
    assert any(m.startswith("finetune: 4 steps") and m.endswith("bf16") for m in caplog.messages), caplog.messages
    assert all(math.isfinite(loss) for loss in result.losses) and result.losses[-1] < result.losses[0]
    assert read_config(result.path)["dtype"] == read_config(base)["dtype"], "saved in the checkpoint's own dtype"


def test_longrope_search_at_4x_finds_factors_that_read_32k_as_the_search_scored_them(smollm2: Path,
                                                                                      tmp_path: Path) -> None:
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from llm_retrofit import evaluate, patch
    from llm_retrofit.cli import main
    from llm_retrofit.evaluation.documents import load_documents

    factors, data = tmp_path / "factors.json", "bundled:python-source[1:2]"  # one ~62k-token document
    result = CliRunner().invoke(main, [
        "search-rope", str(smollm2), "--target-length", "32768", "--data", data, "--population", "4",
        "--iterations", "1", "--mutations", "2", "--crossovers", "2", "--parents", "2", "-o", str(factors),
    ])
    assert result.exit_code == 0, result.output
    found = json.loads(factors.read_text())
    assert found["target_length"] == 32768 and len(found["long_factor"]) == 32
    extended = patch(smollm2, f"longrope:factors={factors}", output=tmp_path / "extended")
    documents = load_documents([data])
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    after = evaluate(extended, documents, lengths=[32768], tokenizer=tokenizer, progress=False).models[0]
    before = evaluate(smollm2, documents, lengths=[32768], tokenizer=tokenizer, progress=False).models[0]
    # The saved model reads 32k as the search's KV-cached segments scored it (same arithmetic, other slices).
    assert after.perplexity[0].perplexity == pytest.approx(found["perplexity_at_target"], rel=1e-2)
    assert after.perplexity[0].perplexity < before.perplexity[0].perplexity / 2


def test_eval_at_32k_of_yarn_4x_is_finite_and_far_below_the_unpatched_model(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_retrofit import evaluate, patch
    from llm_retrofit.evaluation.documents import load_documents

    documents = load_documents(["bundled:python-source[1:2]"])  # ~62k SmolLM2 tokens: room for 32k
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base = AutoModelForCausalLM.from_pretrained(smollm2).cuda()
    before = evaluate(base, documents, lengths=[8192, 32768], tokenizer=tokenizer, progress=False).models[0]
    yarn = patch(base, "yarn:factor=4")
    after = evaluate(yarn, documents, lengths=[8192, 32768], tokenizer=tokenizer, progress=False).models[0]
    at = {r.length: r.perplexity for r in after.perplexity}
    assert all(math.isfinite(v) for v in at.values())
    assert at[32768] < before.perplexity[1].perplexity / 2, (at, before.perplexity)
