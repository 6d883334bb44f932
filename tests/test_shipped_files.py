"""Files a runtime patch ships with the checkpoint (a modeling file that `auto_map` names): written inside the
atomic commit, never stale, never written through a link into a source, and refused when two patches disagree."""

from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import read_config, snapshot
from llm_retrofit import PatchError, patch
from llm_retrofit.modeling.shipped import HERE as SHIPPED
from llm_retrofit.modeling.shipped import modeling_retrofit_attention, modeling_retrofit_infini
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


# -- the shipped modeling files themselves ----------------------------------------------------------------------------

SHIPPED_FILES = [SHIPPED / "modeling_retrofit_attention.py", SHIPPED / "modeling_retrofit_infini.py"]

# Blocks the two files must hold word for word (by ast, docstrings included, comments not): each file must stand alone
# inside a checkpoint, so they cannot import one copy, and copies drift (`_family` once used `type(model) in` in one
# file and `isinstance` in the other). (name in the attention file, name in the Infini file)
SHARED_BLOCKS = [
    ("_MASK_PLACEHOLDER", "_MASK_PLACEHOLDER"),
    ("_check_unpadded", "_check_unpadded"),
    ("_family", "_family"),
    ("_PatternCausalLM._prepare_cache_for_generation", "_InfiniCausalLM._prepare_cache_for_generation"),
    ("SinkCacheLayer.get_seq_length", "InfiniCacheLayer.get_seq_length"),
    ("SinkCacheLayer.get_mask_sizes", "InfiniCacheLayer.get_mask_sizes"),
]


def _block(path: Path, dotted: str) -> ast.AST:
    """The top-level function, class or assignment `name` of a file, or `Class.method`."""
    scope: list[ast.stmt] = ast.parse(path.read_text()).body
    *classes, name = dotted.split(".")
    for class_name in classes:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == class_name).body
    for node in scope:
        names = [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else [
            getattr(node, "name", None)]
        if name in names:
            return node
    raise AssertionError(f"{path.name} has no {dotted}")


@pytest.mark.parametrize("attention_name, infini_name", SHARED_BLOCKS, ids=[a for a, _ in SHARED_BLOCKS])
def test_the_two_modeling_files_share_their_common_blocks(attention_name: str, infini_name: str) -> None:
    names = [attention_name, infini_name]
    attention, infini = (ast.dump(_block(path, name)) for path, name in zip(SHIPPED_FILES, names))
    assert attention == infini, f"{attention_name} and {infini_name} differ: copy the right one over the other"


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_a_shipped_file_imports_only_the_standard_library_torch_and_transformers(path: Path) -> None:
    """It runs inside a checkpoint on machines without llm-retrofit."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    assert {name for name in imported if name.split(".")[0] not in allowed} == set()


@pytest.mark.parametrize("module", [modeling_retrofit_attention, modeling_retrofit_infini], ids=lambda m: m.__name__)
def test_install_takes_the_stock_class_and_refuses_a_subclass_it_would_override(module) -> None:
    """Re-classing a subclass of LlamaForCausalLM (another patch's classes, a user's own) would silently drop what
    the subclass does; only the stock class (and the file's own) is switched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config.retrofit_attention = {"pattern": "sinks", "sinks": 2, "window": 4}
    config.retrofit_infini = {"segment_length": 8, "update": "linear"}
    installed = module.install(LlamaForCausalLM(config))
    assert type(installed).__module__ == module.__name__ and type(installed).__name__.endswith("LlamaForCausalLM")
    custom = type("CustomForCausalLM", (LlamaForCausalLM,), {})(config)
    with pytest.raises(TypeError, match="for LlamaForCausalLM and MistralForCausalLM only, not CustomForCausalLM"):
        module.install(custom)
