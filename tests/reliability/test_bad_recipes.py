"""Bad recipes, one row per defect: each is refused with one line naming its place and its fix, before any step runs.

A recipe's first step here is a quick `dtype` patch that works; the mistake comes after it. `--dry-run` must refuse
what the run would (issue 12, 4.5), and the run must refuse it before that first step, leaving no output directory:
a real recipe's first step may be an hour-long search. The rest are the tracebacks of 4.6 and the hang of 4.11.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import refuse
from test_finetune import chars_model

HEADER = """\
name: bad
description: one mistake, after a first step that works
inputs:
  factor: 2
steps:
  - patch: dtype
    with: {to: bfloat16}
"""  # the step under test starts on line 8


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chars_model(tmp_path_factory.mktemp("model") / "base")


def deep_aliases(levels: int) -> str:
    """A few lines of YAML anchors, each a list of ten of the one before: 10**levels values once expanded."""
    lines = ["name: bad", "description: aliases", "inputs:", "  a0: &a0 x"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines + ["steps:", "  - patch: dtype", "    with: {to: bfloat16}", ""])


BAD_STEPS = [
    # 4.5: found today only when the run reaches the step, after the steps before it
    pytest.param("  - eval:\n      data: [docs.txt]\n      lengths: abc\n",
                 "r.yaml:10: step eval: lengths='abc' is not valid; expected an integer >= 2 or a list of them, "
                 "e.g. lengths: [2048, 4096]", id="eval-lengths-not-numbers"),
    pytest.param("  - eval: {lengths: [64], protocol: chunked}\n",
                 "r.yaml:8: step eval: protocol='chunked' is not valid; expected one of truncate, sliding",
                 id="eval-unknown-protocol"),
    pytest.param("  - finetune:\n      steps: 2\n      data: 7\n",
                 "r.yaml:10: step finetune: data=7 is not valid; expected a string or a list of strings; quote it",
                 id="finetune-data-a-number"),
    pytest.param("  - push: {private: true}\n", "r.yaml:8: step push: push needs repo_id; add `repo_id: you/model`",
                 id="push-without-repo-id"),
    pytest.param("  - push: {repo_id: not a repo id}\n", "r.yaml:8: step push: 'not a repo id' is not a Hub repo id",
                 id="push-to-an-invalid-repo-id"),
    pytest.param("  - finetune: {steps: 2, tokens: 100}\n",
                 "r.yaml:8: step finetune: finetune: give exactly one budget", id="finetune-two-budgets"),
    pytest.param("  - eval: {lengths: [64], stride: 8}\n",
                 "r.yaml:8: step eval: a stride is only used by the sliding protocol",
                 id="eval-stride-without-sliding"),
    pytest.param("  - eval: {passkey: true, passkey_depths: [0.5, 2]}\n",
                 "r.yaml:8: step eval: passkey_depths=[0.5, 2] is not valid; expected a number in [0, 1]",
                 id="eval-passkey-depth-outside-0-1"),
    pytest.param("  - eval: {dtype: float7}\n", "r.yaml:8: step eval: dtype='float7' is not valid; expected one of "
                 "float32", id="eval-unknown-dtype"),
    pytest.param("  - card: {base_model: 7}\n", "r.yaml:8: step card: base_model=7 is not valid; expected a string",
                 id="card-base-model-a-number"),
    pytest.param("  - patch: expand\n    with:\n      every: [1, 2]\n",
                 "r.yaml:10: step expand: patch 'expand': every=[1, 2] is not valid; expected one value, not a list",
                 id="patch-value-a-list"),
    pytest.param("  - patch: dtype\n", "r.yaml:8: step dtype-2: patch 'dtype' needs to (under `with:`)",
                 id="patch-without-a-required-value"),
    pytest.param("  - finetune: {steps: 2, distill: {teacher: base, temprature: 2}}\n",
                 "r.yaml:8: distill has no setting 'temprature'; its settings are teacher, temperature, alpha, top_k, "
                 "cache", id="distill-unknown-key"),
    pytest.param("  - finetune: {steps: 2, distill: {teacher: base, temperature: 0}}\n",
                 "r.yaml:8: step finetune: distill: temperature=0 must be above 0", id="distill-temperature-0"),
    pytest.param("  - finetune: {steps: 2, distill: {teacher: base, alpha: 1.5}}\n",
                 "r.yaml:8: step finetune: distill: alpha=1.5 must be in [0, 1]", id="distill-alpha-above-1"),
    pytest.param("  - finetune: {steps: 2, distill: {alpha: 0.5}}\n",
                 "r.yaml:8: step finetune: distill: give the teacher", id="distill-without-a-teacher"),
    pytest.param("  - finetune:\n      steps: 2\n      distill: {teacher: /nowhere/teacher}\n",
                 "r.yaml:10: step finetune: distill: teacher=/nowhere/teacher does not exist; give a checkpoint "
                 "directory, a Hub repo id, or base", id="distill-teacher-path-missing"),
    pytest.param("  - finetune: {steps: 2, distill: {teacher: base, cache: true}}\n",
                 "r.yaml:8: step finetune: distill: cache: true stores the teacher's top_k log-probs",
                 id="distill-cache-without-top-k"),
    # 4.6: raw tracebacks
    pytest.param("  - finetune:\n      steps: 2\n      lora: {r: abc, alpha: 32}\n",
                 "r.yaml:10: step finetune: lora.r='abc' is not valid; expected an integer",
                 id="lora-rank-not-a-number"),
    pytest.param("  - eval: {lengths: ['${inputs.factor // 0}']}\n",
                 "r.yaml:8: step eval: ${inputs.factor // 0} divides by zero; change the divisor",
                 id="expression-divides-by-zero"),
    pytest.param("  - eval: {lengths: ['${\"x\" * 10**12}']}\n",
                 "r.yaml:8: step eval: ${\"x\" * 10**12}: arithmetic needs numbers", id="expression-repeats-text"),
    pytest.param("  - eval: {lengths: !!python/name:os.system ''}\n",
                 "r.yaml:8: could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'; "
                 "a recipe holds plain values", id="yaml-python-tag"),
    pytest.param("  - eval:\n      max_docs: !!int many\n",
                 "r.yaml:9: tag:yaml.org,2002:int 'many' is not a value of that type", id="yaml-tag-of-a-wrong-value"),
    pytest.param("  - eval: {[1, 2]: 3}\n", "r.yaml:8: a key must be a word or a number", id="yaml-list-as-a-key"),
    # 4.11: an expression beyond any recipe value (9**9**9 itself, which hung, is timed in test_recipes.py)
    pytest.param("  - finetune: {tokens: '${inputs.factor ** 64}'}\n",
                 "r.yaml:8: step finetune: ${inputs.factor ** 64}: 2 ** 64 has about 19 digits; a recipe value is "
                 "below 1e18", id="expression-beyond-a-recipe-value"),
    # issue 25: round(5, -10**18) computes 10**(10**18) first, and hung the dry run
    pytest.param("  - eval: {lengths: ['${round(5, -10**18)}']}\n",
                 "r.yaml:8: step eval: ${round(5, -10**18)}: round to -1000000000000000000 digits is beyond what a "
                 "recipe value holds (below 1e18); give round(x, n) with n between -18 and 18",
                 id="expression-rounds-to-more-digits-than-a-value-holds"),
]


@pytest.mark.parametrize("mode", ["dry-run", "run"])
@pytest.mark.parametrize("step, expect", BAD_STEPS)
def test_a_bad_step_is_refused_before_the_first_step_runs(step: str, expect: str, mode: str, base: Path,
                                                          tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HEADER + step)
    out = tmp_path / "out"
    args = ["patch", base, "--recipe", recipe] + (["--dry-run"] if mode == "dry-run" else ["-o", out])
    message = refuse(args, expect=expect, untouched=[base], absent=[out])
    assert len(message.strip().splitlines()) == 1, message


@pytest.mark.parametrize("text, expect", [
    pytest.param(HEADER.replace("  factor: 2", "  factor: ${base.num_layers}"),
                 "r.yaml:4: inputs.factor: ${base.num_layers}: base has no 'num_layers'; it has",
                 id="input-expression-names-its-line"),
    pytest.param(deep_aliases(6), "expands to more than 10000 values (YAML aliases repeated inside each other?)",
                 id="yaml-aliases-expand-without-end"),
    pytest.param("name: bad\ndescription: \x00\nsteps: []\n",
                 "r.yaml:2: not a YAML text: character U+0000 is not allowed", id="control-character"),
])
def test_a_bad_recipe_text_is_refused(text: str, expect: str, base: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    refuse(["patch", base, "--recipe", recipe, "-o", tmp_path / "out"], expect=expect, untouched=[base],
           absent=[tmp_path / "out"])


def _line_of(text: str, recipe: str = "long-context") -> int:
    """The line of a built-in recipe that starts with `text` (where its errors point)."""
    from llm_retrofit.recipes.schema import builtin_directory

    lines = (builtin_directory() / f"{recipe}.yaml").read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(text))


@pytest.mark.parametrize("recipe, setting, expect", [
    # long-context's finetune and eval hold values known only after its LongRoPE search; the rest is checked first
    pytest.param("long-context", "finetune.tokens=100", f"long-context.yaml:{_line_of('  - finetune:')}: step "
                 "finetune: finetune: give exactly one budget", id="two-budgets-beside-a-value-known-only-when-run"),
    pytest.param("long-context", "eval.protocol=chunked", "long-context.yaml (--set eval.protocol): step eval: "
                 "protocol='chunked' is not valid", id="protocol-beside-lengths-known-only-when-run"),
    pytest.param("long-context", "finetune.steps=[", "--set finetune.steps=[: '[' is not a YAML value",
                 id="set-value-not-yaml"),
    # issue 25: inputs were not checked before the run. A patch that loads the model (a search, a calibration) is
    # checked against the input by the patcher itself (what `retrofit patch --dry-run` refuses), before it loads.
    pytest.param("long-context", "inputs.factor=-5", f"long-context.yaml:{_line_of('  - patch: longrope')}: step "
                 "longrope: longrope: the new context (-2560 tokens) must be longer than the current 512; pass a "
                 "factor > 1 or a larger target_length. (target_length: ${round(base.max_position_embeddings * "
                 "inputs.factor)} = -2560)", id="negative-factor-input"),
    pytest.param("gqa", "inputs.kv_heads=2", f"gqa.yaml:{_line_of('  - patch: gqa', 'gqa')}: step gqa: gqa: "
                 "num_key_value_heads=2 must be fewer than this model's 2 key/value heads and divide them; use one "
                 "of [1]. (num_key_value_heads: ${inputs.kv_heads} = 2)", id="kv-heads-input-the-model-cannot-take"),
    pytest.param("long-context", "inputs.nosuchinput=3", "--set inputs.nosuchinput: long-context.yaml has no input "
                 "'nosuchinput'; its inputs are data, eval_data, other_data, factor.", id="unknown-input"),
    pytest.param("long-context", "inputs.factor=${round(5, -10**18)}", "long-context.yaml (--set inputs.factor): "
                 "inputs.factor: ${round(5, -10**18)}: round to -1000000000000000000 digits is beyond",
                 id="set-expression-rounds-to-more-digits-than-a-value-holds"),
])
def test_a_bad_override_of_a_built_in_recipe_is_refused_before_its_search(recipe: str, setting: str, expect: str,
                                                                         base: Path, tmp_path: Path) -> None:
    for mode in (["--dry-run"], ["-o", tmp_path / "out"]):
        message = refuse(["patch", base, "--recipe", recipe, "--set", setting, *mode], expect=expect,
                         untouched=[base], absent=[tmp_path / "out"])
        assert len(message.strip().splitlines()) == 1, message


def test_a_binary_recipe_file_is_refused(base: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\x1f\x8b\x08\x00" * 256)  # gzip's magic bytes, as in a recipes.tar.gz renamed
    refuse(["patch", base, "--recipe", recipe, "-o", tmp_path / "out"],
           expect="r.yaml is not a recipe: byte 1 is not UTF-8 text, and a recipe is a YAML file",
           untouched=[base], absent=[tmp_path / "out"])


@pytest.mark.parametrize("manifest, problem", [
    pytest.param('{"recipe": "bad", "steps": [{"id": "dtype", "ke', "not JSON", id="cut-short"),
    pytest.param('{"recipe": "bad", "steps": {"dtype": 1}}', "not the list of steps a run writes", id="wrong-shape"),
    pytest.param(b"\xff\xfe{}", "not UTF-8 text", id="not-text"),
])
def test_a_damaged_manifest_is_refused_on_resume(manifest: str | bytes, problem: str, base: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "01-dtype").mkdir(parents=True)
    path = out / "manifest.json"
    path.write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HEADER)
    refuse(["patch", base, "--recipe", recipe, "-o", out, "--resume"],
           expect=f"manifest.json is damaged ({problem}), so --resume cannot tell which steps are done; remove",
           untouched=[base, out])


def test_an_output_that_is_a_file_is_refused(base: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HEADER)
    (tmp_path / "outputs").mkdir()
    taken = tmp_path / "outputs" / "notes.txt"
    taken.write_text("mine")
    refuse(["patch", base, "--recipe", recipe, "-o", taken], expect="notes.txt is a file; a recipe run writes a "
           "directory", untouched=[base, tmp_path / "outputs"])
    refuse(["patch", base, "--recipe", recipe, "-o", taken / "run"], expect="cannot create the output directory",
           untouched=[base, tmp_path / "outputs"])


EVAL_ONLY = """\
name: eval-only
description: measure the input, nothing else
steps:
  - eval: {lengths: [64], max_docs: 1, data: [DATA], plot: false}
"""


def test_a_push_that_fails_after_an_eval_only_recipe_leaves_the_source_untouched(base: Path, tmp_path: Path) -> None:
    """Issue 25: no step makes a model, so the push uploads the input; it wrote its card into the source, then the
    upload failed. The card goes on a copy (hard links) in the push step's directory."""
    import subprocess
    import sys

    from harness import tree_state
    from test_finetune import corpus
    from test_hub import client_env

    recipe = tmp_path / "r.yaml"
    recipe.write_text(EVAL_ONLY.replace("DATA", str(corpus(tmp_path))))
    before = tree_state(base)
    env = client_env("http://127.0.0.1:9", tmp_path / "home")  # a token, and a Hub that refuses every connection
    done = subprocess.run([sys.executable, "-m", "llm_retrofit", "patch", str(base), "--recipe", str(recipe), "-o",
                           str(tmp_path / "out"), "--push-to-hub", "alice/tiny"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "pushing to alice/tiny failed: could not reach the Hub" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert tree_state(base) == before
    assert (tmp_path / "out" / "02-push" / "README.md").is_file()  # the card is on the copy the push uploads


def test_a_push_of_an_input_with_a_card_of_someone_else_is_refused_before_the_run(base: Path, tmp_path: Path) -> None:
    """The push of the input would refuse its card (the source model's, not ours) after the steps before it ran."""
    from test_finetune import corpus

    source = tmp_path / "source"
    shutil.copytree(base, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The original model\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(EVAL_ONLY.replace("DATA", str(corpus(tmp_path))))
    refuse(["patch", source, "--recipe", recipe, "-o", tmp_path / "out", "--push-to-hub", "alice/tiny"],
           expect=f"r.yaml: step push: no step before the push makes a model, so it would upload the input {source}, "
           "whose README.md was not written by llm-retrofit and would describe the wrong model; add a `- card: {}` "
           "step before the push (it writes the card on a copy; the input is never written to).",
           untouched=[source], absent=[tmp_path / "out"])
