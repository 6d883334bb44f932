"""Publishing over real HTTP: `retrofit push` and `llm_retrofit.push` against the test Hub in hub_server.py.

huggingface_hub reads HF_ENDPOINT (and HF_HUB_OFFLINE, which conftest sets for this process) when it is imported, so
every client runs in a fresh subprocess whose environment points it at the server, with its own HF_HOME and Xet
disabled (the server speaks LFS). The client is the unmodified library; the server is the only stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import assert_same_tensors, png_bytes, save_adapter, save_tiny, snapshot, state_of
from hub_server import HubServer
from llm_retrofit import PublishError, convert, push, render_card

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_aliceWriteTokenForTheTestHub0123456789"
BOB_TOKEN = "hf_bobWriteTokenForTheTestHub9876543210"
WRONG_TOKEN = "hf_revokedTokenNobodyKnows5555555555"
CLIENT_TIMEOUT_S = 180
EVALUATION = {"perplexity": {"tiny-plot": {"128": 140.0, "256": 151.0}}}


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer({TOKEN: "alice", BOB_TOKEN: "bob"}) as server:
        yield server


def client_env(hub_url: str, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    """The environment of a client process: our server, a private HF_HOME, online, Xet off, no stray HF settings."""
    stray = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(stray)}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)


def retrofit(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "llm_retrofit", *map(str, args)], env)


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run([sys.executable, "-c", code], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: exactly one line starting with "Error:" (log lines may surround it), no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def hosted_card(hub: HubServer, repo_id: str, revision: str = "main") -> ModelCard:
    return ModelCard(hub.files(repo_id, revision)["README.md"].decode())


@pytest.fixture(scope="module")
def base_repo(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny Llama pushed once as alice/tiny-base, and its local directory."""
    work = tmp_path_factory.mktemp("base")
    local = save_tiny(work / "tiny-base")
    ok(retrofit("push", local, "alice/tiny-base", env=client_env(hub.url, work / "home")))
    return "alice/tiny-base", local


# ------------------------------------------------------------------------------------------------- round trips


def test_round_trip_patch_push_and_load_gives_identical_weights(hub: HubServer, base_repo: tuple[str, Path],
                                                                tmp_path: Path) -> None:
    patched = tmp_path / "tiny-bf16"
    result = python("import llm_retrofit\n"  # the source is the Hub repo: downloaded through the server first
                    f"out = llm_retrofit.patch({base_repo[0]!r}, 'dtype:to=bfloat16', output={str(patched)!r})\n"
                    "print(llm_retrofit.push(out, 'alice/tiny-bf16'))", client_env(hub.url, tmp_path / "home"))
    assert result.stdout.startswith(f"{hub.url}/alice/tiny-bf16/commit/")

    downloaded = tmp_path / "downloaded"
    loader_env = client_env(hub.url, tmp_path / "fresh-home", token=None)  # a public repo needs no token
    python("from transformers import AutoModelForCausalLM\n"
           "model = AutoModelForCausalLM.from_pretrained('alice/tiny-bf16')\n"
           f"assert str(model.dtype) == 'torch.bfloat16', model.dtype\n"
           f"model.save_pretrained({str(downloaded)!r})", loader_env)
    assert_same_tensors(state_of(downloaded), state_of(patched))

    hosted = hub.files("alice/tiny-bf16")
    local = {p.name: p.read_bytes() for p in patched.iterdir()}
    assert {name: hosted[name] for name in local} == local, "every file arrives byte for byte"
    card = hosted_card(hub, "alice/tiny-bf16")
    assert (card.data.base_model, card.data.base_model_relation) == ("alice/tiny-base", "quantized")
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-bf16")' in card.text


def test_pushed_adapter_loads_with_peft(hub: HubServer, base_repo: tuple[str, Path], tmp_path: Path) -> None:
    base_id, base_dir = base_repo
    adapter = save_adapter(base_dir, tmp_path / "tiny-lora")
    with pytest.raises(PublishError, match="was not written by llm-retrofit"):
        push(adapter, "alice/tiny-lora")  # peft's own template card is refused before any request
    render_card(adapter, base_model=base_id)
    ok(retrofit("push", adapter, "alice/tiny-lora", env=client_env(hub.url, tmp_path / "home")))

    logits = tmp_path / "logits.pt"
    python("import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
           f"base = AutoModelForCausalLM.from_pretrained({base_id!r})\n"
           "model = PeftModel.from_pretrained(base, 'alice/tiny-lora').eval()\n"
           "with torch.no_grad():\n"
           f"    torch.save(model(torch.arange(24)[None]).logits, {str(logits)!r})",
           client_env(hub.url, tmp_path / "fresh-home", token=None))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local_base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        plain = local_base(torch.arange(24)[None]).logits
        expected = PeftModel.from_pretrained(local_base, adapter).eval()(torch.arange(24)[None]).logits
    # Same weights and inputs in two processes: only the order of float32 reductions may differ, far below 1e-5.
    torch.testing.assert_close(torch.load(logits), expected, rtol=0, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3, "the adapter must change the output, or the test proves nothing"
    card = hosted_card(hub, "alice/tiny-lora")
    assert (card.data.library_name, card.data.base_model_relation) == ("peft", "adapter")


def test_plot_and_evaluation_are_uploaded_beside_the_card(hub: HubServer, tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "ppl.png").write_bytes(png_bytes())
    render_card(tiny_llama, plot=tmp_path / "ppl.png", eval_results=EVALUATION, base_model="alice/tiny-base")
    ok(retrofit("push", tiny_llama, "alice/tiny-plot", env=client_env(hub.url, tmp_path / "home")))
    hosted = hub.files("alice/tiny-plot")
    assert hosted["ppl.png"] == png_bytes()
    card = hosted_card(hub, "alice/tiny-plot")
    assert "![Evaluation by context length](ppl.png)" in card.text
    assert [r.metric_value for r in card.data.eval_results] == [140.0, 151.0], "kept when push re-rendered the card"


def test_branch_and_pull_request(hub: HubServer, tiny_llama: Path, tmp_path: Path) -> None:
    result = python("import llm_retrofit\n"
                    f"branch = llm_retrofit.push({str(tiny_llama)!r}, 'alice/tiny-branches', revision='dev')\n"
                    f"pr = llm_retrofit.push({str(tiny_llama)!r}, 'alice/tiny-branches', create_pr=True)\n"
                    "print(branch.pr_url, pr.pr_url)", client_env(hub.url, tmp_path / "home"))
    assert result.stdout.split() == ["None", f"{hub.url}/alice/tiny-branches/discussions/1"]
    refs = hub.refs("alice/tiny-branches")
    assert set(refs) == {"main", "dev", "refs/pr/1"}
    assert "config.json" in hub.files("alice/tiny-branches", "dev")
    assert set(hub.files("alice/tiny-branches", "main")) == {".gitattributes"}, "main is untouched until merged"
    assert "config.json" in hub.files("alice/tiny-branches", "refs/pr/1")


def test_repush_of_a_resharded_model_deletes_the_stale_shards(hub: HubServer, tiny_sharded: Path,
                                                              tmp_path: Path) -> None:
    single = convert(tiny_sharded, tmp_path / "single")
    python("import llm_retrofit\n"
           f"llm_retrofit.push({str(tiny_sharded)!r}, 'alice/tiny-reshard')\n"
           f"llm_retrofit.push({str(single)!r}, 'alice/tiny-reshard')", client_env(hub.url, tmp_path / "home"))
    assert {name for name in hub.files("alice/tiny-reshard") if "safetensors" in name} == {"model.safetensors"}


# ---------------------------------------------------------------------------------------------------- failures

FAILURES = {
    # case: (repo, token, injected failure or None, words the message must contain)
    "unauthorized": ("alice/fail-401", WRONG_TOKEN, None, ["401", "hf auth login", "HF_TOKEN"]),
    "forbidden": ("bob/fail-403", None, None, ["403", "write access", "'bob' namespace"]),
    "repo-not-found": ("alice/fail-404", None, ("POST", "/alice/fail-404/preupload/", 404, "RepoNotFound"),
                       ["does not exist or is not visible", "hf auth login"]),
    "revision-not-found": ("alice/fail-rev", None, ("POST", "/alice/fail-rev/commit/", 404, "RevisionNotFound"),
                           ["revision", "does not exist"]),
    "server-error": ("alice/fail-500", None, ("POST", "/alice/fail-500/commit/", 500, None),
                     ["500", "while committing", "run the same command again"]),
    "card-rejected": ("alice/fail-card", None, ("POST", "/api/validate-yaml", 400, None),
                      ["rejected the model card", "retrofit card"]),
}

PUSH_ALL = """
import json, sys
from llm_retrofit import PublishError, push
results = {}
for name, (directory, repo, token, attempts) in json.loads(sys.argv[1]).items():
    for _ in range(attempts):
        try:
            results.setdefault(name, []).append({"ok": str(push(directory, repo, token=token))})
        except PublishError as e:
            results.setdefault(name, []).append({"error": str(e)})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def failed_pushes(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every failure case pushed from one client process (one interpreter start instead of six), each from its own
    copy of a tiny model whose card was written beforehand, so that any change to the directory would show."""
    work = tmp_path_factory.mktemp("failures")
    model = save_tiny(work / "tiny")
    cases, before = {}, {}
    for name, (repo, token, failure, _) in FAILURES.items():
        directory = work / name
        shutil.copytree(model, directory)
        render_card(directory, repo_id=repo, base_model="alice/tiny-base")
        before[name] = snapshot(directory)
        if failure:
            method, path, status, code = failure
            hub.fail(method, path, status, headers={"X-Error-Code": code} if code else None,
                     body_contains=repo if path == "/api/validate-yaml" else None)
        cases[name] = (str(directory), repo, token, 2 if name == "server-error" else 1)
    with hub.recording() as requests:
        result = run([sys.executable, "-c", PUSH_ALL, json.dumps(cases)], client_env(hub.url, work / "home"))
    hub.clear_failures()
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "results": json.loads(result.stdout.splitlines()[-1]),
        "output": result.stdout + result.stderr,
        "requests": requests,
        "unchanged": {name: snapshot(work / name) == before[name] for name in FAILURES},
    }


@pytest.mark.parametrize("case", FAILURES)
def test_failure_is_one_clear_message_and_leaves_the_directory_untouched(case: str, failed_pushes: dict) -> None:
    repo, _, _, words = FAILURES[case]
    first = failed_pushes["results"][case][0]
    assert "error" in first, first
    assert first["error"].startswith(f"pushing to {repo} failed: ")
    for word in words:
        assert word in first["error"]
    assert failed_pushes["unchanged"][case]
    for secret in (TOKEN, WRONG_TOKEN):
        assert secret not in failed_pushes["output"]


def test_rerun_after_a_failed_commit_continues_without_uploading_again(hub: HubServer, failed_pushes: dict) -> None:
    second = failed_pushes["results"]["server-error"][1]
    assert second["ok"].startswith(f"{hub.url}/alice/fail-500/commit/")
    requests = failed_pushes["requests"]
    puts = [r for r in requests if r[0] == "PUT" and r[1].startswith("/lfs/alice/fail-500/")]
    commits = [r[2] for r in requests if r[1] == "/api/models/alice/fail-500/commit/main"]
    assert len(puts) == 1, "the weights went up once; the re-run found them stored"
    assert commits == [500, 200]
    assert "model.safetensors" in hub.files("alice/fail-500")


def test_unreachable_hub_is_reported_quickly_on_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    start = time.monotonic()
    result = retrofit("push", tiny_llama, "alice/nowhere", env=client_env(closed, tmp_path / "home"))
    assert time.monotonic() - start < 60
    error = error_line(result)
    assert error.startswith(f"Error: pushing to alice/nowhere failed: could not reach the Hub at {closed}")
    assert "run the same command again" in error and TOKEN not in result.stderr + result.stdout


def test_missing_token_is_refused_before_any_request(tiny_llama: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    # In this process huggingface_hub is offline (conftest): a request would fail with another message.
    with pytest.raises(PublishError, match=r"no Hugging Face token found: log in with `hf auth login`, set HF_TOKEN"):
        push(tiny_llama, "alice/no-token")
    assert not (tiny_llama / "README.md").exists(), "refused before the card was written, too"


def test_token_appears_in_no_file_and_no_output(hub: HubServer, tiny_llama: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = client_env(hub.url, home, token=None)
    pushed = ok(retrofit("-vv", "push", tiny_llama, "alice/tiny-secret", "--token", TOKEN, env=env))
    refused = retrofit("-vv", "push", tiny_llama, "alice/tiny-secret", "--token", WRONG_TOKEN, env=env)
    assert error_line(refused).startswith("Error: pushing to alice/tiny-secret failed: the Hub refused the token (401")
    files = [p for root in (tiny_llama, home) for p in root.rglob("*") if p.is_file()]
    assert files, "the client home and the model directory were written to"
    contents = [p.read_bytes() for p in files] + list(hub.files("alice/tiny-secret").values())
    outputs = pushed.stdout + pushed.stderr + refused.stdout + refused.stderr
    assert "INFO llm_retrofit" in outputs, "-vv logging was on (our own; the HTTP libraries' debug logs print headers)"
    for secret in (TOKEN, WRONG_TOKEN):
        assert secret not in outputs
        assert not any(secret.encode() in content for content in contents)


# ------------------------------------------------------------------------------ refused before any request


def test_incomplete_checkpoint_is_refused(tiny_llama: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_llama / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tiny_llama / "model.safetensors", metadata={"format": "pt"})
    missing = r"not a complete checkpoint: 1 tensor\(s\) missing, e.g. model.layers.1.mlp.down_proj"
    with pytest.raises(PublishError, match=missing):
        push(tiny_llama, "alice/incomplete")


def test_adapter_without_weights_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = save_adapter(tiny_llama, tmp_path / "lora")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PublishError, match="not a complete adapter: 1 file"):
        push(adapter, "alice/no-weights")


def test_foreign_card_is_refused_and_kept(tiny_llama: Path) -> None:
    (tiny_llama / "README.md").write_text("# My own notes\n")
    with pytest.raises(PublishError, match=r"was not written by llm-retrofit .* Run `retrofit card"):
        push(tiny_llama, "alice/foreign")
    assert (tiny_llama / "README.md").read_text() == "# My own notes\n"


def test_pull_request_to_another_branch_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(PublishError, match="a pull request is opened against main"):
        push(tiny_llama, "alice/x", revision="dev", create_pr=True)


def test_push_help_teaches_with_examples() -> None:
    from click.testing import CliRunner

    from llm_retrofit.cli import main

    output = CliRunner().invoke(main, ["push", "--help"]).output
    assert "retrofit push smollm2-bf16/ my-org/smollm2 --revision bf16" in output and "--create-pr" in output
    assert "retrofit push" in CliRunner().invoke(main, ["--help"]).output


def test_offline_mode_is_named_as_the_reason(tiny_llama: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1 for this process, so huggingface_hub refuses the first request itself.
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it"):
        push(tiny_llama, "alice/offline", token=TOKEN)
