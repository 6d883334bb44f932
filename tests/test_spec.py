"""Patch specs (`name:key=value,...`): typed, and every mistake answered with the valid choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from llm_retrofit import PatchSpecError
from llm_retrofit.patchers import parse_spec, registry
from llm_retrofit.patchers.dtype import CastDtype
from llm_retrofit.spec import WrongValue, read_value


def test_a_spec_becomes_a_typed_patcher() -> None:
    assert parse_spec("dtype:to=bfloat16") == CastDtype(to=torch.bfloat16)
    assert parse_spec(" dtype : to = BF16 ") == CastDtype(to=torch.bfloat16)


def test_params_round_trip_through_the_spec() -> None:
    patcher = parse_spec("dtype:to=fp16")
    assert patcher.params() == {"to": "float16"}
    assert parse_spec(patcher.spec()) == patcher


def test_every_registered_patcher_has_a_working_example() -> None:
    for name, cls in registry().items():
        assert parse_spec(cls.example).name == name
        assert cls.summary()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", r"unknown patch 'bogus'; the patches are: .*dtype"),
        ("dtype:too=bf16", r"has no parameter 'too'; its parameters are to \(dtype: .*bfloat16"),
        ("dtype:to=int3", r"to='int3' is not valid; expected one of float32, fp32, bfloat16"),
        ("dtype", r"needs to\. Example: dtype:to=bfloat16"),
        ("dtype:bfloat16", r"'bfloat16' is not key=value\. Example: dtype:to=bfloat16"),
    ],
)
def test_bad_specs_name_the_problem_and_the_fix(spec: str, message: str) -> None:
    with pytest.raises(PatchSpecError, match=message):
        parse_spec(spec)


def _float_parameters() -> list[tuple[str, str]]:
    """(patch, key) for every number-valued parameter of every registered patcher (float, or float | None)."""
    import dataclasses
    import typing

    found = []
    for name, cls in sorted(registry().items()):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if float in (hints[field.name], *typing.get_args(hints[field.name])):
                found.append((name, field.name))
    return found


def test_every_patcher_has_number_parameters_to_check() -> None:
    assert {("linear", "factor"), ("yarn", "beta_fast"), ("llama3", "low_freq_factor"), ("moe", "noise")} <= set(
        _float_parameters()
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
@pytest.mark.parametrize(("name", "key"), _float_parameters())
def test_no_patcher_takes_a_number_that_is_not_finite(name: str, key: str, value: str) -> None:
    """nan and inf parse as Python floats; they would reach config.json as non-standard JSON (issue 12, 4.7)."""
    example = registry()[name].example
    arguments = [a for a in example.partition(":")[2].split(",") if a and not a.startswith(f"{key}=")]
    with pytest.raises(PatchSpecError, match=f"{key}='{value}' is not valid; expected a finite number"):
        parse_spec(f"{name}:{','.join([*arguments, f'{key}={value}'])}")


def test_a_key_given_twice_is_refused_not_silently_the_last() -> None:
    given_twice = "'linear:factor=2,factor=3': factor is given twice; give each parameter once"
    with pytest.raises(PatchSpecError, match=given_twice):
        parse_spec("linear:factor=2,factor=3")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("llama3:factor=8,low_freq_factor=4,high_freq_factor=1", r"0 < low_freq_factor < high_freq_factor"),
        ("llama3:factor=8,low_freq_factor=4,high_freq_factor=4", r"0 < low_freq_factor < high_freq_factor"),
        ("llama3:factor=8,low_freq_factor=0", r"0 < low_freq_factor < high_freq_factor \(wavelengths above"),
        ("yarn:factor=2,beta_fast=1,beta_slow=32", r"0 < beta_slow < beta_fast \(rotations"),
        ("yarn:factor=2,beta_slow=0", r"0 < beta_slow < beta_fast"),
        ("expand:num_new_layers=0", r"num_new_layers=0 must be a positive integer \(the layers to add\)"),
        ("expand:every=0", r"every=0 must be a positive integer \(original layers per added one\)"),
        ("expand:every=-2", r"every=-2 must be a positive integer"),
        ("longrope:factors=f.json,attention_factor=0", r"attention_factor=0.0 must be a finite number > 0"),
        ("linear:target_length=0", r"target_length=0 must be a positive token count"),
    ],
)
def test_values_outside_their_range_say_the_range(spec: str, message: str) -> None:
    with pytest.raises(PatchSpecError, match=message):
        parse_spec(spec)


def test_a_direct_construction_is_held_to_the_same_ranges() -> None:
    """The Python API builds patchers without the spec parser: the dataclass checks its own values."""
    from llm_retrofit.patchers.rope import LinearRope

    with pytest.raises(PatchSpecError, match="factor=nan must be a finite number > 1"):
        LinearRope(factor=float("nan"))


# -- the one value reader: the grammar of docs/specs.md, written out value by value ------------------------------

READS = [  # (value, annotation, what it reads as)
    ("true", bool, True), ("YES", bool, True), ("1", bool, True), (" yes ", bool, True), (True, bool, True),
    ("false", bool, False), ("No", bool, False), ("0", bool, False), (False, bool, False),
    ("64", int, 64), (" 64 ", int, 64), ("1e3", int, 1000), ("2.0", int, 2), (64.0, int, 64), (7, int, 7),
    ("1e-4", float, 1e-4), (3, float, 3.0), ("-8", float, -8.0),
    ("none", int | None, None), ("NULL", float | None, None), (None, str | None, None), ("none", str, "none"),
    ("sinks", Literal["dense", "sinks"], "sinks"), ("false", Literal["auto", True, False], False),
    ("auto", Literal["auto", True, False], "auto"), (True, Literal["auto", True, False], True),
    ("yes", Literal["auto", True, False], True), ("3", Literal[1, 3], 3),
    ("notes.txt", tuple[str, ...], ("notes.txt",)), (["a", "b"], tuple[str, ...], ("a", "b")),
    ("512", tuple[int, ...], (512,)), ({"router": "1e-3"}, dict[str, float], {"router": 1e-3}),
    (Path("a/b"), str, "a/b"), ("~/f.json", Path, Path.home() / "f.json"), ("BF16", torch.dtype, torch.bfloat16),
    ("true", bool | str, True), ("out/cache", bool | str, "out/cache"),
]

REFUSED = [  # (value, annotation, the start of what it must be)
    ("maybe", bool, "true or false"), ("", bool, "true or false"), (1, bool, "true or false"),
    ("on", bool, "true or false"),
    (True, int, "an integer"), ("2.5", int, "an integer"), (2.5, int, "an integer"), ("sixty", int, "an integer"),
    (True, float, "a number"), ("fast", float, "a number"), ("nan", float, "a finite number"),
    (float("inf"), float, "a finite number"), ("nan", int | None, "a finite integer"),
    (7, str, "a string"), (None, str, "a string"), ([8], int, "an integer"),
    ("Sinks", Literal["dense", "sinks"], "one of dense, sinks"), ("none", Literal["dense", "sinks"], "one of"),
    ("maybe", Literal["auto", True, False], "one of auto, true, false"), ("2", Literal[1, 3], "one of 1, 3"),
    (["a"], dict[str, float], "a mapping of names to numbers"), ("int3", torch.dtype, "one of float32"),
]


@pytest.mark.parametrize(("value", "annotation", "expected"), READS, ids=[repr(r[:2]) for r in READS])
def test_the_reader_reads_text_and_python_values_alike(value: Any, annotation: Any, expected: Any) -> None:
    read = read_value(value, annotation)
    assert read == expected and type(read) is type(expected)


@pytest.mark.parametrize(("value", "annotation", "expected"), REFUSED, ids=[repr(r[:2]) for r in REFUSED])
def test_the_reader_refuses_what_is_not_of_the_kind(value: Any, annotation: Any, expected: str) -> None:
    with pytest.raises(WrongValue) as caught:
        read_value(value, annotation)
    assert caught.value.expected.startswith(expected), caught.value.expected


def test_a_kept_type_passes_unread_even_inside_a_list() -> None:
    later = object()
    assert read_value(later, int, keep=(object,)) is later
    assert read_value([1, "2"], tuple[int, ...], keep=(dict,)) == (1, 2)


@pytest.mark.parametrize(("text", "meaning"), [("yes", True), ("no", False), ("maybe", None)])
def test_every_place_that_takes_a_bool_reads_it_with_one_grammar(text: str, meaning: bool | None) -> None:
    """A patch spec, a recipe's eval settings, a finetune's, lora's and distill's: the same text, the same bool (the
    five readers of issue 25 disagreed: distill took "yes", the recipe schema did not)."""
    from llm_retrofit import FinetuneError, RecipeError
    from llm_retrofit.recipes.schema import EvalSettings
    from llm_retrofit.training.distill import parse_distill
    from llm_retrofit.training.finetune import FinetuneSettings
    from llm_retrofit.training.lora import parse_lora

    readers = {
        "patch spec": lambda: parse_spec(f"infini:segment_length=64,memory={text}").memory,
        "recipe eval": lambda: EvalSettings.read({"plot": text}).plot,
        "finetune": lambda: FinetuneSettings(steps=1, packing=text).packing,
        "lora spec": lambda: parse_lora(f"lora:merge={text}").merge,
        "lora mapping": lambda: parse_lora({"merge": text}).merge,
        "distill": lambda: parse_distill({"teacher": "base", "top_k": 4, "cache": text}).cache,  # type: ignore
    }
    for where, read in readers.items():
        if meaning is None:
            errors = (PatchSpecError, RecipeError, FinetuneError)
            if where == "distill":  # `cache` also takes a directory: `maybe` is one
                assert read() == "maybe"
                continue
            with pytest.raises(errors, match="expected true or false"):
                read()
        else:
            assert read() is meaning, where


def test_every_default_of_every_spec_reads_as_itself() -> None:
    """Every field the reader will see (patchers, lora, distill, finetune and recipe settings) has a type it knows:
    an unknown one would raise TypeError at the user, not at this test."""
    import dataclasses
    import typing

    from llm_retrofit.recipes.schema import CardSettings, EvalSettings, PushSettings
    from llm_retrofit.training.distill import DistillSpec
    from llm_retrofit.training.finetune import FinetuneSettings
    from llm_retrofit.training.lora import LoraSpec

    for cls in [*registry().values(), FinetuneSettings, LoraSpec, DistillSpec, EvalSettings, CardSettings, PushSettings]:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            elif field.default is not dataclasses.MISSING:
                default = field.default
            else:
                continue
            assert read_value(default, hints[field.name]) == default, f"{cls.__name__}.{field.name}"
