"""Streamed dtype patch vs `cp -r` vs transformers (load, cast, save) on a synthetic sharded Llama checkpoint.

    python benchmarks/patch_io.py [--size-gb 2.2] [--workdir /tmp] [--repeats 2]

Prints one JSON object: for each contender (best of --repeats) the time of the work itself, the time of the whole
process (interpreter start and imports included), and peak RSS; then the ratios the foundation issue sets targets
for (retrofit <= 1.4x cp; retrofit peak RSS <= 2x largest tensor + 0.5 GB). Each contender runs in a fresh process,
after `sync`, with the source in the page cache (it was just written), as a second patch of a fresh download would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (setup, work): only `work` is timed as work_s; process_s is the whole child process, interpreter and
# imports included (what a user of the CLI waits for).
CONTENDERS = {
    "cp": ("import subprocess", "subprocess.run(['cp', '-r', SOURCE, OUTPUT], check=True)"),
    # The fair baseline for --in-place, which fsyncs what it wrote before switching.
    "cp_then_sync": ("import subprocess", "subprocess.run(['cp', '-r', SOURCE, OUTPUT], check=True); subprocess.run(['sync'])"),
    "retrofit": ("import llm_retrofit", "llm_retrofit.patch(SOURCE, 'dtype:to=bfloat16', output=OUTPUT)"),
    "retrofit_in_place": ("import llm_retrofit", "llm_retrofit.patch(OUTPUT, 'dtype:to=bfloat16', in_place=True)"),
    "transformers": (
        "import torch; from transformers import AutoModelForCausalLM",
        "AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).to(torch.bfloat16)"
        ".save_pretrained(OUTPUT, max_shard_size='5GB')",
    ),
}

# Peak RSS: VmHWM of this process (fresh after exec, unlike ru_maxrss, which Linux carries over from the parent),
# or of cp, which runs as a child of a small interpreter.
MEASURE = """
import resource, sys, time
setup, work, SOURCE, OUTPUT = sys.argv[1:5]
exec(setup)
start = time.perf_counter()
exec(work)
elapsed = time.perf_counter() - start
status = open("/proc/self/status").read()
own = int(status.split("VmHWM:")[1].split()[0]) * 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(elapsed, max(own, child))
"""


def make_checkpoint(path: Path, size_gb: float) -> tuple[int, int]:
    """A random float32 Llama checkpoint of about `size_gb`, in 1 GB shards; returns (bytes, largest tensor bytes)."""
    import torch
    from transformers import LlamaConfig

    from llm_retrofit.checkpoint import TensorMeta
    from llm_retrofit.writer import SafetensorsWriter, layout_shards, write_index

    hidden, intermediate, vocab = 2048, 5632, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * 4
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * hidden * 4) / per_layer))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="float32",
    )
    path.mkdir(parents=True)
    config.save_pretrained(path)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{m}_proj.weight": (hidden, hidden) for m in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden)}
        shapes |= {p + "mlp.down_proj.weight": (hidden, intermediate)}
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    metas = {name: TensorMeta(torch.float32, shape) for name, shape in shapes.items()}
    layout = layout_shards(metas, 1 << 30)
    generator = torch.Generator().manual_seed(0)
    for file_name, names in layout.items():
        with SafetensorsWriter(path / file_name, {n: metas[n] for n in names}) as writer:
            for name in names:
                writer.write(name, torch.randn(metas[name].shape, generator=generator) * 0.02)
    write_index(path, layout, metas)
    return sum(m.nbytes for m in metas.values()), max(m.nbytes for m in metas.values())


def measure(setup: str, work: str, source: Path, output: Path) -> dict[str, float]:
    subprocess.run(["sync"], check=True)  # no contender pays for the previous one's dirty pages
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, setup, work, str(source), str(output)], capture_output=True, text=True
    )
    process = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(result.stderr)
    work_s, rss = result.stdout.split()[-2:]
    return {"work_s": float(work_s), "process_s": process, "peak_rss_gb": int(rss) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.2)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        print(*make_checkpoint(args.make, args.size_gb))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="patch-io-") as tmp:
        root = Path(tmp)
        source = root / "source"
        # Made in a child process, so that this one stays small (Linux children inherit the parent's peak RSS).
        made = subprocess.run(
            [sys.executable, __file__, "--make", str(source), "--size-gb", str(args.size_gb)],
            check=True, capture_output=True, text=True,
        )
        total, largest = map(int, made.stdout.split())
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
        for _ in range(args.repeats):
            for name, (setup, work) in CONTENDERS.items():
                # retrofit_in_place rewrites the copy cp_then_sync has just made; the others write a fresh directory.
                output = root / ("cp_then_sync" if name == "retrofit_in_place" else name)
                runs[name].append(measure(setup, work, source, output))
                if name != "cp_then_sync":
                    shutil.rmtree(output)

    # The best of the repeats (this VM's disk is noisy; the best run is the least disturbed), and the median.
    results = {
        name: {key: min(r[key] for r in rs) for key in rs[0]}
        | {"work_s_median": statistics.median(r["work_s"] for r in rs)}
        for name, rs in runs.items()
    }
    rss_budget_gb = (2 * largest + 0.5e9) / 1e9
    report = {
        "benchmark": "patch_io",
        "checkpoint": {"size_gb": total / 1e9, "largest_tensor_gb": largest / 1e9, "dtype": "float32 -> bfloat16"},
        "repeats": args.repeats,
        "results": results,
        "ratios": {
            "retrofit_work_vs_cp": results["retrofit"]["work_s"] / results["cp"]["work_s"],
            "retrofit_process_vs_cp": results["retrofit"]["process_s"] / results["cp"]["process_s"],
            "retrofit_in_place_work_vs_cp_then_sync": results["retrofit_in_place"]["work_s"]
            / results["cp_then_sync"]["work_s"],
            "retrofit_work_vs_transformers": results["retrofit"]["work_s"] / results["transformers"]["work_s"],
            "retrofit_rss_vs_transformers": results["retrofit"]["peak_rss_gb"] / results["transformers"]["peak_rss_gb"],
        },
        "targets": {
            "work_vs_cp_max": 1.4,
            "peak_rss_max_gb": rss_budget_gb,
            "work_met": results["retrofit"]["work_s"] <= 1.4 * results["cp"]["work_s"],
            "rss_met": results["retrofit"]["peak_rss_gb"] <= rss_budget_gb,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
