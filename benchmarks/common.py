"""Shared by the benchmarks: a synthetic checkpoint, and timing a piece of work in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Peak RSS: VmHWM of this process (fresh after exec, unlike ru_maxrss, which Linux carries over from the parent),
# or of cp, which runs as a child of a small interpreter. Reads: /proc/self/io over the work alone, not the imports
# (Linux adds the counts of a child to its parent's once it is waited for, so cp's count too): read_bytes is what came
# from the disk (memory-mapped pages included, so the reader's tensor reads count; a page-cache hit counts nothing),
# rchar what read() calls returned (mapped pages are not counted). `setup` may fill COUNTERS, a dict of numbers,
# which is reported beside them.
MEASURE = """
import json, resource, sys, time
setup, work, SOURCE, OUTPUT = sys.argv[1:5]
COUNTERS = {}
exec(setup)
def io():
    return {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io").read().splitlines())}
io_before = io()
start = time.perf_counter()
exec(work)
elapsed = time.perf_counter() - start
io_after = io()
status = open("/proc/self/status").read()
own = int(status.split("VmHWM:")[1].split()[0]) * 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
reads = {key: io_after[key] - io_before[key] for key in ("read_bytes", "rchar")}
print(json.dumps({"work_s": elapsed, "peak_rss": max(own, child), **reads, **COUNTERS}))
"""


def measure(setup: str, work: str, source: Path, output: Path) -> dict[str, float]:
    """Run `work` (after untimed `setup`) in a fresh interpreter with SOURCE and OUTPUT defined."""
    subprocess.run(["sync"], check=True)  # no contender pays for the previous one's dirty pages
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, setup, work, str(source), str(output)], capture_output=True, text=True
    )
    process = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(result.stderr)
    measured = json.loads(result.stdout.splitlines()[-1])
    return {
        "work_s": measured.pop("work_s"), "process_s": process, "peak_rss_gb": measured.pop("peak_rss") / 1e9,
        "read_bytes_gb": measured.pop("read_bytes") / 1e9, "rchar_gb": measured.pop("rchar") / 1e9, **measured,
    }


def cpu_name() -> str:
    """The CPU's model name, which every benchmark reports beside its figures."""
    import platform

    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM), in GB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024 / 1e9


def child_argv() -> list[str]:
    """This benchmark's command line without `--model DIR`, which a child measurement is given explicitly."""
    passed = [a for a in sys.argv[1:] if a]
    if "--model" in passed:
        at = passed.index("--model")
        passed = passed[:at] + passed[at + 2:]
    return passed


def in_child(script: str, model_dir: Path, child: list[str], label: dict) -> dict:
    """One measurement in a fresh interpreter (`script --model DIR --child ...`), so that its peak RSS is its own; its
    last stdout line is the JSON it measured. Prints `label` and the result to stderr as progress."""
    command = [sys.executable, script, *child_argv(), "--model", str(model_dir), "--child", *child]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        measured = {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    else:
        measured = json.loads(result.stdout.splitlines()[-1])
    print(json.dumps({**label, **measured}), file=sys.stderr, flush=True)
    return measured


def checkpoint_or_bundled(model: Path | None, directory: Path) -> Path:
    """`model`, or the bundled SmolLM2-135M converted into `directory/smollm2` (`retrofit convert bundled:smollm2`)."""
    if model is not None:
        return model
    converted = directory / "smollm2"
    subprocess.run([sys.executable, "-m", "llm_retrofit", "convert", "bundled:smollm2", str(converted)],
                   check=True, capture_output=True)
    return converted


def load_into_page_cache(directory: Path) -> None:
    """Read every file under `directory` once, so that the next reader finds it in the page cache."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def evict_from_page_cache(directory: Path) -> None:
    """Drop the cached pages of every file under `directory` (and only those: other work on the machine keeps its
    cache), so that the next reader gets them from the disk, as it would for a checkpoint larger than memory."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_synthetic(path: Path, size_gb: float, dtype: str = "float32", vocab: int = 32000) -> tuple[int, int]:
    """Make a random Llama checkpoint of about `size_gb` in a child process (so this one stays small: Linux
    children inherit the parent's peak RSS); returns (total bytes, largest tensor bytes)."""
    made = subprocess.run(
        [sys.executable, __file__, str(path), str(size_gb), dtype, str(vocab)], check=True, capture_output=True,
        text=True,
    )
    total, largest = made.stdout.split()
    return int(total), int(largest)


def _make(path: Path, size_gb: float, dtype_name: str, vocab: int) -> tuple[int, int]:
    """A random Llama checkpoint of about `size_gb` in 1 GB shards; returns (bytes, largest tensor bytes)."""
    hidden, intermediate = 2048, 5632
    itemsize = 2 if dtype_name in ("bfloat16", "float16") else 4
    per_layer = (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * itemsize
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * hidden * itemsize) / per_layer))
    config = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
              "tie_word_embeddings": False}
    return write_random_checkpoint(path, config, dtype_name)


def write_random_checkpoint(path: Path, config: dict, dtype_name: str = "bfloat16", seed: int = 0) -> tuple[int, int]:
    """A Llama (or any architecture `config` names) with random weights, written one tensor at a time in 1 GB
    shards, so that making a model larger than memory needs a few tensors of it: matrices N(0, 0.02^2), norms 1.
    The tensor names and shapes are transformers' own, read off the model built on the meta device. Returns (total
    bytes, largest tensor bytes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_retrofit.io.checkpoint import TensorMeta
    from llm_retrofit.io.writer import SafetensorsWriter, layout_shards, write_index

    dtype = getattr(torch, dtype_name)
    settings = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config, "dtype": dtype_name}
    made = AutoConfig.for_model(**{k: v for k, v in settings.items() if k != "architectures"})
    made.architectures = settings["architectures"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(made)
    tied = {"lm_head.weight"} if made.tie_word_embeddings else set()  # saved once, as the embedding
    metas = {name: TensorMeta(dtype, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied}
    path.mkdir(parents=True)
    made.save_pretrained(path)
    layout = layout_shards(metas, 1 << 30)
    generator = torch.Generator().manual_seed(seed)
    for file_name, names in layout.items():
        with SafetensorsWriter(path / file_name, {n: metas[n] for n in names}) as writer:
            for name in names:
                shape = metas[name].shape
                weight = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
                writer.write(name, weight.to(dtype))
    write_index(path, layout, metas)
    return sum(m.nbytes for m in metas.values()), max(m.nbytes for m in metas.values())


if __name__ == "__main__":
    print(*_make(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
