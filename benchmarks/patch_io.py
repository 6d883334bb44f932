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
import tempfile
from pathlib import Path

from common import make_synthetic, measure

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

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.2)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="patch-io-") as tmp:
        root = Path(tmp)
        source = root / "source"
        total, largest = make_synthetic(source, args.size_gb)
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
