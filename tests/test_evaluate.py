"""Perplexity: the chunked NLL is transformers' loss, the protocols score what they promise, and the accounting adds up.

Tolerances: the chunked NLL and transformers' `labels=` loss run the same float32 operations on the same numbers,
only over different slices (matrix products over 7 rows instead of 200 may round differently in the last bit), so
they agree to ~1e-6; 1e-5 is asserted. Sums over documents are compared with a relative 1e-6 for the same reason.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_model
from llm_retrofit import EvaluationError
from llm_retrofit.evaluation.perplexity import (
    Window,
    document_nll,
    iter_document_nll,
    perplexity,
    shares_prefixes,
    windows,
)
from llm_retrofit.modeling.nll import NLL, check_head, sequence_nll, token_nll


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def labels_loss(model, ids: torch.Tensor, scored_from: int = 1) -> float:
    """Vanilla transformers: mean loss over the labels that are not -100."""
    labels = ids.clone()
    labels[:, : scored_from] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def hf_guide_loop(model, ids: torch.Tensor, length: int, stride: int) -> NLL:
    """The Hugging Face perplexity guide's window loop, counting exactly the predictions each window's loss averages."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + length, ids.size(1))
        window = ids[:, begin:end]
        targets = window.clone()
        targets[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=targets).loss.item()
        scored = int((targets[:, 1:] != -100).sum())
        total, count, previous_end = total + loss * scored, count + scored, end
        if end == ids.size(1):
            break
    return NLL(total, count)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_nll_equals_labels_loss(chunk_size: int) -> None:
    model = tiny_model()
    ids = random_ids(3, 200)
    ours = token_nll(model, ids, chunk_size=chunk_size)
    assert ours.shape == (3, 199) and ours.dtype == torch.float32
    assert abs(ours.mean().item() - labels_loss(model, ids)) < 1e-5
    with torch.no_grad():  # and token by token, against a log-softmax of the full logits
        reference = -model(ids).logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_scoring_from_a_later_token_equals_labels_masked_with_minus_100() -> None:
    model = tiny_model()
    ids = random_ids(2, 150)
    ours = token_nll(model, ids, scored_from=100)
    assert ours.shape == (2, 50)
    assert abs(ours.mean().item() - labels_loss(model, ids, scored_from=100)) < 1e-5
    nll = sequence_nll(model, ids[0], scored_from=100)
    assert nll.tokens == 50 and math.isclose(nll.total, ours[0].double().sum().item(), rel_tol=1e-9)


def test_only_scored_positions_reach_the_lm_head_and_never_more_than_a_chunk() -> None:
    """The memory promise: full-vocabulary logits exist for at most chunk_size positions at a time."""
    model = tiny_model()
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[-2]))
    try:
        token_nll(model, random_ids(1, 300), scored_from=101, chunk_size=64)
    finally:
        hook.remove()
    assert sum(rows) == 199 and max(rows) == 64


def test_peak_memory_holds_a_chunk_of_logits_not_all_of_them() -> None:
    """At 8192 positions x 32768 vocabulary, full fp32 logits are 1.07 GB; transformers' labels= loss holds them (and
    a log-softmax of the same size). Our chunked NLL must stay under half of that. Each side runs in a fresh
    process; peak RSS growth is VmHWM after minus VmHWM after a warm-up forward on 16 tokens."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from conftest import tiny_model
        from llm_retrofit.modeling.nll import token_nll
        def peak(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        model = tiny_model(vocab_size=32768, max_position_embeddings=8192)
        ids = torch.randint(0, 32768, (1, 8192))
        run = (lambda x: token_nll(model, x)) if sys.argv[1] == "ours" else (lambda x: model(input_ids=x, labels=x))
        with torch.no_grad(): run(ids[:, :16])
        before = peak()
        with torch.no_grad(): run(ids)
        print(peak() - before)
    """)
    growth = {}
    for side in ("ours", "transformers"):
        done = subprocess.run([sys.executable, "-c", script, side], capture_output=True, text=True, check=True)
        growth[side] = int(done.stdout.split()[-1])
    full_logits = 8192 * 32768 * 4
    assert growth["transformers"] > full_logits, growth  # the baseline really does hold them
    assert growth["ours"] < full_logits / 2, growth


def test_truncate_windows_and_skips() -> None:
    assert windows(5000, 4096) == [Window(0, 4096, 1)]
    assert windows(4096, 4096) == [Window(0, 4096, 1)]
    assert windows(4095, 4096) == [] and windows(4095, 4096, "sliding", 1024) == []


@pytest.mark.parametrize(("n", "length", "stride"), [(1000, 256, 100), (1000, 256, 255), (257, 256, 1), (1024, 256, 128)])
def test_sliding_windows_score_every_token_once_with_at_least_length_minus_stride_context(n: int, length: int, stride: int) -> None:
    found = windows(n, length, "sliding", stride)
    scored = [t for w in found for t in range(w.scored_from, w.end)]
    assert scored == list(range(1, n)), "every predictable token, once, in order"
    for w in found:
        assert w.end - w.start <= length and w.start < w.scored_from <= w.end
        if w.start > 0:
            assert w.scored_from - w.start >= length - stride


def test_sliding_with_stride_equal_to_length_leaves_each_windows_first_token_unscored() -> None:
    """Non-overlapping windows give a window's first token no context, so (as in the guide) it is not scored."""
    found = windows(1000, 256, "sliding", 256)
    assert [(w.start, w.end, w.scored_from) for w in found] == [(0, 256, 1), (256, 512, 257), (512, 768, 513), (768, 1000, 769)]


def test_sliding_matches_the_hugging_face_guide_loop() -> None:
    model = tiny_model()
    ids = random_ids(1, 700)
    ours = document_nll(model, ids[0], 128, protocol="sliding", stride=48)
    theirs = hf_guide_loop(model, ids, 128, 48)
    assert ours is not None and ours.tokens == theirs.tokens == 699
    assert math.isclose(ours.total, theirs.total, rel_tol=1e-6)


def test_sliding_with_stride_equal_to_length_equals_truncate() -> None:
    model = tiny_model()
    doc = random_ids(384)
    for length in (64, 128, 384):  # a document of exactly the length, and of 3 and 6 lengths
        sliding = document_nll(model, doc[:length], length, protocol="sliding", stride=length)
        assert sliding == document_nll(model, doc[:length], length, protocol="truncate")
    # Over a longer document, non-overlapping windows are the truncated documents of its consecutive slices.
    sliding = document_nll(model, doc, 128, protocol="sliding", stride=128)
    slices = sum((document_nll(model, doc[i : i + 128], 128) for i in range(0, 384, 128)), NLL())
    assert sliding.tokens == slices.tokens == 3 * 127
    assert math.isclose(sliding.total, slices.total, rel_tol=1e-6)


def test_longrope_shares_a_pass_within_each_side_of_its_switch_and_equals_separate_passes() -> None:
    """LongRoPE's short factors hold up to the original context and its long ones past it: two groups of lengths,
    each run once at its longest, every length as exact as its own pass."""
    from llm_retrofit.modeling.rope import rope_length_classes

    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                "short_factor": [1.0] * 8, "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0]}  # head_dim 16
    model = tiny_model(max_position_embeddings=512, rope_parameters=longrope)  # 128 -> 512
    assert rope_length_classes(model, [64, 128, 384, 512]) == [[512, 384], [128, 64]]
    dynamic = tiny_model(max_position_embeddings=128, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 10000.0})
    assert rope_length_classes(dynamic, [64, 192, 256]) == [[256], [192], [64]]
    doc = random_ids(512, seed=6)
    run = perplexity(model, [doc], [64, 128, 384, 512])
    assert run.tokens_forwarded == 128 + 512 and run.shared_prefixes
    for result in run.lengths:
        alone = token_nll(model, doc[: result.length])
        assert math.isclose(result.nll, alone.double().sum().item(), rel_tol=1e-6), result.length


@pytest.mark.parametrize("protocol", ["truncate", "sliding"])
def test_short_documents_are_skipped_and_counted(protocol: str) -> None:
    model = tiny_model()
    docs = [random_ids(50, seed=1), random_ids(100, seed=2), random_ids(300, seed=3)]
    run = perplexity(model, docs, [64, 128, 256], protocol=protocol, names=["a", "b", "c"])
    by_length = {r.length: r for r in run.lengths}
    assert [by_length[n].skipped for n in (64, 128, 256)] == [1, 2, 2]
    assert [d.document for d in by_length[64].documents] == ["b", "c"]
    assert [d.document for d in by_length[256].documents] == ["c"]
    if protocol == "truncate":
        assert [by_length[n].tokens for n in (64, 128, 256)] == [2 * 63, 127, 255]
    else:  # the whole of each long-enough document is scored
        assert [by_length[n].tokens for n in (64, 128, 256)] == [99 + 299, 299, 299]
    for result in run.lengths:
        assert math.isclose(result.nll, sum(d.nll for d in result.documents), rel_tol=1e-12)
        assert result.tokens == sum(d.tokens for d in result.documents)


def test_no_document_long_enough_gives_no_perplexity_rather_than_a_number() -> None:
    run = perplexity(tiny_model(), [random_ids(10)], [64])
    assert run.lengths[0].tokens == 0 and run.lengths[0].perplexity is None and run.lengths[0].skipped == 1


def test_truncate_runs_each_document_once_and_equals_separate_passes() -> None:
    model = tiny_model()
    docs = [random_ids(300, seed=4), random_ids(100, seed=5)]
    run = perplexity(model, docs, [32, 64, 256])
    assert run.tokens_forwarded == 256 + 64, "one pass per document, at the largest length it fits"
    for result in run.lengths:
        separate = sum((document_nll(model, d, result.length) or NLL() for d in docs), NLL())
        assert result.tokens == separate.tokens
        assert math.isclose(result.nll, separate.total, rel_tol=1e-6)


def test_length_dependent_rope_gets_a_pass_per_length() -> None:
    """Dynamic NTK rescales RoPE once a sequence outgrows the context, so a prefix's NLL depends on what follows."""
    model = tiny_model(max_position_embeddings=128, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert not shares_prefixes(model, [64, 256]) and shares_prefixes(tiny_model(), [64, 256])
    doc = random_ids(256)
    run = perplexity(model, [doc], [64, 256])
    assert run.tokens_forwarded == 64 + 256
    alone = token_nll(model, doc[:64])
    assert math.isclose(run.lengths[0].nll, alone.double().sum().item(), rel_tol=1e-6)
    # Read off the long pass instead, the first 63 predictions would be off by up to ~1e-3 nats (float noise: ~1e-7).
    assert (alone - token_nll(model, doc)[:63]).abs().max() > 1e-4, "sharing would have been wrong here"
    plain = tiny_model()
    assert (token_nll(plain, doc[:64]) - token_nll(plain, doc)[:63]).abs().max() < 1e-5, "and is exact without it"


@pytest.mark.parametrize("protocol", ["truncate", "sliding"])
def test_batched_windows_equal_one_at_a_time(protocol: str) -> None:
    model = tiny_model()
    docs = [random_ids(200, seed=s) for s in range(5)]
    one = perplexity(model, docs, [64, 128], protocol=protocol, batch_size=1)
    three = perplexity(model, docs, [64, 128], protocol=protocol, batch_size=3)
    for a, b in zip(one.lengths, three.lengths):
        assert a.tokens == b.tokens and math.isclose(a.nll, b.nll, rel_tol=1e-6)


def test_documents_can_be_scored_one_at_a_time_and_abandoned() -> None:
    """A caller may stop after any document; the documents after it are never read."""
    model = tiny_model()
    docs = iter([random_ids(100), random_ids(10), random_ids(100)])
    scores = iter_document_nll(model, docs, 64)
    assert next(scores).tokens == 63 and next(scores) is None
    assert len(list(docs)) == 1, "the third document was not touched"


def test_protocol_mistakes_say_what_to_pass() -> None:
    model = tiny_model()
    with pytest.raises(EvaluationError, match="between 1 and the smallest length"):
        perplexity(model, [random_ids(100)], [64], protocol="sliding", stride=65)
    with pytest.raises(EvaluationError, match="not one of truncate, sliding"):
        perplexity(model, [random_ids(100)], [64], protocol="rolling")
    with pytest.raises(EvaluationError, match="only used by the sliding protocol"):
        perplexity(model, [random_ids(100)], [64], stride=32)
    with pytest.raises(EvaluationError, match="integers >= 2"):
        perplexity(model, [random_ids(100)], [])


def test_a_head_that_is_not_the_models_own_is_refused() -> None:
    model = tiny_model()
    check_head(model)  # a plain Llama passes
    other = torch.nn.Linear(64, 128, bias=False)
    with torch.no_grad():
        other.weight.copy_(model.lm_head.weight * 2)  # as logit scaling would
    model.get_output_embeddings = lambda: other
    with pytest.raises(EvaluationError, match="does more than a linear layer"):
        check_head(model)


def test_bfloat16_model_scores_in_float32() -> None:
    model = tiny_model().to(torch.bfloat16)
    ids = random_ids(1, 100)
    ours = token_nll(model, ids)
    assert ours.dtype == torch.float32
    # Same bf16 logits, same fp32 cross-entropy as transformers' loss: equal up to summation order.
    assert abs(ours.mean().item() - labels_loss(model, ids)) < 1e-5
