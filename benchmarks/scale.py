"""Peak memory and wall time of every step that runs the model, old code against new, at 135M and at a 1.7B shape.

    python benchmarks/scale.py [--baseline REF] [--sizes 135m,1.7b] [--scratch DIR]

Each step runs as the user runs it, a `retrofit` command in a fresh interpreter, once with this checkout's code and
once with the code of git REF (default: the commit before issue 27 made the model-running steps scale), checked out
into the scratch directory with `git archive`; peak RSS is the child's VmHWM. The steps:

- `gqa-fit`: `patch --patch gqa:...,method=fit` (calibration, then the streamed rewrite);
- `moe-hidden`: `patch --patch moe:num_experts=2,router=hidden` (calibration on two prompts);
- `eval`: `eval --lengths L` on one document;
- `search`: `search-rope` with two candidates at the model's own length;
- `finetune-lora`: one LoRA step (r=16) at seq_len L with gradient checkpointing, as the long-context recipe trains.

Sizes: `135m` is SmolLM2-135M-Instruct (the bundled real model, float32 as converted); `1.7b` is SmolLM2-1.7B's shape
with random bfloat16 weights and SmolLM2's tokenizer, made in the scratch directory (3.4 GB) and deleted after.
The model files are dropped from the page cache before each run, so every run reads them from the disk alike.
Prints one JSON object: per size and step, each side's peak RSS and wall time, and the ratios new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    checkpoint_or_bundled, cpu_name, evict_from_page_cache, write_random_checkpoint)

BASELINE = "66f863d"
"""The last commit before the model-running steps were made to scale (issue 27)."""

SMOLLM2_1_7B = {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": True,
                "max_position_embeddings": 8192, "rope_theta": 130000.0, "bos_token_id": 1, "eos_token_id": 2}
"""SmolLM2-1.7B's config.json, as far as the shape goes."""

SIZES = {
    # size: (kv heads after the GQA fit, calibration tokens, eval/search/finetune length)
    "135m": (1, 8192, 2048),
    "1.7b": (8, 2048, 256),
}

RUN = """
import json, sys, time
from llm_retrofit.cli import main
start = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_gb": peak / 1e9}))
"""


def commands(model: Path, size: str, scratch: Path) -> dict[str, list[str]]:
    """Each step's `retrofit` arguments (OUT is replaced by a fresh output path per run)."""
    kv_heads, calibration, length = SIZES[size]
    prompts = scratch / "prompts.json"
    prompts.write_text(json.dumps(["def parse(text): return text.split()", "The river rose after the rain."]))
    data = ["--data", "bundled:python-docs", "--max-docs", "1"]
    return {
        "gqa-fit": ["patch", str(model), "--patch",
                    f"gqa:num_key_value_heads={kv_heads},method=fit,calibration_tokens={calibration}", "-o", "OUT"],
        "moe-hidden": ["patch", str(model), "--patch", f"moe:num_experts=2,router=hidden,prompts={prompts}",
                       "-o", "OUT"],
        "eval": ["eval", str(model), "--lengths", str(length), *data, "--json", "OUT"],
        "search": ["search-rope", str(model), "--target-length", str(length), *data, "--population", "2",
                   "--iterations", "0", "--segments", "1", "-o", "OUT"],
        "finetune-lora": ["finetune", str(model), "--lora", "lora:r=16,trainable=embed_tokens+norm", "--steps", "1",
                          "--seq-len", str(length), "--gradient-checkpointing", "--data", "bundled:python-docs", "-o", "OUT"],
    }


def run(code: Path, argv: list[str], model: Path, scratch: Path) -> dict[str, float]:
    """One `retrofit` command with the package at `code`, in a fresh interpreter; its wall time and peak RSS. Its
    output (a directory, or a file and its state file) goes to a fresh folder, removed after."""
    evict_from_page_cache(model)
    folder = Path(tempfile.mkdtemp(dir=scratch))
    argv = [str(folder / "out") if a == "OUT" else a for a in argv]
    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, env=env, cwd=code)
    shutil.rmtree(folder, ignore_errors=True)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_tree(ref: str, scratch: Path) -> Path:
    """The package as it was at git `ref`, unpacked under `scratch`."""
    tree = scratch / f"baseline-{ref}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", ref, "llm_retrofit"], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def model_for(size: str, scratch: Path, converted: Path | None) -> Path:
    small = checkpoint_or_bundled(converted, scratch)
    if size == "135m":
        return small
    path = scratch / "smollm2-1.7b-shape"
    if not path.exists():
        write_random_checkpoint(path, SMOLLM2_1_7B, "bfloat16")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(small / name, path / name)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--sizes", default="135m,1.7b")
    parser.add_argument("--steps", default=None, help="comma-separated step names (default: all)")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="SmolLM2-135M converted already (default: convert)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="scale-", dir=args.scratch))
    new = Path(__file__).resolve().parent.parent
    old = baseline_tree(args.baseline, scratch)
    report: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "baseline": args.baseline,
                    "date": time.strftime("%Y-%m-%d"), "results": {}}
    try:
        for size in args.sizes.split(","):
            model = model_for(size, scratch, args.model)
            chosen = commands(model, size, scratch)
            for step in (args.steps.split(",") if args.steps else chosen):
                sides = {side: run(code, chosen[step], model, scratch) for side, code in
                         (("old", old), ("new", new))}
                if all("error" not in found for found in sides.values()):
                    sides["ratio"] = {key: round(sides["new"][key] / sides["old"][key], 3)
                                      for key in ("peak_rss_gb", "wall_s")}
                report["results"].setdefault(size, {})[step] = sides
                print(json.dumps({"size": size, "step": step, **sides}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
