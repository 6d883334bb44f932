"""`llm_retrofit.evaluation.perplexity` and its result: the numbers are the NLL functions', and every rendering carries them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from llm_retrofit import EvalResult, EvaluationError, evaluate
from llm_retrofit.evaluation.perplexity import perplexity
from llm_retrofit.modeling.nll import token_nll

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. "
DOCS = [TEXT * 3, TEXT[:100], TEXT * 2]  # 330, 100 and 220 characters = tokens


@pytest.fixture(scope="module")
def result() -> EvalResult:
    a = evaluate(tiny_model(seed=0), DOCS, lengths=[64, 128, 512], tokenizer=char_tokenizer(), name="a", progress=False,
                 autocast="off", passkey=True, passkey_lengths=[400, 500], passkey_depths=[0.0, 1.0])
    b = evaluate(tiny_model(seed=1), DOCS, lengths=[64, 128, 512], tokenizer=char_tokenizer(), name="b", progress=False,
                 autocast="off", passkey=True, passkey_lengths=[400, 500], passkey_depths=[0.0, 1.0])
    return EvalResult.merge([a, b])


def test_evaluate_reports_the_nll_functions_numbers(result: EvalResult) -> None:
    model = tiny_model(seed=0)
    ids = [torch.tensor(char_tokenizer()(d)["input_ids"]) for d in DOCS]
    direct = perplexity(model, ids, [64, 128, 512])
    for ours, reference in zip(result.models[0].perplexity, direct.lengths):
        assert (ours.length, ours.tokens, ours.skipped) == (reference.length, reference.tokens, reference.skipped)
        assert math.isclose(ours.nll, reference.nll, rel_tol=1e-9)
    assert [r.skipped for r in result.models[0].perplexity] == [0, 1, 3]
    assert result.settings["documents"] == 3 and result.settings["protocol"] == "truncate"
    # And against plain transformers: each document long enough, cut to the length, scored by `labels=ids`; every
    # one has length - 1 predictions, so the perplexity is exp of the mean of their losses. Same float32 arithmetic
    # over other slices (a chunked LM head): equal to rounding, 1e-5 relative.
    for found in result.models[0].perplexity[:2]:
        losses = []
        with torch.no_grad():
            for doc in ids:
                if len(doc) >= found.length:
                    window = doc[None, : found.length]
                    losses.append(model(input_ids=window, labels=window).loss.item())
        assert found.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_bos_added_by_the_tokenizer_is_context_and_counts_towards_the_length() -> None:
    model, tokenizer = tiny_model(), char_tokenizer(bos=True)
    found = evaluate(model, [TEXT], lengths=[64], tokenizer=tokenizer, progress=False, autocast="off").models[0]
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]])
    assert ids[0, 0] == tokenizer.bos_token_id
    assert found.perplexity[0].tokens == 63, "64 tokens with the BOS, 63 predictions"
    with torch.no_grad():
        labels_loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(found.perplexity[0].nll / 63 - labels_loss) < 1e-5
    assert found.info["bos"].startswith("added by the tokenizer ('<s>', id 1)")
    assert evaluate(model, [TEXT], lengths=[64], tokenizer=char_tokenizer(), progress=False).models[0].info["bos"].startswith("none")


def test_evaluate_loads_a_checkpoint_directory(tiny_llama_chars: Path) -> None:
    found = evaluate(tiny_llama_chars, DOCS, lengths=[64], progress=False, autocast="off")
    model = found.models[0]
    assert model.name == str(tiny_llama_chars) and model.info["dtype"] == "float32" and model.info["device"] == "cpu"
    reference = token_nll(tiny_model(max_position_embeddings=512), torch.tensor(char_tokenizer()(DOCS[0])["input_ids"][:64]))
    assert math.isclose(model.perplexity[0].documents[0].nll, reference.double().sum().item(), rel_tol=1e-6)


def test_token_ids_need_no_tokenizer() -> None:
    found = evaluate(tiny_model(), [list(range(3, 103))], lengths=[50], progress=False)
    assert found.models[0].perplexity[0].tokens == 49
    with pytest.raises(EvaluationError, match="need a tokenizer"):
        evaluate(tiny_model(), ["text"], lengths=[50], progress=False)


def test_json_round_trips_every_number(result: EvalResult, tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    result.to_json(path)
    data = json.loads(path.read_text())
    assert EvalResult.from_json(path).to_dict() == data == result.to_dict()
    first = data["models"][0]
    at_64 = first["perplexity"][0]
    assert at_64["perplexity"] == pytest.approx(math.exp(at_64["nll"] / at_64["tokens"]))
    assert at_64["nll"] == pytest.approx(sum(d["nll"] for d in at_64["documents"]))
    assert first["perplexity"][2]["perplexity"] is None, "no document reaches 512 tokens: no number, not NaN"
    assert {"lengths", "protocol", "stride", "documents", "documents_xxh3", "bos", "passkey", "versions"} <= data["settings"].keys()
    assert len(first["passkey"]) == 4 and {c["depth"] for c in first["passkey_accuracy"]} == {0.0, 1.0}


def test_markdown_table_for_a_model_card(result: EvalResult) -> None:
    markdown = result.to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == "| model | 64 | 128 | 512 |" and lines[1] == "| --- | ---: | ---: | ---: |"
    a = result.models[0]
    assert lines[2] == f"| a | {a.perplexity[0].perplexity:.3f} | {a.perplexity[1].perplexity:.3f} | - |"
    assert lines[3].startswith("| b |")
    assert "skipped (64: 0, 128: 1, 512: 3)" in markdown
    assert "| model | length | depth 0% | depth 100% | mean |" in markdown


def test_terminal_table_shows_every_model(result: EvalResult) -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(result.table())
    text = console.export_text()
    assert "a " in text and "b " in text and f"{result.models[1].perplexity[0].perplexity:.3f}" in text
    assert "passkey accuracy: a" in text and "documents (skipped)" in text


def test_plot_is_a_valid_png(result: EvalResult, tmp_path: Path) -> None:
    from PIL import Image

    for path in (result.plot(tmp_path / "ppl.png"), result.plot_passkey(tmp_path / "passkey.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()  # checks the chunks and their CRCs
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300


def test_results_with_different_settings_are_not_put_side_by_side(result: EvalResult) -> None:
    other = evaluate(tiny_model(), DOCS, lengths=[64], tokenizer=char_tokenizer(), progress=False)
    with pytest.raises(EvaluationError, match="different settings \\(lengths\\)"):
        EvalResult.merge([result, other])
    with pytest.raises(EvaluationError, match="no passkey results"):
        other.plot_passkey("unused.png")
    shorter_keys = evaluate(tiny_model(), DOCS, lengths=[64, 128, 512], tokenizer=char_tokenizer(), progress=False,
                            autocast="off", passkey=True, passkey_lengths=[400], passkey_depths=[0.0, 1.0])
    with pytest.raises(EvaluationError, match="different settings \\(passkey\\)"):
        EvalResult.merge([result, shorter_keys])


def test_a_model_measured_without_the_passkey_sits_beside_those_measured_with_it(result: EvalResult) -> None:
    """A recipe may give the passkey to its own model only (each prompt is a forward pass at its length): the
    comparison keeps the passkey settings, and the model without it has no trials."""
    alone = evaluate(tiny_model(seed=2), DOCS, lengths=[64, 128, 512], tokenizer=char_tokenizer(), name="c",
                     progress=False, autocast="off")
    merged = EvalResult.merge([alone, result])
    assert merged.settings["passkey"] == result.settings["passkey"]
    assert [len(m.passkey) for m in merged.models] == [0, 4, 4]


def test_bf16_autocast_is_recorded_and_close_to_float32() -> None:
    model = tiny_model(seed=0)
    exact = evaluate(model, DOCS, lengths=[64], tokenizer=char_tokenizer(), progress=False, autocast="off").models[0]
    fast = evaluate(model, DOCS, lengths=[64], tokenizer=char_tokenizer(), progress=False, autocast="bf16").models[0]
    assert exact.info["arithmetic"] == "float32" and fast.info["arithmetic"] == "float32 weights, bfloat16 autocast"
    assert exact.perplexity[0].nll != fast.perplexity[0].nll, "bf16 products round differently"
    # bf16 keeps 8 bits of mantissa; accumulation and the softmax stay float32: the NLL moves by well under 1%.
    assert fast.perplexity[0].nll == pytest.approx(exact.perplexity[0].nll, rel=1e-2)
    assert model.dtype == torch.float32, "autocast leaves the weights as they are"


def test_autocast_choices_are_checked_before_anything_runs() -> None:
    with pytest.raises(EvaluationError, match="autocast 'fp8' is not one of auto, bf16, off"):
        evaluate(tiny_model(), DOCS, lengths=[64], tokenizer=char_tokenizer(), progress=False, autocast="fp8")
