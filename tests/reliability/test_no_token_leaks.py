"""The Hub token never appears in any output or any file written, under every error path.

Each case runs one `retrofit -vv ...` command in a fresh client process (as tests/test_hub.py does: the test Hub of
tests/hub_server.py on HF_ENDPOINT, a private HF_HOME, the working directory inside the case's folder) with a fake
token in HF_TOKEN and/or --token, makes it fail in one way, and then asserts that the token is in neither its stdout
nor its stderr (debug logging on) nor in any file under the case's folder: the model directory, the output or recipe
run directory, HF_HOME (we never call `login`, so not even huggingface_hub's own token file may hold it) and the
working directory. Where the server's error text quotes the token, the quote must arrive redacted.

`test_the_leak_check_finds_a_leak` is the control: a process that does print and write the token is caught, in its
output and in a file of its HF_HOME, so a passing case means the token really was absent.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import save_tiny
from hub_server import HubServer
from test_hub import client_env

SECRET = "hf_test_secret_token_xyz"  # a write token alice holds on the test Hub
WRONG = "hf_test_secret_token_revoked_abc"  # a token the Hub does not know: 401
FRAGMENTS = ("secret_token_xyz", "secret_token_revoked_abc")  # a leak of a part of a token counts too
TIMEOUT_S = 180

RECIPE = "name: leak\ndescription: cast and card\nsteps:\n  - patch: dtype\n    with: {to: bfloat16}\n  - card: {}\n"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer({SECRET: "alice"}) as server:
        yield server


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("leak-model") / "tiny")


@dataclass
class Case:
    folder: Path
    result: subprocess.CompletedProcess[str]


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def run_case(folder: Path, model: Path, args: list[str], endpoint: str, *, env_token: str | None = SECRET,
             extra_env: dict[str, str] | None = None, verbosity: str = "-vv") -> Case:
    """Run `retrofit -vv ARGS` with MODEL copied to FOLDER/model ("{model}" and "{folder}" in ARGS are replaced)."""
    folder.mkdir(parents=True)
    shutil.copytree(model, folder / "model")
    (folder / "leak.yaml").write_text(RECIPE)
    env = client_env(endpoint, folder / "home", token=env_token)
    env.update(extra_env or {})
    command = [sys.executable, "-m", "llm_retrofit", *([verbosity] if verbosity else []),
               *[a.replace("{model}", str(folder / "model")).replace("{folder}", str(folder)) for a in args]]
    result = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=TIMEOUT_S)
    return Case(folder, result)


def leaks(case: Case, secrets: tuple[str, ...] = (SECRET, WRONG, *FRAGMENTS)) -> list[str]:
    """Where any of the secrets appears: 'stdout', 'stderr', or a file's path relative to the case's folder."""
    found = [name for name, text in (("stdout", case.result.stdout), ("stderr", case.result.stderr))
             if any(s in text for s in secrets)]
    for path in sorted(case.folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(s.encode() in data for s in secrets):
                found.append(str(path.relative_to(case.folder)))
    return found


def assert_failed_without_leaks(case: Case, expect: str, debug: bool = False) -> str:
    """`debug`: the command ran with -vv, the most a user can print (llm-retrofit's own debug log; the HTTP
    libraries' debug logs, which print headers, stay off)."""
    output = case.result.stdout + case.result.stderr
    assert case.result.returncode != 0, f"the command was meant to fail:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert expect in output, f"expected {expect!r} (the failure this case is about):\n{output[-3000:]}"
    if debug:
        assert "INFO llm_retrofit" in output or "DEBUG llm_retrofit" in output, "-vv logging was on"
    assert leaks(case) == [], f"the token leaked into {leaks(case)}:\n{output[-3000:]}"
    return output


# --------------------------------------------------------------------------------------------------- control


def test_the_leak_check_finds_a_leak(tmp_path: Path, model: Path) -> None:
    folder = tmp_path / "control"
    folder.mkdir()
    (folder / "home").mkdir()
    env = client_env(closed_port_url(), folder / "home", token=SECRET)
    code = "import os; t = os.environ['HF_TOKEN']; print('token', t); open('home/stray', 'w').write(t[3:])"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert leaks(Case(folder, result)) == ["stdout", "home/stray"]


# ----------------------------------------------------------------------------------------------------- push


def test_push_with_a_server_500(hub: HubServer, model: Path, tmp_path: Path) -> None:
    hub.fail("POST", "/alice/leak-500/commit/", 500)
    try:
        case = run_case(tmp_path / "c", model, ["push", "{model}", "alice/leak-500"], hub.url)
    finally:
        hub.clear_failures()
    assert_failed_without_leaks(case, "500", debug=True)


QUOTING_VERBOSITY = ["", "-v", "-vv"]


@pytest.mark.parametrize("verbosity", QUOTING_VERBOSITY)
def test_push_with_a_server_500_that_quotes_the_token(hub: HubServer, model: Path, tmp_path: Path,
                                                      verbosity: str) -> None:
    repo = f"alice/leak-500-quoted{verbosity}"
    hub.fail("POST", f"/{repo}/commit/", 500, message=f"internal error for Bearer {SECRET}")
    try:
        case = run_case(tmp_path / "c", model, ["push", "{model}", repo], hub.url, verbosity=verbosity)
    finally:
        hub.clear_failures()
    output = assert_failed_without_leaks(case, "500", debug=verbosity == "-vv")
    assert "<token>" in output, "the server's words (which quoted the token) reached the message, redacted"


def test_push_with_a_token_the_hub_refuses_401(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["push", "{model}", "alice/leak-401", "--token", WRONG], hub.url,
                    env_token=None)
    assert_failed_without_leaks(case, "401", debug=True)


def test_push_with_the_token_in_both_places_and_a_401(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["push", "{model}", "alice/leak-401b", "--token", WRONG], hub.url)
    assert_failed_without_leaks(case, "401", debug=True)


def test_push_to_a_namespace_the_token_may_not_write_403(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["push", "{model}", "bob/leak-403"], hub.url)
    assert_failed_without_leaks(case, "403", debug=True)


def test_push_offline(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["push", "{model}", "alice/leak-offline", "--token", SECRET], hub.url,
                    extra_env={"HF_HUB_OFFLINE": "1"})
    assert_failed_without_leaks(case, "HF_HUB_OFFLINE")


def test_push_to_an_unreachable_hub(model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["push", "{model}", "alice/leak-nowhere", "--token", SECRET],
                    closed_port_url())
    assert_failed_without_leaks(case, "could not reach the Hub")


@pytest.mark.parametrize("repo_id", ["not a repo id", "alice/too/deep", "alice/--bad.."])
def test_push_to_an_invalid_repo_id(hub: HubServer, model: Path, tmp_path: Path, repo_id: str) -> None:
    case = run_case(tmp_path / "c", model, ["push", "{model}", repo_id, "--token", SECRET], hub.url)
    assert_failed_without_leaks(case, "Error")


# ------------------------------------------------------------------------------------- recipe, patch, card


def test_recipe_whose_push_step_fails(hub: HubServer, model: Path, tmp_path: Path) -> None:
    hub.fail("POST", "/alice/leak-recipe/commit/", 500)
    try:
        case = run_case(tmp_path / "c", model, ["patch", "{model}", "--recipe", "{folder}/leak.yaml", "-o",
                                                "{folder}/run", "--push-to-hub", "alice/leak-recipe"], hub.url)
    finally:
        hub.clear_failures()
    assert_failed_without_leaks(case, "500", debug=True)
    assert (case.folder / "run" / "manifest.json").is_file(), "the steps before the push ran and were scanned"


def test_recipe_whose_push_step_has_an_invalid_repo_id(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["patch", "{model}", "--recipe", "{folder}/leak.yaml", "-o",
                                            "{folder}/run", "--push-to-hub", "not a repo id"], hub.url)
    assert_failed_without_leaks(case, "Error")


def test_patch_of_a_hub_repo_that_does_not_exist(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["patch", "alice/leak-missing", "-p", "dtype:to=bfloat16", "-o",
                                            "{folder}/out"], hub.url)
    assert_failed_without_leaks(case, "Error")


def test_card_that_fails(hub: HubServer, model: Path, tmp_path: Path) -> None:
    case = run_case(tmp_path / "c", model, ["card", "{model}", "--eval", "{folder}/missing.json"], hub.url)
    assert_failed_without_leaks(case, "Error")
