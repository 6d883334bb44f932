"""Recipes: the format's errors name the line, overrides apply, a re-run resumes, every built-in recipe runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import read_config, state_of
from llm_retrofit import run_recipe
from llm_retrofit.cli import main
from llm_retrofit.recipes import RecipeError, apply_overrides, builtin_names, dry_run, load_recipe, parse_recipe
from llm_retrofit.recipes import runner
from llm_retrofit.recipes.expressions import evaluate_expression
from llm_retrofit.recipes.steps import STEP_KINDS
from llm_retrofit.recipes.values import finetune_settings
from llm_retrofit.recipes.schema import EvalSettings
from test_finetune import chars_model, corpus
from test_hub import hub  # noqa: F401 - the test Hub fixture

GOOD = """\
name: mine
description: test
inputs:
  data: bundled:python-docs
steps:
  - patch: expand
    with: {every: 1}
  - finetune:
      train: [new_layers]
      steps: 2
      seq_len: 32
      data: ["${inputs.data}"]
  - eval: {lengths: [64], max_docs: 1, data: ["${inputs.data}"], plot: false}
"""


@pytest.mark.parametrize("text, line, message", [
    (GOOD.replace("description: test", "descripton: test"), 2, "unknown key 'descripton'; a recipe has name, description"),
    (GOOD.replace("      steps: 2", "      stpes: 2"), 10, "has no setting 'stpes'; its settings are data, max_docs"),
    (GOOD.replace("patch: expand", "patch: expnad"), 6, "unknown patch 'expnad'; the patches are"),
    (GOOD.replace("{every: 1}", "{evry: 1}"), 7, "patch 'expand' has no setting 'evry'; its settings are num_new_layers"),
    (GOOD.replace("  - eval:", "  - evaluate:"), 13, "unknown key 'evaluate'; a step has exactly one of patch, finetune"),
    (GOOD.replace("      seq_len: 32", "      seq_len: 32: 4"), 11, "not valid YAML: mapping values are not allowed"),
])
def test_schema_errors_name_the_line_and_the_valid_keys(text: str, line: int, message: str) -> None:
    with pytest.raises(RecipeError) as error:
        parse_recipe(text, "mine.yaml")
    assert str(error.value).startswith(f"mine.yaml:{line}: "), str(error.value)
    assert message in str(error.value)


def test_overrides_apply_to_steps_inputs_and_patch_parameters() -> None:
    recipe = apply_overrides(parse_recipe(GOOD), ["finetune.steps=7", "inputs.data=docs/", "expand.every=2",
                                                  "eval.lengths=[32, 64]"])
    assert recipe.step("finetune").params["steps"] == 7
    assert recipe.inputs["data"] == "docs/"
    assert recipe.step("expand").params == {"every": 2}
    assert recipe.step("eval").params["lengths"] == [32, 64]
    with pytest.raises(RecipeError, match="no step 'fintune'; the steps are expand, finetune, eval"):
        apply_overrides(parse_recipe(GOOD), ["fintune.steps=7"])
    with pytest.raises(RecipeError, match="has no setting 'step'"):
        apply_overrides(parse_recipe(GOOD), {"finetune.step": 7})


def test_expressions_compute_from_configs_and_refuse_anything_else() -> None:
    scope = {"base": {"max_position_embeddings": 2048, "num_hidden_layers": 30}, "inputs": {"factor": 4}}
    assert evaluate_expression("base.max_position_embeddings * inputs.factor", scope) == 8192
    assert evaluate_expression("max(1, base.num_hidden_layers // 4)", scope) == 7
    assert runner.resolve("run-${inputs.factor}x", scope) == "run-4x"
    with pytest.raises(RecipeError, match="base has no 'hidden'; it has max_position_embeddings"):
        evaluate_expression("base.hidden", scope)
    with pytest.raises(RecipeError, match="only names, numbers, arithmetic"):
        evaluate_expression("__import__('os')", scope)


def test_expressions_stay_within_what_a_recipe_value_can_be() -> None:
    scope = {"base": {"max_position_embeddings": 2048}, "inputs": {"zero": 0, "name": "run"}}
    assert evaluate_expression("10**18", scope) == 10**18  # a budget of 1e18 tokens is still a number
    assert evaluate_expression("inputs.name + '-long'", scope) == "run-long"
    with pytest.raises(RecipeError, match=r"\$\{base.max_position_embeddings // inputs.zero\} divides by zero"):
        evaluate_expression("base.max_position_embeddings // inputs.zero", scope)
    with pytest.raises(RecipeError, match=r"is about 1e19; a recipe value is below 1e18"):
        evaluate_expression("10**18 * 10", scope)
    with pytest.raises(RecipeError, match="is nan, not a finite number"):
        evaluate_expression("float('nan')", scope)
    with pytest.raises(RecipeError, match="arithmetic needs numbers, and 'run' is not one"):
        evaluate_expression("inputs.name * 10**12", scope)


@pytest.mark.parametrize("expression, message", [
    ("9**9**9", "RecipeError: ${9**9**9}: 9 ** 387420489 has about 369,693,100 digits"),
    # round(x, n) computes 10**-n first: n = -10**8 took 15 s, -10**18 forever (issue 25)
    ("round(5, -10**18)", "RecipeError: ${round(5, -10**18)}: round to -1000000000000000000 digits is beyond"),
])
def test_an_expression_that_would_compute_for_hours_is_refused_at_once(expression: str, message: str) -> None:
    import subprocess
    import sys

    # In a process of its own: before the bound, each ran for as long as one let it.
    code = f"from llm_retrofit.recipes.expressions import evaluate_expression as e; e({expression!r}, {{}})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr


def test_settings_are_read_as_their_fields_say() -> None:
    # A scalar where a list goes is a list of one, as `data: file.txt` always was: `lengths: 512` can mean nothing else.
    settings = EvalSettings.read({"lengths": 512, "passkey_lengths": 1024, "data": "notes.txt", "protocol": "sliding",
                                  "stride": 256})
    assert (settings.lengths, settings.passkey_lengths, settings.data) == ((512,), (1024,), ("notes.txt",))
    assert settings.evaluate_options() == {"lengths": (512,), "protocol": "sliding", "stride": 256,
                                           "passkey_lengths": (1024,), "passkey": False, "dtype": None}
    # YAML reads 1e-4 and 1e6 as text; they are numbers to a finetune. Lists of lora modules are the spec's `+`.
    finetune = finetune_settings({"lr": "1e-4", "tokens": "1e6", "data": "notes.txt", "bf16": False,
                                  "lora": {"r": 8, "trainable": ["embed_tokens", "norm"], "merge": False}})
    assert (finetune.lr, finetune.tokens, finetune.data, finetune.bf16) == (1e-4, 1_000_000, ("notes.txt",), False)
    assert (finetune.lora.r, finetune.lora.trainable, finetune.lora.merge) == (8, "embed_tokens+norm", False)
    # A quoted "no" is the bool a spec's `no` is (docs/specs.md), never the truthiness of a non-empty string.
    assert finetune_settings({"steps": 1, "gradient_checkpointing": "no"}).gradient_checkpointing is False
    for values, message in [({"steps": 2.5}, "steps=2.5 is not valid; expected an integer"),
                            ({"steps": 1, "gradient_checkpointing": "maybe"}, "expected true or false"),
                            ({"steps": 1, "lora": {"alpha": "big"}}, "lora.alpha='big' is not valid; expected a "
                                                                      "number"),
                            ({"steps": 1, "lora": [8]}, "lora=[8] is not valid; expected a mapping of lora settings"),
                            ({"steps": 1, "lr_groups": {"embed": "fast"}}, "expected a mapping of names to numbers")]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            finetune_settings(values)


def counting(monkeypatch: pytest.MonkeyPatch, fail_at: str | None = None) -> dict[str, int]:
    """Wrap every step kind's run with a call counter; `fail_at` makes that kind raise once, as a crash would."""
    calls: dict[str, int] = {}
    for kind, step_kind in STEP_KINDS.items():
        def counted(step, params, state, directory, run=type(step_kind).run, step_kind=step_kind, kind=kind):
            calls[kind] = calls.get(kind, 0) + 1
            if kind == fail_at:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the step
            return run(step_kind, step, params, state, directory)
        monkeypatch.setattr(step_kind, "run", counted)
    return calls


def test_resume_skips_completed_steps_and_reruns_from_a_changed_one(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base = chars_model(tmp_path / "base")
    recipe = parse_recipe(GOOD)
    options = dict(output=tmp_path / "run", overrides={"inputs.data": str(corpus(tmp_path))})
    calls = counting(monkeypatch, fail_at="eval")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(base, recipe, **options)
    assert calls == {"patch": 1, "finetune": 1, "eval": 1}
    with pytest.raises(RecipeError, match="holds an earlier recipe run; pass --resume"):
        run_recipe(base, recipe, **options)

    calls = counting(monkeypatch)
    done = run_recipe(base, recipe, resume=True, **options)
    assert calls == {"eval": 1} and done.skipped == ["expand", "finetune"] and done.ran == ["eval"]
    assert (tmp_path / "run" / "model").resolve() == tmp_path / "run" / "02-finetune"

    calls = counting(monkeypatch)  # a changed finetune value: the finetune and everything after it run again
    options["overrides"] = dict(options["overrides"], **{"finetune.steps": 1})
    done = run_recipe(base, recipe, resume=True, **options)
    assert calls == {"finetune": 1, "eval": 1} and done.skipped == ["expand"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["id"] for s in manifest["steps"]] == ["expand", "finetune", "eval"]
    assert manifest["steps"][1]["result"]["steps"] == 1


def test_a_value_known_only_when_run_is_checked_when_it_is_known(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The eval's length is what the patch step reports, so only the run knows it: checked then, before the eval runs.
    recipe = parse_recipe("name: late\ndescription: d\nsteps:\n  - patch: dtype\n    with: {to: bfloat16}\n"
                          "  - eval:\n      lengths: ['${steps.dtype.patch}']\n", "late.yaml")
    base = chars_model(tmp_path / "base")
    plan = dry_run(base, recipe)
    assert "values known only when run: ${steps.dtype.patch} depends on the result of step dtype" in plan
    calls = counting(monkeypatch)
    with pytest.raises(RecipeError, match=re.escape("late.yaml:7: step eval: lengths=['dtype:to=bfloat16'] is not "
                                                    "valid; expected an integer >= 2")):
        run_recipe(base, recipe, output=tmp_path / "run")
    assert calls == {"patch": 1}


def test_an_error_after_an_override_points_into_the_file_or_names_the_set(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    bad = parse_recipe(GOOD.replace("lengths: [64]", "lengths: [1]"), "mine.yaml")
    with pytest.raises(RecipeError, match=re.escape("mine.yaml:13: step eval: lengths=[1] is not valid")):
        dry_run(base, bad, overrides=["finetune.steps=7"])  # the file's own line, not one of the re-written text
    with pytest.raises(RecipeError, match=re.escape("mine.yaml (--set finetune.seq_len): step finetune: seq_len='x'")):
        dry_run(base, parse_recipe(GOOD, "mine.yaml"), overrides=["finetune.seq_len=x"])


def test_dry_run_prints_resolved_values_and_estimates_and_writes_nothing(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    result = CliRunner().invoke(main, ["patch", str(base), "--recipe", "llama-pro", "--dry-run", "-o", str(tmp_path / "o"),
                                       "--set", "finetune.steps=3", "--set", "finetune.seq_len=32",
                                       "--push-to-hub", "me/tiny-pro"])
    assert result.exit_code == 0, result.output
    assert "every: 1" in result.output  # max(1, 3 // 4): the expression was resolved against the base config
    assert "3 steps x 64 tokens = 192 tokens per process" in result.output  # batch_size 2 in the recipe
    assert "5. push (push)" in result.output and '"me/tiny-pro"' in result.output
    # 3 layers of the tiny model become 6; each rewritten checkpoint is that many bytes, written twice.
    assert "total weights written: 1.61 MB" in result.output
    assert not (tmp_path / "o").exists()


def test_recipes_list_and_show(tmp_path: Path) -> None:
    listed = CliRunner().invoke(main, ["recipes", "list"])
    assert listed.exit_code == 0 and [line.split()[0] for line in listed.output.splitlines()] == builtin_names()
    assert builtin_names() == ["gqa", "infini", "llama-pro", "long-context", "moe-instruct", "moe-upcycle"]
    shown = CliRunner().invoke(main, ["recipes", "show", "long-context"])
    (tmp_path / "copy.yaml").write_text(shown.output)
    assert load_recipe(tmp_path / "copy.yaml").steps == load_recipe("long-context").steps  # a copy is a recipe
    missing = CliRunner().invoke(main, ["recipes", "show", "infinite"])
    assert missing.exit_code != 0 and "the built-in recipes are gqa, infini, llama-pro, long-context, moe-instruct, moe-upcycle" \
        in missing.output


def tiny_budget(data: Path) -> dict:
    return {"inputs.data": str(data), "inputs.eval_data": str(data), "finetune.steps": 2, "finetune.seq_len": 64,
            "finetune.eval_every": 0}


def test_llama_pro_recipe_trains_only_the_new_blocks(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    done = run_recipe(base, "llama-pro", output=tmp_path / "run", overrides=tiny_budget(corpus(tmp_path)))
    expanded, trained = state_of(tmp_path / "run" / "01-expand"), state_of(done.model)
    changed = {name.split(".")[2] for name in expanded if not torch.equal(expanded[name], trained[name])}
    assert changed == {"1", "3", "5"}  # every=1 on 3 layers: a new block after each
    assert "| before |" in (tmp_path / "run" / "03-eval" / "eval.md").read_text()
    assert (done.model / "README.md").is_file() and (done.model / "retrofit_recipe.yaml").is_file()


def test_moe_upcycle_recipe_makes_and_trains_a_mixtral(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    # float32 throughout, as the plain-transformers reference below computes
    overrides = tiny_budget(corpus(tmp_path)) | {"eval.autocast": "off"}
    done = run_recipe(base, "moe-upcycle", output=tmp_path / "run", overrides=overrides)
    config = read_config(done.model)
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert [r["patch"] for r in config["retrofit_history"]] == ["moe", "finetune"]
    # The recipe's eval (sliding, stride = length = 512) against plain transformers: windows [0, 512), [512, 1024)...
    # each scored as `labels=window` does (its first token unscored), perplexity = exp(mean CE over all of them).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(done.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(done.model)
    ids = torch.tensor(tokenizer(corpus(tmp_path).read_text())["input_ids"])
    total = count = 0
    with torch.no_grad():
        for start in range(0, len(ids), 512):
            window = ids[None, start : start + 512]
            total += model(input_ids=window, labels=window).loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    # Same float32 arithmetic over other slices (a chunked LM head): equal to rounding, 1e-5 relative.
    assert done.results["eval"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_long_context_recipe_extends_finetunes_with_lora_and_evaluates(tmp_path: Path) -> None:
    # 256 positions -> 512: the recipe's own steps and lengths (128, 256, 384, 512), at a tiny budget.
    base = chars_model(tmp_path / "base", max_position_embeddings=256)
    overrides = {"profile": "none"} | tiny_budget(corpus(tmp_path)) | {
        "finetune.seq_len": "${model.max_position_embeddings}"}
    done = run_recipe(base, "long-context", output=tmp_path / "run", overrides=overrides)
    config = read_config(done.model)
    assert config["rope_parameters"]["rope_type"] == "longrope" and config["max_position_embeddings"] == 512
    assert [r["patch"] for r in config["retrofit_history"]] == ["longrope", "lora"]
    assert done.results["finetune"]["tokens"] == 2 * 512  # trained at the new length
    card = json.loads((tmp_path / "run" / "03-eval" / "card-eval.json").read_text())
    assert list(card["perplexity"]) == ["before", "yarn", "after"]
    assert set(card["perplexity"]["after"]) == {"128", "256", "384", "512"}
    assert set(card["passkey"]["after"]) == {"512"}  # the recipe hides its key at the new length only
    # The free alternative is YaRN at the same factor on the base model, config only: its column is that model's.
    from llm_retrofit import evaluate, patch
    from llm_retrofit.evaluation.documents import load_documents
    from transformers import AutoModelForCausalLM, AutoTokenizer

    yarn = patch(AutoModelForCausalLM.from_pretrained(base), "yarn:factor=2")
    documents = load_documents([str(corpus(tmp_path))], max_docs=1)
    alone = evaluate(yarn, documents, lengths=[128, 256, 384, 512], tokenizer=AutoTokenizer.from_pretrained(base),
                     progress=False).models[0]
    assert {str(r.length): r.perplexity for r in alone.perplexity} == pytest.approx(card["perplexity"]["yarn"])
    other = json.loads((tmp_path / "run" / "04-eval-code" / "card-eval.json").read_text())
    assert other["dataset"]["name"] == "bundled:python-source[:1]" and "passkey" not in other
    readme = (done.model / "README.md").read_text()
    assert "Passkey" in readme and "### On bundled:python-source[:1]" in readme
    # The card as the Hub reads it: a model-index result per data set, holding that data set's numbers of this model
    # (the code ones were listed under the docs' name), and the model named by the run's output directory, not by
    # the step directory it is in (02-finetune).
    from huggingface_hub import metadata_load

    index = metadata_load(done.model / "README.md")["model-index"]
    assert [entry["name"] for entry in index] == ["run"] and "\n# run\n" in readme
    perplexity = {result["dataset"]["name"]: {m["config"]: m["value"] for m in result["metrics"]}
                  for result in index[0]["results"] if result["metrics"][0]["type"] == "perplexity"}
    assert perplexity == {evaluation["dataset"]["name"]: {f"context_length={n}": value
                                                          for n, value in evaluation["perplexity"]["after"].items()}
                          for evaluation in (card, other)}
    # Each eval step's plot, under its own name beside the card: the two perplexity.png do not overwrite each other.
    assert re.findall(r"\]\((\S+\.png)\)", readme) == ["03-eval-perplexity.png", "04-eval-code-perplexity.png"]
    for step in ("03-eval", "04-eval-code"):
        placed = (done.model / f"{step}-perplexity.png").read_bytes()
        assert placed == (tmp_path / "run" / step / "perplexity.png").read_bytes()


def test_gqa_recipe_pools_distils_from_the_original_and_evaluates(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")  # 4 query heads, 2 KV heads -> 1
    overrides = tiny_budget(corpus(tmp_path)) | {"eval.lengths": [256], "gqa.calibration_tokens": 256}
    done = run_recipe(base, "gqa", output=tmp_path / "run", overrides=overrides)
    config = read_config(done.model)
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 4
    history = config["retrofit_history"]
    assert [r["patch"] for r in history] == ["gqa", "finetune"] and history[0]["params"]["method"] == "fit"
    assert history[1]["params"]["distill"]["teacher"] == str(base.resolve())  # teacher: base is the unpooled input
    assert done.results["finetune"]["distill"]["first_kl"] > 0  # pooling changed the model: there is a gap to close
    card = json.loads((tmp_path / "run" / "03-eval" / "card-eval.json").read_text())
    assert list(card["perplexity"]) == ["before", "gqa", "after"]
    # The mean-pooling column is the base pooled by mean in memory: the same numbers as that model on its own.
    from llm_retrofit import evaluate, patch
    from llm_retrofit.evaluation.documents import load_documents
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mean = patch(AutoModelForCausalLM.from_pretrained(base), "gqa:num_key_value_heads=1,method=mean")
    alone = evaluate(mean, load_documents([str(corpus(tmp_path))], max_docs=1), lengths=[256],
                     tokenizer=AutoTokenizer.from_pretrained(base), progress=False).models[0]
    assert {str(r.length): r.perplexity for r in alone.perplexity} == pytest.approx(card["perplexity"]["gqa"])
    readme = (done.model / "README.md").read_text()
    # 3 layers x (keys + values) x head_dim 16 x 4 bytes x 2 KV heads -> 1
    assert "KV cache per token: 768 bytes before, 384 after (float32), 50% smaller." in readme


def test_infini_recipe_trains_only_the_gates_and_measures_the_memory_against_itself_switched_off(
        tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    overrides = tiny_budget(corpus(tmp_path)) | {
        "inputs.segment_length": 16, "finetune.seq_len": "${inputs.segment_length * 4}", "eval.lengths": [64, 128],
        "eval.passkey_lengths": [384]}
    done = run_recipe(base, "infini", output=tmp_path / "run", overrides=overrides)
    config = read_config(done.model)
    assert config["retrofit_infini"] == {"segment_length": 16, "update": "delta", "gate_init": -4.0, "memory": True}
    assert [r["patch"] for r in config["retrofit_history"]] == ["infini", "finetune"]
    patched, trained = state_of(tmp_path / "run" / "01-infini"), state_of(done.model)
    changed = {name for name in patched if not torch.equal(patched[name], trained[name])}
    assert changed == {f"model.layers.{i}.self_attn.memory_gate" for i in range(3)}
    # Adam moves each gate by about its learning rate (1.0) per step: two steps, from -4, stay within [-6, -2]
    assert all((trained[name] + 4).abs().max() <= 2.0 + 1e-6 for name in changed)
    card = json.loads((tmp_path / "run" / "03-eval" / "card-eval.json").read_text())
    init = "infini:segment_length=16,update=delta,gate_init=-4.0"
    off = "infini:segment_length=16,update=delta,memory=false"
    assert list(card["perplexity"]) == ["before", init, off, "after"]
    assert list(card["passkey"]) == ["before", init, off, "after"]
    result = json.loads((tmp_path / "run" / "03-eval" / "eval.json").read_text())
    gates = {m["name"]: m["info"].get("memory_gates") for m in result["models"]}
    assert gates["before"] is None and gates[off] is None  # with the memory off the gates are never read
    assert gates[init]["mean"] == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item())
    assert gates["after"]["heads"] == 3 * 4 and sum(b["count"] for b in gates["after"]["histogram"]) == 12
    assert "Infini-attention memory gates of after" in (tmp_path / "run" / "03-eval" / "eval.md").read_text()
    assert "Infini-attention memory gates, as this checkpoint holds them" in (done.model / "README.md").read_text()


def test_moe_instruct_recipe_tunes_a_mixtral_on_conversations_and_reports_their_perplexity(tmp_path: Path) -> None:
    from conftest import save_tiny
    from llm_retrofit import evaluate
    from llm_retrofit.evaluation.conversations import load_conversations
    from test_chat import CONVERSATIONS, chars

    base = save_tiny(tmp_path / "base", max_position_embeddings=512)
    chars().save_pretrained(base)  # a character tokenizer with a ChatML template
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    overrides = {"inputs.data": str(chats), "inputs.eval_chat": str(chats), "inputs.eval_data": str(corpus(tmp_path)),
                 "finetune.steps": 2, "finetune.seq_len": 400, "eval.lengths": [256], "eval.stride": 256}
    done = run_recipe(base, "moe-instruct", output=tmp_path / "run", overrides=overrides)
    config = read_config(done.model)
    assert config["model_type"] == "mixtral" and [r["patch"] for r in config["retrofit_history"]] == ["moe", "finetune"]
    assert config["retrofit_history"][1]["params"]["data_format"] == "chat"  # auto-detected from the rows
    card = json.loads((tmp_path / "run" / "03-eval" / "card-eval.json").read_text())
    assert list(card["chat"]) == ["before", "after"] and list(card["perplexity"]) == ["before", "after"]
    assert card["dataset"]["name"] == f"{corpus(tmp_path)}, {chats}"
    # The card's number is the one `evaluate` gives the finished model on the same conversations.
    alone = evaluate(done.model, [], chat=load_conversations([str(chats)]), progress=False).models[0]
    assert alone.chat["perplexity"] == pytest.approx(card["chat"]["after"], rel=1e-5)
    readme = (done.model / "README.md").read_text()
    assert "Chat perplexity on held-out conversations" in readme and f"{card['chat']['after']:.2f}" in readme


def test_push_to_hub_uploads_the_final_model_with_its_card_and_recipe(hub, tmp_path: Path) -> None:
    import subprocess
    import sys

    from test_hub import client_env

    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("name: bf16\ndescription: cast\nsteps:\n  - patch: dtype\n    with: {to: bfloat16}\n  - card: {}\n")
    base = chars_model(tmp_path / "base")
    done = subprocess.run([sys.executable, "-m", "llm_retrofit", "patch", str(base), "--recipe", str(recipe), "-o",
                           str(tmp_path / "run"), "--push-to-hub", "alice/tiny-bf16"],
                          env=client_env(hub.url, tmp_path / "home"), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    files = hub.files("alice/tiny-bf16")
    assert {"config.json", "model.safetensors", "README.md", "retrofit_recipe.yaml"} <= set(files)
    assert files["retrofit_recipe.yaml"] == recipe.read_bytes()
    assert b"alice/tiny-bf16" in files["README.md"]  # the card was written for the repo it was pushed to
    assert json.loads(files["config.json"])["retrofit_history"][-1]["patch"] == "dtype"


def test_dry_run_of_a_searching_patch_says_what_is_known_only_when_run(tmp_path: Path) -> None:
    base = chars_model(tmp_path / "base")
    plan = dry_run(base, "long-context", overrides={"profile": "none", "inputs.data": str(corpus(tmp_path))})
    assert "target_length: 1024" in plan  # base.max_position_embeddings (512) * inputs.factor (2), resolved
    assert "plan known only when run: this patch loads the model" in plan
    assert "values known only when run: ${model.max_position_embeddings} depends on step longrope" in plan


def test_lora_as_a_patch_points_to_the_finetune() -> None:
    from llm_retrofit.errors import PatchSpecError
    from llm_retrofit.patchers import parse_spec

    with pytest.raises(PatchSpecError, match="lora is trained, not computed from the weights: use `retrofit finetune"):
        parse_spec("lora:r=8")


def test_a_cpu_without_bf16_units_runs_the_recipes_cpu_profile(tmp_path: Path, monkeypatch) -> None:
    """long-context's `cpu-fp32` profile is chosen by itself where every pass runs in float32; a profile given (or
    `none`, the recipe as written) is never replaced."""
    import llm_retrofit.modeling.precision as precision

    base = chars_model(tmp_path / "base")
    data = {"inputs.data": str(corpus(tmp_path))}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    slow = dry_run(base, "long-context", overrides=data)
    assert "profile cpu-fp32" in slow and "target_length: 768" in slow and "iterations: 0" in slow  # 512 x 1.5
    as_written = dry_run(base, "long-context", overrides={"profile": "none"} | data)
    assert "\nprofile none\n" in as_written and "target_length: 1024" in as_written
    assert "profile gpu" in dry_run(base, "long-context", overrides={"profile": "gpu"} | data)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    fast = dry_run(base, "long-context", overrides=data)
    assert "\nprofile" not in fast and "target_length: 1024" in fast


def test_the_time_a_run_expects_is_priced_on_the_passes_it_runs(tmp_path: Path) -> None:
    """Before the run, every step's passes are known, a search's and the steps after it too (the model's shape is
    known though its factors are not); then the run makes those passes, counted at the model's decoder. Calls of at
    most 32 tokens are not priced (the LM-head check, a passkey answer's decoding steps); a passkey prompt is priced
    at its length and stops at the last whole filler sentence before it; the search is priced at the most it runs
    (a child equal to a candidate already scored is not run again)."""
    import traceback

    from llm_retrofit.recipes.runner import _check_before_running, _with_overrides

    base = chars_model(tmp_path / "base", max_position_embeddings=256)
    overrides = {"profile": "none"} | tiny_budget(corpus(tmp_path)) | {
        "finetune.seq_len": "${model.max_position_embeddings}"}
    recipe, _ = _with_overrides("long-context", overrides, None)
    planned = _check_before_running(recipe, str(base), tmp_path / "run", None)
    layers = read_config(base)["num_hidden_layers"]
    counted: dict[str, list[int]] = {"search": [], "others": []}
    call = torch.nn.Module.__call__

    def counting(module: torch.nn.Module, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if type(module).__name__ == "LlamaModel" and ids is not None and ids.shape[-1] > 32 and \
                len(module.layers) == layers:  # not the one-layer model that prices passes
            searching = any(frame.name == "search" for frame in traceback.extract_stack())
            counted["search" if searching else "others"].append(int(ids.shape[-1]))
        return call(module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(torch.nn.Module, "__call__", counting)
        run_recipe(base, "long-context", output=tmp_path / "run", overrides=overrides)
    search, *others = [[one.tokens for one in item.passes] for item in planned]
    assert search == [512] * 6 and 3 <= len(counted["search"]) <= 6 and set(counted["search"]) == {512}
    # 2 training sequences at 512; eval: before 1, yarn 1, after 2 (LongRoPE switches factors past 256), a passkey
    # prompt each; eval-code: 1 + 1 + 2.
    priced = sorted(tokens for step in others for tokens in step)
    assert len(counted["others"]) == len(priced) == 2 + (4 + 3) + 4
    assert all(0.8 * p <= c <= p for c, p in zip(sorted(counted["others"]), priced)), (counted, priced)
