"""Context extension on SmolLM2-135M (native 8192): original, PI, dynamic NTK, YaRN and a searched LongRoPE.

    python benchmarks/rope_extension.py [--scale 2] [--dtype bfloat16] [--device cpu] [--population 6 ...]

Documents: the Python documentation topics shipped with the standard library (`pydoc_data.topics`, real English
prose, about 113k SmolLM2 tokens), joined and cut into pieces of the target length. The first `--search-docs`
pieces are the search's fitness documents; the next `--eval-docs` pieces are held out and scored for every method
at 2k, 8k (the original context) and the target length, truncate protocol. No finetuning anywhere. As the
reference for how much an extension can gain at the target length, the original model also scores the same
target-length pieces in sliding windows of its own context (each token sees up to 8k tokens, no extrapolation).

Prints one JSON object: perplexity per method and length, the search's wall time and settings, and the ratios the
LongRoPE issue sets targets for (LongRoPE at the target at least 5% better than YaRN; at 2k and 8k within 2% of the
original model; the search within 30 minutes on the 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import checkpoint_or_bundled


def pieces(tokenizer, length: int) -> list[torch.Tensor]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a converted SmolLM2 directory (default: convert the bundled one)")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--dtype", default=None,
                        help="default: bfloat16 on a GPU, float32 on a CPU (bfloat16 was 5x slower on this project's CPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--search-docs", type=int, default=1)
    parser.add_argument("--eval-docs", type=int, default=2)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--mutations", type=int, default=3)
    parser.add_argument("--crossovers", type=int, default=3)
    parser.add_argument("--parents", type=int, default=3)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--attention-factor", type=float, default=None,
                        help="LongRoPE attention factor (default: the paper's; 1.0 leaves short contexts unchanged)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from llm_retrofit import patch
    from llm_retrofit.evaluation.perplexity import load_model, perplexity
    from llm_retrofit.modeling.rope import RopeShape
    from llm_retrofit.modeling.rope_search import FactorEvaluator, SearchSettings, search, write_factors

    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="rope-extension-") as tmp:
        root = Path(tmp)
        source = checkpoint_or_bundled(args.model, root)
        tokenizer = AutoTokenizer.from_pretrained(source)
        original_length = json.loads((source / "config.json").read_text())["max_position_embeddings"]
        target = original_length * args.scale
        docs = pieces(tokenizer, target)
        search_docs, eval_docs = docs[: args.search_docs], docs[args.search_docs : args.search_docs + args.eval_docs]
        if len(eval_docs) < args.eval_docs:
            raise SystemExit(f"only {len(docs)} documents of {target} tokens; ask for fewer")

        settings = SearchSettings(
            target_length=target, population=args.population, iterations=args.iterations, mutations=args.mutations,
            crossovers=args.crossovers, parents=args.parents, segments=args.segments,
            attention_factor=args.attention_factor,
        )
        model, _ = load_model(source, dtype=dtype, device=args.device)
        shape = RopeShape.of(model.config.to_dict())
        evaluator = FactorEvaluator(model, search_docs, shape, target, settings.segments, args.attention_factor)
        started = time.perf_counter()
        state = search(evaluator, settings, state_path=root / "state.json")
        search_seconds = time.perf_counter() - started
        factors = root / "factors.json"
        found = write_factors(factors, state, evaluator, str(source))
        del model, evaluator

        methods = {
            "original": None,
            "pi": f"linear:factor={args.scale}",
            "dynamic_ntk": f"dynamic:factor={args.scale}",
            "yarn": f"yarn:factor={args.scale}",
            "longrope": f"longrope:factors={factors}",
        }
        lengths = sorted({2048, original_length, target})
        table: dict[str, dict[int, float]] = {}
        for name, spec in methods.items():
            path = source if spec is None else patch(source, spec, output=root / name)
            model, _ = load_model(path, dtype=dtype, device=args.device)
            run = perplexity(model, eval_docs, lengths, progress=True, description=name)
            table[name] = {r.length: r.perplexity for r in run.lengths}
            del model

        # The headroom: the original model over the same pieces in windows of its own context (stride a quarter of
        # it), so every token is predicted from up to `original_length` tokens it was trained to read. An extension
        # that beats this has put the context beyond the original length to use.
        model, _ = load_model(source, dtype=dtype, device=args.device)
        run = perplexity(model, eval_docs, [original_length], protocol="sliding", stride=original_length // 4,
                         progress=True, description="original, sliding windows")
        sliding = run.lengths[0].perplexity
        del model

    longest = target
    report = {
        "benchmark": "rope_extension",
        "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized)",
        "device": args.device,
        "dtype": args.dtype,
        "documents": (
            f"Python documentation topics (stdlib pydoc_data), cut into {target}-token pieces: {len(search_docs)} for the "
            f"search, {len(eval_docs)} held out for these numbers (truncate protocol)"
        ),
        "target_length": target,
        "perplexity": table,
        f"original_sliding_{original_length}_windows_at_{target}": sliding,
        "search": {
            **found["search"],
            "wall_seconds": round(search_seconds, 1),
            "long_factor": found["long_factor"],
            "attention_factor": found["attention_factor"],
        },
        "ratios": {
            f"longrope_vs_yarn_at_{longest}": table["longrope"][longest] / table["yarn"][longest],
            f"longrope_vs_original_sliding_at_{longest}": table["longrope"][longest] / sliding,
            "longrope_vs_original_at_2048": table["longrope"][2048] / table["original"][2048],
            f"longrope_vs_original_at_{original_length}": table["longrope"][original_length] / table["original"][original_length],
        },
        "targets": {
            "longrope_better_than_yarn_by_5pct": table["longrope"][longest] <= 0.95 * table["yarn"][longest],
            "short_within_2pct": all(
                table["longrope"][n] <= 1.02 * table["original"][n] for n in (2048, original_length)
            ),
            "search_within_30_min": search_seconds <= 1800,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
