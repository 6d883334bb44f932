"""Patch specs (`name:key=value,...`): typed, and every mistake answered with the valid choices."""

from __future__ import annotations

import pytest
import torch

from llm_retrofit import PatchSpecError
from llm_retrofit.patchers import parse_spec, registry
from llm_retrofit.patchers.dtype import CastDtype


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
