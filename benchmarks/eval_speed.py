"""`retrofit eval`'s perplexity vs the Hugging Face perplexity guide's recipe, on the same documents, in one run.

    python benchmarks/eval_speed.py [--model DIR] [--dtype float32] [--quick]

The model is SmolLM2-135M-Instruct (converted from the bundled GGUF into a temporary directory unless --model is
given); the documents are `bundled:python-docs` (the Python documentation topics, 20k-33k tokens each). For each case,
each contender runs in a fresh process (peak RSS is that process's VmHWM: Linux carries ru_maxrss over from the
parent), loads the model, tokenizes, and then only the evaluation is timed:

- retrofit: `llm_retrofit.evaluation.perplexity.perplexity` (what `retrofit eval` runs): the decoder alone, then the LM head and
  the loss a chunk of positions at a time; truncate reads every length off one pass at the largest.
- hf_guide: the guide's loop, `model(input_ids, labels=target_ids)` per window, targets of already-scored tokens set
  to -100 (https://huggingface.co/docs/transformers/perplexity). Tokens are counted exactly (the guide subtracts one
  per window even where the shift drops none), so that both sides average over the same predictions.

Cases: truncate at 8k, at 16k, at 2k+4k+8k+16k together (one `retrofit eval --lengths` call vs one guide loop per
length), and sliding windows of 8k with stride 4k. Prints one JSON object with tokens/s (scored predictions per
second of evaluation), peak RSS, both perplexities, and the issue's targets: >= 1.5x tokens/s at equal numbers
(perplexities within 0.1%), and peak RSS lower by at least the size of the full fp32 logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import checkpoint_or_bundled

# name -> (protocol, lengths, stride, documents, tokens kept per document)
CASES = {
    "truncate_8k": ("truncate", [8192], None, 1, 8192),
    "truncate_16k": ("truncate", [16384], None, 1, 16384),
    "truncate_2k_4k_8k_16k": ("truncate", [2048, 4096, 8192, 16384], None, 1, 16384),
    "sliding_8k_stride_4k": ("sliding", [8192], 4096, 1, 12288),
}
QUICK = {"truncate_1k_2k": ("truncate", [1024, 2048], None, 1, 2048), "sliding_1k_stride_512": ("sliding", [1024], 512, 1, 2048)}


def hf_guide(model, ids, length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop over one document: (summed NLL, predicted tokens)."""
    import torch

    nll_sum, n_tokens, prev_end_loc, seq_len = 0.0, 0, 0, ids.size(1)
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # exact: the label shift drops position 0 only
        nll_sum += outputs.loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def child(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_retrofit.evaluation.documents import bundled_documents
    from llm_retrofit.evaluation.perplexity import perplexity

    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    texts = [d.text for d in bundled_documents()[: spec["documents"]]]
    docs = [torch.tensor(tokenizer(t, verbose=False)["input_ids"][: spec["keep"]]) for t in texts]
    assert all(len(d) == spec["keep"] for d in docs), "a bundled document is shorter than the case needs"
    start = time.perf_counter()
    if spec["contender"] == "retrofit":
        run = perplexity(model, docs, spec["lengths"], protocol=spec["protocol"], stride=spec["stride"])
        nll, tokens = sum(r.nll for r in run.lengths), sum(r.tokens for r in run.lengths)
    else:
        nll, tokens = 0.0, 0
        for length in spec["lengths"]:
            for doc in docs:
                piece = doc[None] if spec["protocol"] == "sliding" else doc[None, :length]
                found = hf_guide(model, piece, length, spec["stride"] or length)
                nll, tokens = nll + found[0], tokens + found[1]
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    return {"seconds": seconds, "tokens": tokens, "nll": nll, "tokens_per_s": tokens / seconds,
            "perplexity": float(torch.tensor(nll / tokens).exp()), "peak_rss_gb": peak / 1e9}


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="SmolLM2-sized checkpoint dir [default: convert bundled:smollm2]")
    parser.add_argument("--dtype", default="float32", help="float32 (default: bfloat16 is far slower on AVX2-only CPUs)")
    parser.add_argument("--quick", action="store_true", help="short cases only (1k, 2k), to try the script")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        model = checkpoint_or_bundled(args.model, Path(tmp))
        config = json.loads((model / "config.json").read_text())
        results = {}
        for name, (protocol, lengths, stride, documents, keep) in (QUICK if args.quick else CASES).items():
            spec = {"model": str(model), "dtype": args.dtype, "protocol": protocol, "lengths": lengths,
                    "stride": stride, "documents": documents, "keep": keep}
            case = {c: run_child(spec | {"contender": c}) for c in ("retrofit", "hf_guide")}
            ours, theirs = case["retrofit"], case["hf_guide"]
            full_logits_gb = max(lengths) * config["vocab_size"] * 4 / 1e9
            case["ratios"] = {
                "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                "perplexity_relative_difference": abs(ours["perplexity"] / theirs["perplexity"] - 1),
                "peak_rss_saved_gb": theirs["peak_rss_gb"] - ours["peak_rss_gb"],
                "full_fp32_logits_gb": full_logits_gb,
            }
            case["targets"] = {
                "speed_met": ours["tokens_per_s"] >= 1.5 * theirs["tokens_per_s"],
                "equal_numbers_met": case["ratios"]["perplexity_relative_difference"] <= 1e-3,
                "rss_met": case["ratios"]["peak_rss_saved_gb"] >= full_logits_gb,
            }
            case["settings"] = {"protocol": protocol, "lengths": lengths, "stride": stride, "documents": documents,
                                "tokens_per_document": keep}
            results[name] = case
            print(f"{name}: {json.dumps(case['ratios'])}", file=sys.stderr)
    report = {
        "benchmark": "eval_speed",
        "model": "SmolLM2-135M-Instruct" if args.model is None else str(args.model),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "documents": "bundled:python-docs",
        "cases": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
