"""Files a runtime patch ships with the checkpoint (a modeling file that `auto_map` names): written inside the
atomic commit, never stale, never written through a link into a source, and refused when two patches disagree."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import read_config, snapshot
from llm_retrofit import PatchError, patch
from llm_retrofit.plan import ModelView, TensorPlan, shipped_files
from llm_retrofit.spec import Patcher


@dataclass(frozen=True)
class ShipsCode(Patcher):
    """Loads the model through a shipped module (a stand-in for attention patterns and Infini memory)."""

    name: ClassVar[str] = "ships-code"
    example: ClassVar[str] = "ships-code:module=modeling_a"

    module: str = "modeling_a"
    text: str = "VERSION = 1\n"

    def plan(self, model: ModelView) -> TensorPlan:
        config = {**model.config, "auto_map": {"AutoModelForCausalLM": f"{self.module}.Model"}}
        plan = TensorPlan.identity(ModelView(config, model.tensors))
        plan.files = {f"{self.module}.py": self.text}
        return plan


@dataclass(frozen=True)
class DropsCode(Patcher):
    """Back to the plain classes: the config no longer names any shipped module."""

    name: ClassVar[str] = "drops-code"
    example: ClassVar[str] = "drops-code"

    def plan(self, model: ModelView) -> TensorPlan:
        return TensorPlan.identity(ModelView({k: v for k, v in model.config.items() if k != "auto_map"}, model.tensors))


def test_auto_map_names_the_files_of_the_checkpoint_it_loads() -> None:
    config = {"auto_map": {"AutoModelForCausalLM": "modeling_x.X", "AutoTokenizer": ["tokenization_x.XTok", None]}}
    assert shipped_files(config) == {"modeling_x.py", "tokenization_x.py"}
    # transformers loads `repo--module.Class` from that directory or Hub repo, never from this checkpoint.
    elsewhere = {"auto_map": {"AutoConfig": "owner/repo--configuration_x.XConfig", "AutoModel": "../x--modeling_x.X"}}
    assert shipped_files(elsewhere) == set()
    for no_files in ({}, {"auto_map": None}, {"auto_map": "modeling_x.X"}):
        assert shipped_files(no_files) == set()


def test_a_file_named_like_code_of_another_repo_is_the_users_and_is_kept(tiny_llama: Path, tmp_path: Path) -> None:
    """A `modeling_a.py` beside a config that loads `owner/repo--modeling_a.Model` is not code this checkpoint
    loads, so a patch that drops the auto_map does not drop it as stale shipped code."""
    config = read_config(tiny_llama) | {"auto_map": {"AutoModelForCausalLM": "owner/repo--modeling_a.Model"}}
    (tiny_llama / "config.json").write_text(json.dumps(config))
    (tiny_llama / "modeling_a.py").write_text("# the user's notes\n")
    plain = patch(tiny_llama, DropsCode(), output=tmp_path / "plain")
    assert (plain / "modeling_a.py").read_text() == "# the user's notes\n" and "auto_map" not in read_config(plain)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_shipped_file_is_part_of_the_commit(tiny_llama: Path, tmp_path: Path, in_place: bool) -> None:
    out = patch(tiny_llama, ShipsCode(), **({"in_place": True} if in_place else {"output": tmp_path / "out"}))
    assert (out / "modeling_a.py").read_text() == "VERSION = 1\n"
    assert read_config(out)["auto_map"] == {"AutoModelForCausalLM": "modeling_a.Model"}
    assert not list(out.parent.glob("*.staging*"))


def test_a_file_the_new_config_no_longer_loads_is_not_carried(tiny_llama: Path, tmp_path: Path) -> None:
    shipped = patch(tiny_llama, ShipsCode(), output=tmp_path / "shipped")
    (shipped / "notes.txt").write_text("the user's own file")
    plain = patch(shipped, DropsCode(), output=tmp_path / "plain")
    assert not (plain / "modeling_a.py").exists() and (plain / "notes.txt").exists()
    patch(shipped, DropsCode(), in_place=True)
    assert not (shipped / "modeling_a.py").exists() and (shipped / "notes.txt").exists()


def test_a_newer_file_replaces_the_old_without_writing_through_a_link(tiny_llama: Path, tmp_path: Path) -> None:
    first = patch(tiny_llama, ShipsCode(), output=tmp_path / "first")
    # A config-only patch to a new directory links the source's files, the shipped one included.
    second = patch(first, "ntk:factor=2", output=tmp_path / "second")
    assert os.path.samefile(first / "modeling_a.py", second / "modeling_a.py")
    before = snapshot(first)
    patch(second, ShipsCode(text="VERSION = 2\n"), in_place=True)
    assert (second / "modeling_a.py").read_text() == "VERSION = 2\n"
    assert snapshot(first) == before


def test_two_patches_that_load_the_model_differently_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    before = snapshot(tiny_llama)
    with pytest.raises(PatchError, match="both need to set AutoModelForCausalLM"):
        patch(tiny_llama, ShipsCode(), ShipsCode(module="modeling_b"), output=tmp_path / "out")
    with pytest.raises(PatchError, match="modeling_a.py"):
        patch(tiny_llama, ShipsCode(), ShipsCode(text="VERSION = 2\n"), output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and snapshot(tiny_llama) == before


def test_a_later_patch_keeps_the_files_of_an_earlier_one(tiny_llama: Path, tmp_path: Path) -> None:
    out = patch(tiny_llama, ShipsCode(), "ntk:factor=2", output=tmp_path / "out")
    assert (out / "modeling_a.py").read_text() == "VERSION = 1\n"
    assert read_config(out)["auto_map"] == {"AutoModelForCausalLM": "modeling_a.Model"}
