"""Peak memory of a calibrated patch (GQA's fit): SmolLM2-135M, and random models of its width at several depths.

    python benchmarks/calibration_memory.py --model DIR [--layers 30,120] [--calibration-tokens 2048] [--old SRC]

Each measurement is one `patch(source, "gqa:num_key_value_heads=1,...")` to a temporary directory in a fresh
process, after its imports: the process's peak resident memory (VmHWM, reset by writing 5 to /proc/self/clear_refs
once imports are done; the kernel updates it lazily, so a thread also samples VmRSS every 5 ms and the larger is
reported) and its resident memory before the patch. The random models (`--layers`; SmolLM2-135M's
width, 576 hidden, 1536 MLP, 9 heads, 3 KV heads, 49152 vocabulary; float32 like the converted SmolLM2; its
tokenizer) are written to a temporary directory and deleted afterwards. `--old SRC` also measures the same patch
with the llm_retrofit found under SRC (a checkout of an earlier version, e.g. from `git archive`), to compare.

Reports, as one JSON object per source: baseline and peak in MB, per version; the largest decoder layer's and the
embedding's float32 sizes, and the calibration activations (tokens x hidden x 4 B), to compare the peak with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WIDTH = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
         "vocab_size": 49152}

CHILD = r"""
import json, sys, threading, time
# what either version imports on the way, imported before the baseline
import accelerate, transformers, transformers.models.llama.modeling_llama
import llm_retrofit.patchers.gqa, llm_retrofit.evaluation.documents
from llm_retrofit import patch

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

def sample(highest):  # the kernel updates VmHWM lazily: a 5 ms sampler catches what it can miss
    while True:
        highest[0] = max(highest[0], status("VmRSS"))
        time.sleep(0.005)

source, output, tokens = sys.argv[1:4]
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")
baseline = status("VmRSS")
highest = [baseline]
threading.Thread(target=sample, args=(highest,), daemon=True).start()
patch(source, f"gqa:num_key_value_heads=1,calibration_tokens={tokens}", output=output)
peak = max(status("VmHWM"), highest[0])
print(json.dumps({"baseline_mb": round(baseline), "peak_mb": round(peak)}))
"""


def random_model(directory: Path, layers: int, tokenizer_from: Path) -> Path:
    """A Llama of SmolLM2-135M's width with `layers` layers of random weights, float32, one shard per 10 layers."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**WIDTH, num_hidden_layers=layers, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5)
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, directory / name)
    weight_map: dict[str, str] = {}
    generator = torch.Generator().manual_seed(0)
    shards = [("model.embed_tokens.weight", (WIDTH["vocab_size"], 576)), ("model.norm.weight", (576,))]
    groups = [shards] + [[(f"model.layers.{i}.{n}", s) for i in range(start, min(start + 10, layers))
                          for n, s in _layer_shapes()] for start in range(0, layers, 10)]
    for index, group in enumerate(groups):
        file = f"model-{index:05d}.safetensors"
        save_file({n: _random(s, generator) for n, s in group}, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n, _ in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _layer_shapes() -> list[tuple[str, tuple[int, ...]]]:
    head, kv = 64, 3 * 64
    return [("self_attn.q_proj.weight", (576, 576)), ("self_attn.k_proj.weight", (kv, 576)),
            ("self_attn.v_proj.weight", (kv, 576)), ("self_attn.o_proj.weight", (576, 9 * head)),
            ("mlp.gate_proj.weight", (1536, 576)), ("mlp.up_proj.weight", (1536, 576)),
            ("mlp.down_proj.weight", (576, 1536)), ("input_layernorm.weight", (576,)),
            ("post_attention_layernorm.weight", (576,))]


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * 0.02


def measure(source: Path, tokens: int, code: Path, scratch_root: Path | None) -> dict[str, int]:
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        environment = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(Path(scratch) / "out"), str(tokens)],
                              env=environment, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="SmolLM2-135M converted (float32)")
    parser.add_argument("--layers", default="30,120")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--old", type=Path, help="an earlier llm_retrofit source tree to measure too")
    parser.add_argument("--output-to", type=Path, help="where the patched models go (default: the temp directory; "
                        "/dev/shm is faster, and files written, not mapped, do not count in the process's memory)")
    args = parser.parse_args()
    versions = {"new": ROOT} | ({"old": args.old} if args.old else {})
    layer_mb = sum(torch.Size(s).numel() for _, s in _layer_shapes()) * 4 / 2**20
    print(json.dumps({"largest_layer_mb": round(layer_mb, 1), "embedding_mb": round(49152 * 576 * 4 / 2**20, 1),
                      "activations_mb": round(args.calibration_tokens * 576 * 4 / 2**20, 1)}), flush=True)
    smollm2 = {v: measure(args.model, args.calibration_tokens, c, args.output_to) for v, c in versions.items()}
    print(json.dumps({"SmolLM2-135M": smollm2}), flush=True)
    for layers in (int(n) for n in args.layers.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            source = random_model(Path(scratch) / f"random-{layers}", layers, args.model)
            found = {v: measure(source, args.calibration_tokens, c, args.output_to) for v, c in versions.items()}
        print(json.dumps({f"random, {layers} layers": found}), flush=True)


if __name__ == "__main__":
    main()
