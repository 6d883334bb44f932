"""The `moe-instruct` recipe on SmolLM2-135M-Instruct against the same budget of plain-text finetuning.

    python benchmarks/moe_instruct.py [--model DIR] [--text-data bundled:python-docs[1:]] [--prompts 3]
                                      [--new-tokens 48] [--set KEY=VALUE ...]

Runs the recipe twice from the same model: as shipped (instruction tuning on `bundled:python-chat`, loss on the
assistant's tokens), and with `inputs.data` set to --text-data (documents, every token scored), every other setting
equal: the same upcycling, steps, rows, sequence length and learning rates. Reports each run's wall time, trained
tokens, and its eval step's numbers: the held-out conversations' assistant-token perplexity (`bundled:python-chat@test`)
and a held-out document's perplexity, before and after. Then greedy answers (chat template, --new-tokens) to the first
--prompts held-out questions from the original model and from both finetuned ones. --set passes recipe overrides to
both runs (e.g. finetune.steps=10 for a quick look).

Prints one JSON object; the recipes' progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from common import checkpoint_or_bundled


def run(model_dir: Path, output: Path, overrides: dict) -> dict:
    from llm_retrofit import run_recipe

    start = time.perf_counter()
    done = run_recipe(model_dir, "moe-instruct", output=output, overrides=overrides)
    card = json.loads((output / "03-eval" / "card-eval.json").read_text())
    return {"seconds": time.perf_counter() - start, "model": str(done.model),
            "tokens": done.results["finetune"]["tokens"], "final_loss": done.results["finetune"]["final_loss"],
            "chat_perplexity": card.get("chat"), "document_perplexity": card["perplexity"]}


def answers(model_dir: Path | str, prompts: list[list[dict]], new_tokens: int) -> list[str]:
    from llm_retrofit.evaluation.perplexity import load_model
    from llm_retrofit.io.progress import quiet_libraries

    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    replies = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad(), quiet_libraries():  # the checkpoint's sampling defaults warn under greedy decoding
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--text-data", default="bundled:python-docs[1:]")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.manual_seed(0)
    from llm_retrofit.evaluation.conversations import load_conversations

    overrides = dict(item.split("=", 1) for item in args.set)
    held_out = load_conversations(["bundled:python-chat@test"])[:args.prompts]
    prompts = [[m for m in c.messages if m["role"] != "assistant"][:1] for c in held_out]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = checkpoint_or_bundled(args.model, Path(scratch))
        chat = run(model_dir, Path(scratch) / "chat", overrides)
        text = run(model_dir, Path(scratch) / "text", overrides | {"inputs.data": args.text_data})
        report = {
            "model": str(args.model or "bundled:smollm2"), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "overrides": overrides,
            "instruction_tuned": chat, "text_tuned": text,
            "greedy": [{"question": p[0]["content"], "reference": [m for m in c.messages if m["role"] == "assistant"][0]
                        ["content"]} for p, c in zip(prompts, held_out)],
        }
        for name, path in (("original", model_dir), ("instruction_tuned", chat["model"]), ("text_tuned", text["model"])):
            for entry, reply in zip(report["greedy"], answers(path, prompts, args.new_tokens)):
                entry[name] = reply
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
