"""MoE upcycling and block expansion: llm-retrofit vs mergekit, on SmolLM2-135M and a synthetic >= 2 GB checkpoint.

    python benchmarks/moe_expand.py [--workdir /tmp] [--mergekit-venv /tmp/mergekit-venv] [--synthetic-gb 2.2]

Both tools run as their command-line programs in fresh processes (interpreter start and imports included on both
sides), one after the other, after `sync`. mergekit is installed from PyPI into its own virtual environment (made
on first use; pass --mergekit-venv to reuse one). The same patches are expressed in both:
- MoE: every expert a copy of the dense MLP, random router (`moe:num_experts=E,top_k=2` vs mergekit-moe with
  `gate_mode: random` and E copies of the model as experts);
- expansion: after every N layers a copy of the previous layer with o_proj and down_proj zeroed (`expand:every=N` vs
  mergekit-yaml passthrough with a `scale: 0` filter on those projections).
The outputs are compared tensor by tensor (routers aside, which are random in both): `identical` says whether both
tools wrote the same weights. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import checkpoint_or_bundled, make_synthetic, measure

RUN = "import subprocess; subprocess.run(COMMAND, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"


def ensure_mergekit(venv: Path) -> Path:
    binary = venv / "bin" / "mergekit-yaml"
    if not binary.exists():
        print(f"installing mergekit into {venv} (first run only)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU build; plain torch would pull CUDA
        subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return venv / "bin"


def timed(command: list[str], source: Path, output: Path) -> dict[str, float]:
    return measure(f"COMMAND = {command!r}", RUN, source, output)


def moe_config(source: Path, experts: int, dtype: str) -> str:
    lines = [f"base_model: {source}", "gate_mode: random", f"dtype: {dtype}", "experts_per_token: 2", "experts:"]
    lines += [f"  - source_model: {source}" for _ in range(experts)]
    return "\n".join(lines) + "\n"


def expand_config(source: Path, layers: int, every: int, dtype: str) -> str:
    """mergekit passthrough: groups of `every` layers, each followed by a zero-output copy of its last layer."""
    zeroed = "parameters: {scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: 0.0}, {value: 1.0}]}"
    lines = ["merge_method: passthrough", f"dtype: {dtype}", "slices:"]
    for start in range(0, layers, every):
        end = min(start + every, layers)
        lines.append(f"  - sources: [{{model: {source}, layer_range: [{start}, {end}]}}]")
        if end - start == every:
            lines.append(f"  - sources: [{{model: {source}, layer_range: [{end - 1}, {end}], {zeroed}}}]")
    return "\n".join(lines) + "\n"


def same_weights(ours: Path, theirs: Path) -> bool:
    """Tensor-by-tensor equality, routers aside (random in both). mergekit 0.1.5 writes Mixtral experts fused, as
    transformers 5 holds them in memory (mlp.experts.gate_up_proj = [w1; w3] per expert, mlp.experts.down_proj =
    w2); we write the per-expert layout that transformers 4 and 5, vLLM and llama.cpp read. Both are compared fused."""
    import torch

    from llm_retrofit import load_checkpoint

    a, b = load_checkpoint(ours), load_checkpoint(theirs)
    ours_tensors = {n: a.read(n) for n in a.tensors}
    experts = a.config.get("num_local_experts", 0)
    for layer in range(a.config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        if f"{prefix}mlp.experts.gate_up_proj" in b.tensors:
            w = lambda e, k: ours_tensors.pop(f"{prefix}block_sparse_moe.experts.{e}.{k}.weight")  # noqa: E731
            ours_tensors[f"{prefix}mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w(e, "w1"), w(e, "w3")]) for e in range(experts)])
            ours_tensors[f"{prefix}mlp.experts.down_proj"] = torch.stack([w(e, "w2") for e in range(experts)])
    routers = {n for n in set(ours_tensors) | set(b.tensors) if n.endswith("gate.weight")}
    if set(ours_tensors) - routers != set(b.tensors) - routers:
        return False
    return all(torch.equal(t, b.read(n)) for n, t in ours_tensors.items() if n not in routers)


def compare(root: Path, mergekit: Path, name: str, source: Path, experts: int, every: int, dtype: str) -> dict:
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    cli = [sys.executable, "-m", "llm_retrofit", "patch", str(source), "-o"]
    results: dict[str, dict] = {}
    for patch, spec, tool, config in (
        ("moe", f"moe:num_experts={experts},top_k=2", "mergekit-moe", moe_config(source, experts, dtype)),
        ("expand", f"expand:every={every}", "mergekit-yaml", expand_config(source, layers, every, dtype)),
    ):
        ours, theirs = root / f"{name}-{patch}-retrofit", root / f"{name}-{patch}-mergekit"
        config_file = root / f"{name}-{patch}.yml"
        config_file.write_text(config)
        extra = ["--i-understand-this-is-not-useful-without-training"] if tool == "mergekit-moe" else []
        retrofit = timed(cli + [str(ours), "-p", spec], source, ours)
        other = timed([str(mergekit / tool), str(config_file), str(theirs), *extra], source, theirs)
        results[patch] = {
            "spec": spec,
            "retrofit": retrofit,
            "mergekit": other,
            "wall_ratio_retrofit_vs_mergekit": retrofit["process_s"] / other["process_s"],
            "rss_ratio_retrofit_vs_mergekit": retrofit["peak_rss_gb"] / other["peak_rss_gb"],
            "identical": same_weights(ours, theirs),
        }
        shutil.rmtree(ours)
        shutil.rmtree(theirs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--mergekit-venv", type=Path, default=Path(tempfile.gettempdir()) / "mergekit-venv")
    parser.add_argument("--synthetic-gb", type=float, default=2.2)
    args = parser.parse_args()
    mergekit = ensure_mergekit(args.mergekit_venv)

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="moe-expand-") as tmp:
        root = Path(tmp)
        smollm2 = checkpoint_or_bundled(None, root)
        synthetic = root / "synthetic"
        size, _ = make_synthetic(synthetic, args.synthetic_gb, "bfloat16")
        for tokenizer_file in smollm2.glob("tokenizer*"):  # mergekit-moe insists on a tokenizer
            shutil.copy(tokenizer_file, synthetic / tokenizer_file.name)
        report = {
            "benchmark": "moe_expand",
            "note": "process_s: whole CLI process of each tool; best of one run each",
            "smollm2_135m_float32": compare(root, mergekit, "smollm2", smollm2, experts=8, every=3, dtype="float32"),
            f"synthetic_{size / 1e9:.2f}gb_bfloat16": compare(
                root, mergekit, "synthetic", synthetic, experts=4, every=4, dtype="bfloat16"
            ),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
