"""Placement of a model that is run, not trained (modeling/placement.py): a model spread by accelerate over CPU memory
and disk, or split layer by layer, computes what the same model whole on one device computes; weights keep the
checkpoint's dtype; a placement that cannot be made is one clear EvaluationError before anything loads."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny

from llm_retrofit.cli import main
from llm_retrofit.errors import EvaluationError
from llm_retrofit.evaluation.passkey import greedy_answer
from llm_retrofit.evaluation.perplexity import evaluate, load_model, perplexity
from llm_retrofit.modeling import placement, precision
from llm_retrofit.modeling.devices import input_device
from llm_retrofit.modeling.rope import RopeShape
from llm_retrofit.modeling.rope_search import FactorEvaluator
from llm_retrofit.recipes.schema import EvalSettings

DOCUMENTS = [torch.randint(0, 128, (256,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
SPLIT = {  # layers and the head alternate between CPU memory and disk
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
    "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk",
}
PLACEMENTS = {
    "everything offloaded to disk (max_memory below one layer)": {"max_memory": "cpu=20KB"},
    "layers split between CPU memory and disk": {"device_map": SPLIT},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("placed") / "tiny", max_position_embeddings=128)


@pytest.fixture(scope="module")
def whole(checkpoint: Path):
    return load_model(checkpoint, device="cpu")[0]


def _nll(model) -> list[float]:
    return [result.nll for result in perplexity(model, DOCUMENTS, [64, 256]).lengths]


@pytest.mark.parametrize("options", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_a_placed_model_measures_what_the_whole_model_measures(checkpoint: Path, whole, options: dict) -> None:
    placed, _ = load_model(checkpoint, **options)
    assert "disk" in set(placed.hf_device_map.values())
    assert input_device(placed) == torch.device("cpu")
    for ours, reference in zip(_nll(placed), _nll(whole)):
        assert math.isclose(ours, reference, rel_tol=1e-6)
    prompt = DOCUMENTS[0][:100].tolist()
    assert greedy_answer(placed, prompt) == greedy_answer(whole, prompt)
    shape = RopeShape.of(whole.config.to_dict())
    factors = [1.5] * shape.pairs
    ours = FactorEvaluator(placed, DOCUMENTS, shape, 256, segments=2).score(factors)
    reference = FactorEvaluator(whole, DOCUMENTS, shape, 256, segments=2).score(factors)
    assert math.isclose(ours.nll, reference.nll, rel_tol=1e-6)


def test_a_model_that_does_not_fit_is_placed_by_accelerate_without_a_library_warning(
    checkpoint: Path, whole, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(placement, "free_memory", lambda device: 30_000)  # less than the tiny model's weights
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        placed, _ = load_model(checkpoint, device="cpu")
    assert "disk" in set(placed.hf_device_map.values())
    assert [r.name for r in caplog.records] == ["llm_retrofit.modeling.placement"]  # ours, saying what it did
    assert "do not fit" in caplog.records[0].getMessage()
    assert _nll(placed) == pytest.approx(_nll(whole), rel=1e-6)


def test_a_model_that_fits_goes_whole_onto_the_device_as_before(checkpoint: Path) -> None:
    model, _ = load_model(checkpoint)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not hasattr(model.model.embed_tokens, "_hf_hook")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny(tmp_path_factory.mktemp("bf16") / "tiny-bf16")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("native", [True, False], ids=["CPU with bf16 units", "AVX2 CPU"])
def test_bf16_weights_stay_bf16_on_every_cpu(
    bf16_checkpoint: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    for dtype in (None, "auto"):
        model, _ = load_model(bf16_checkpoint, dtype=dtype)
        assert model.dtype == torch.bfloat16
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    result = evaluate(bf16_checkpoint, DOCUMENTS, lengths=[64], dtype="auto", progress=False)
    assert result.models[0].info["dtype"] == "bfloat16"


BAD = {
    "malformed max_memory": ({"max_memory": "cpu:20GiB"}, "DEVICE=SIZE"),
    "unknown max_memory device": ({"max_memory": "gpu0=2GiB"}, "not a device; use cpu, mps or cuda:N"),
    "bad max_memory size": ({"max_memory": "cpu=lots"}, "is not a size; write it as 20GiB"),
    "unknown device_map": ({"device_map": "cdua"}, "neither a placement (auto"),
    "device and device_map": ({"device": "cpu", "device_map": "auto"}, "not both"),
    "one device and max_memory": ({"device_map": "cpu", "max_memory": "cpu=1GiB"}, "--device-map auto"),
}


@pytest.mark.parametrize(("options", "says"), BAD.values(), ids=BAD.keys())
def test_a_placement_that_cannot_be_made_is_one_clear_error(checkpoint: Path, options: dict, says: str) -> None:
    with pytest.raises(EvaluationError) as error:
        load_model(checkpoint, **options)
    assert says in str(error.value)


def test_cli_and_recipe_refuse_a_bad_max_memory_naming_the_format(checkpoint: Path) -> None:
    outcome = CliRunner().invoke(main, ["eval", str(checkpoint), "--data", "bundled:python-docs", "--lengths", "64",
                                        "--max-memory", "cpu=lots"])
    assert outcome.exit_code != 0 and "write it as 20GiB" in outcome.output and "Traceback" not in outcome.output
    with pytest.raises(EvaluationError, match="DEVICE=SIZE"):
        EvalSettings.read({"max_memory": "20GiB"})
    options = EvalSettings.read({"device_map": "auto", "max_memory": "cpu=1GiB", "dtype": "auto"}).evaluate_options()
    assert (options["device_map"], options["max_memory"], options["dtype"]) == ("auto", "cpu=1GiB", "auto")


def test_a_model_already_in_memory_is_placed_as_a_checkpoint_is(
    checkpoint: Path, whole, caplog: pytest.LogCaptureFixture
) -> None:
    """What the eval step does with an adapter merged onto its base: accelerate spreads the loaded model."""
    loaded, _ = load_model(checkpoint, device="cpu")
    with caplog.at_level(logging.WARNING):
        placed = placement.place_loaded(loaded, max_memory="cpu=20KB")
    assert not caplog.records
    assert "disk" in set(placed.hf_device_map.values())
    assert _nll(placed) == pytest.approx(_nll(whole), rel=1e-6)
    assert placement.place_loaded(load_model(checkpoint, device="cpu")[0]).device == torch.device("cpu")
