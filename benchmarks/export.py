"""`retrofit export` against llama.cpp's own converter, on the same checkpoint and output type, in one run.

    python benchmarks/export.py --llama-cpp DIR [--model DIR | --synthetic-gb 3] [--outtype f16] [--repeats 2]

DIR is llama.cpp's source tree (the one inside the llama-cpp-python source package: `pip download --no-deps
--no-binary :all: llama-cpp-python==0.3.36`, unpack, `vendor/llama.cpp`). Its `convert_hf_to_gguf.py` runs with the
gguf package of that tree; nothing of it is copied here. The model defaults to the bundled SmolLM2-135M converted to
float32 safetensors; `--synthetic-gb N` makes a random Llama of about N GB (hidden 2048, float32) with the bundled
model's tokenizer instead, to show memory against the model's size. The reference converter needs `pip install
sentencepiece` (it tries a SentencePiece tokenizer first).

llama.cpp's converter names the BPE pre-tokenizer by hashing how the tokenizer splits a test string, and refuses a
tokenizer whose hash it does not list. The bundled model's tokenizer, rebuilt by transformers from a GGUF, is one of
those, so the harness tells the converter "gpt-2" (what our export names it: byte-level BPE without a digit split);
the time that takes is nothing beside the weights.

Each converter runs in a fresh process, alternating, `--repeats` times: wall time and peak RSS (VmHWM of the process
and its children). Then the two files' tensors are compared: the same names, types and shapes, and the largest
difference of their values dequantized. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import checkpoint_or_bundled, cpu_name, make_synthetic

REFERENCE = """
import sys
sys.path[:0] = [{tree!r}, {tree!r} + "/gguf-py"]
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outfile", {output!r}, "--outtype", {outtype!r}]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import runpy
runpy.run_path({tree!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""
OURS = """
import sys
from llm_retrofit.export import export_gguf
export_gguf({model!r}, {output!r}, dtype={outtype!r})
"""
TIMED = """
import resource, runpy, sys, time
code = sys.argv[1]
start = time.perf_counter()
exec(code)
elapsed = time.perf_counter() - start
own = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(elapsed, max(own, child))
"""


def timed(code: str) -> dict[str, float]:
    subprocess.run(["sync"], check=True)
    result = subprocess.run([sys.executable, "-c", TIMED, code], capture_output=True, text=True,
                            env={**os.environ, "RETROFIT_PROGRESS": "off"})
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    elapsed, peak = result.stdout.split()[-2:]
    return {"wall_s": float(elapsed), "peak_rss_gb": int(peak) / 1e9}


def compare(ours: Path, reference: Path) -> dict[str, object]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    a, b = GGUFReader(ours), GGUFReader(reference)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    worst, differing_types = 0.0, []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type:
            differing_types.append(f"{name}: ours {x.tensor_type.name}, theirs {y.tensor_type.name}")
        dx = dequantize(x.data, x.tensor_type).astype(np.float32)
        dy = dequantize(y.data, y.tensor_type).astype(np.float32)
        worst = max(worst, float(np.abs(dx.reshape(dy.shape) - dy).max()))
    return {"only_ours": sorted(set(ta) - set(tb)), "only_theirs": sorted(set(tb) - set(ta)),
            "differing_types": differing_types, "max_abs_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (vendor/llama.cpp)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--synthetic-gb", type=float, default=None)
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tree = str(args.llama_cpp.resolve())
    with tempfile.TemporaryDirectory() as scratch:
        model = str(checkpoint_or_bundled(args.model, Path(scratch)).resolve())
        if args.synthetic_gb:
            model = str(_synthetic(Path(scratch), Path(model), args.synthetic_gb))
        ours, theirs = Path(scratch) / "ours.gguf", Path(scratch) / "theirs.gguf"
        runs: dict[str, list[dict[str, float]]] = {"retrofit_export": [], "convert_hf_to_gguf": []}
        for _ in range(args.repeats):
            runs["convert_hf_to_gguf"].append(timed(REFERENCE.format(tree=tree, model=model, output=str(theirs),
                                                                     outtype=args.outtype)))
            runs["retrofit_export"].append(timed(OURS.format(model=model, output=str(ours), outtype=args.outtype)))
        best = {name: {key: min(r[key] for r in results) for key in results[0]} for name, results in runs.items()}
        report = {
            "cpu": platform.processor() or cpu_name(), "model": model, "outtype": args.outtype, "runs": runs,
            "best": best,
            "time_ratio": best["retrofit_export"]["wall_s"] / best["convert_hf_to_gguf"]["wall_s"],
            "peak_rss_ratio": best["retrofit_export"]["peak_rss_gb"] / best["convert_hf_to_gguf"]["peak_rss_gb"],
            "bytes": {"ours": ours.stat().st_size, "theirs": theirs.stat().st_size},
            "tensors": compare(ours, theirs),
            "date": time.strftime("%Y-%m-%d"),
        }
    print(json.dumps(report, indent=2))


def _synthetic(scratch: Path, tokenizer_from: Path, size_gb: float) -> Path:
    """A random Llama of about `size_gb` whose vocabulary is `tokenizer_from`'s, with that tokenizer."""
    path = scratch / "synthetic"
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    make_synthetic(path, size_gb, vocab=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, path / name)
    return path


if __name__ == "__main__":
    main()
