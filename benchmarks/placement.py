"""Peak memory and time of `retrofit eval` with the model whole in memory vs placed by accelerate, in one run.

    python benchmarks/placement.py [--model DIR] [--length 2048] [--max-memory cpu=100MiB]

The model is SmolLM2-135M-Instruct (converted from the bundled GGUF into a temporary directory unless --model is
given); the document is the first of `bundled:python-docs`, scored at one length. Each case runs in a fresh process
(common.measure): imports and tokenization are untimed, then the peak RSS is reset (writing 5 to
/proc/self/clear_refs sets VmHWM to the current RSS) and `evaluate` (load, check, perplexity) is timed. Cases:

- whole: the default placement (the model fits, so it goes whole onto the CPU, as before placement existed);
- offloaded: `--max-memory` (default cpu=100MiB): accelerate keeps what fits in CPU memory and reads the rest from
  the checkpoint on disk, layer by layer, at every forward pass.

Prints one JSON object: per case the wall time, peak RSS (and the RSS before the evaluation, the interpreter and
torch), the perplexity; and whether the perplexities agree (relative difference below 1e-5).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import checkpoint_or_bundled, load_into_page_cache, measure

SETUP = """
from llm_retrofit.evaluation.documents import load_documents
from llm_retrofit.evaluation.perplexity import evaluate
import torch
documents = load_documents(["bundled:python-docs"], max_docs=1)
options = json.loads(OUTPUT)
open("/proc/self/clear_refs", "w").write("5")
status = open("/proc/self/status").read()
COUNTERS["rss_before_gb"] = int(status.split("VmRSS:")[1].split()[0]) * 1024 / 1e9
"""
WORK = """
result = evaluate(SOURCE, documents, progress=False, **options)
COUNTERS["perplexity"] = result.models[0].perplexity[0].perplexity
COUNTERS["device"] = result.models[0].info["device"]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--max-memory", default="cpu=100MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = checkpoint_or_bundled(args.model, Path(scratch))
        load_into_page_cache(model)  # both cases read the checkpoint from the page cache, not the disk
        cases = {"whole": {"lengths": [args.length]},
                 "offloaded": {"lengths": [args.length], "max_memory": args.max_memory}}
        found = {name: measure(SETUP, WORK, model, json.dumps(options)) for name, options in cases.items()}
    ppl = [found[name]["perplexity"] for name in cases]
    print(json.dumps({"model": str(args.model or "bundled:smollm2"), "length": args.length,
                      "max_memory": args.max_memory, "cases": found,
                      "same_perplexity": abs(ppl[1] - ppl[0]) / ppl[0] < 1e-5}, indent=2))


if __name__ == "__main__":
    main()
