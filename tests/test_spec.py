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
