"""Upload a checkpoint or adapter directory to the Hugging Face Hub, with its model card.

`push` checks everything it can on this machine before it writes or sends anything: the directory is a complete
checkpoint (or a peft adapter with its weights), the README.md is not someone else's card, a token exists, the Hub
is not switched off (HF_HUB_OFFLINE). Then it writes the card
for the repo id (see `card.py`; only if its content changes), creates the repo (and the branch), and uploads the
directory with huggingface_hub's `upload_folder` in one commit, so the repo never shows half a model. Large files go
through huggingface_hub's Xet or LFS machinery with its progress bars. Weight files the repo has and the directory no
longer has are deleted in the same commit, so a re-sharded or re-patched model never loads stale shards.

Every failure of the Hub or the network becomes one `PublishError` that says what to do. The local directory is
never changed by a failed upload, and a re-run continues: files the Hub already stores are not sent again.

The token comes from `token=`, else HF_TOKEN, else the huggingface_hub login (`hf auth login`). It is handed to
huggingface_hub and nowhere else: never logged, printed, or written into the card, the config or an error message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .card import CARD_FILE, open_model_directory, read_existing_card, render_card
from ..errors import PublishError, RetrofitError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

log = logging.getLogger(__name__)

# Deleted from the repo when the directory no longer has them: stale weights would be loaded instead of, or mixed
# with, the new ones (transformers prefers model.safetensors over an index, for one).
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf"]
LOGIN_HINT = "log in with `hf auth login`, set HF_TOKEN, or pass --token (token=) with a token that has write access"


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, before anything is written (the card) or sent."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f"{repo_id!r} is not a Hub repo id ({e}); use owner/name, e.g. alice/smollm2-16k.") from None


def push(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload a checkpoint or peft adapter directory to the Hub repo `repo_id` (created if needed) in one commit.

    `revision` is a branch (created from main if it does not exist); `create_pr` opens a pull request against main
    instead of committing to it. Returns huggingface_hub's `CommitInfo`: a str (the commit URL) with `.oid` and
    `.pr_url`. Raises PublishError (or CheckpointError for an unreadable directory) with what to do.
    """
    from huggingface_hub import HfApi, get_token, is_offline_mode

    model = open_model_directory(path)
    missing = model.missing()
    if missing:
        raise PublishError(
            f"{model.path} is not a complete {'adapter' if model.is_adapter else 'checkpoint'}: {len(missing)} "
            f"{'file' if model.is_adapter else 'tensor'}(s) missing, e.g. {missing[0]}. Finish writing it (or "
            "download it again) before uploading."
        )
    existing = read_existing_card(model.path)
    if existing.exists and not existing.ours:
        raise PublishError(
            f"{model.path / CARD_FILE} was not written by llm-retrofit (it may be the source model's card, copied by "
            f"`retrofit patch`, or peft's template), so it would describe the wrong model. Run `retrofit card "
            f"{model.path}` to replace it (its license is kept), then push again."
        )
    if create_pr and revision not in (None, "main"):
        raise PublishError(f"a pull request is opened against main; drop --revision {revision} or --create-pr.")
    check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise PublishError(f"no Hugging Face token found: {LOGIN_HINT}.")
    if is_offline_mode():  # huggingface_hub would refuse the first request, after the card was written
        raise PublishError(
            f"pushing to {repo_id} failed: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to "
            "push. Nothing was written or sent."
        )
    api = HfApi(token=token)
    if "/" not in repo_id:  # the card's loading snippet needs the full id, owner included
        with _hub_errors(repo_id, revision, token):
            repo_id = f"{api.whoami()['name']}/{repo_id}"
    render_card(model.path, repo_id=repo_id)  # validated before it is written; left alone if already current
    if not read_existing_card(model.path).metadata.get("base_model"):
        log.warning("the card names no base model; run `retrofit card %s --base-model OWNER/NAME` to link it to its "
                    "base on the Hub", model.path)
    with _hub_errors(repo_id, revision, token):
        log.info("creating %s on %s (if it does not exist)", repo_id, api.endpoint)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        log.info("uploading %s to %s", model.path, repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=model.path,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or _default_message(model.path, model.history, model.is_adapter),
            delete_patterns=WEIGHT_PATTERNS,
        )


def _default_message(path: Path, history: list[dict], is_adapter: bool) -> str:
    if is_adapter:
        return f"Upload adapter {path.name} with llm-retrofit"
    patches = [str(record.get("patch")) for record in history]
    return f"Upload {path.name} with llm-retrofit" + (f" ({', then '.join(patches)})" if patches else "")


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: str) -> Iterator[None]:
    """Turn what huggingface_hub and the network raise into one PublishError saying what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RetrofitError:
        raise
    except Exception as error:
        cause = error if isinstance(error, ValueError) and "README.md" in str(error) else _root_cause(error)
        again = ("Nothing was committed; run the same command again to continue (files already uploaded are not "
                 "sent again).")
        if isinstance(cause, OfflineModeIsEnabled):
            message = "HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to push."
        elif isinstance(cause, RevisionNotFoundError):
            message = (f"revision {revision!r} does not exist in {repo_id} (or is not a branch): pass an existing "
                       "branch, or a new branch name to create it.")
        elif isinstance(cause, RepositoryNotFoundError):
            message = (f"the Hub says {repo_id} does not exist or is not visible to this token: check the repo id, "
                       f"and that the token may write to it ({LOGIN_HINT}).")
        elif isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            url = str(cause.response.request.url) if cause.response.request is not None else ""
            server = cause.server_message or cause.response.reason_phrase
            if status == 401:
                message = f"the Hub refused the token (401 Unauthorized: {server}): {LOGIN_HINT}."
            elif status == 403:
                namespace = repo_id.split("/")[0]
                message = (f"the token may not write to {repo_id} (403 Forbidden: {server}): use a token with write "
                           f"access to the {namespace!r} namespace ({LOGIN_HINT}), or push to your own namespace.")
            elif status == 404:
                message = f"the Hub answered 404 Not Found ({server}) for {url}: check the repo id and revision."
            elif status == 429:
                message = f"the Hub is rate-limiting this token (429: {server}); wait a few minutes. {again}"
            elif status >= 500:
                stage = "contacting the Hub"
                if "/commit/" in url:
                    stage = "committing"
                elif "/preupload/" in url or "/lfs" in url or ".git/info/lfs" in url:
                    stage = "uploading"
                message = f"the Hub failed with {status} ({server}) while {stage}. {again}"
            else:
                message = f"the Hub refused the upload ({status}: {server})."
        elif isinstance(cause, ValueError) and "README.md" in str(cause):
            message = f"the Hub rejected the model card: {cause}. Fix it with `retrofit card DIR`, then push again."
        elif _is_network_error(cause):
            message = (f"could not reach the Hub at {constants.ENDPOINT} ({type(cause).__name__}: {cause}); check the "
                       f"network (and HF_ENDPOINT, if set). {again}")
        else:
            raise
        message = " ".join(f"pushing to {repo_id} failed: {message}".split())  # one line, whatever the server said
        if len(token) >= 8:  # the server's words are quoted; make sure the token is never among them
            message = message.replace(token, "<token>")
        raise PublishError(message) from None


def _root_cause(error: BaseException) -> BaseException:
    """The innermost HTTP or network error: huggingface_hub wraps LFS upload errors in RuntimeError."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, HfHubHTTPError) or _is_network_error(seen):
            return seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return error


def _is_network_error(error: BaseException) -> bool:
    """Connection refused or reset, DNS failure, timeout (OfflineModeIsEnabled is a ConnectionError too).

    huggingface_hub 1.x speaks through httpx and 2.x through httpx2; both name their base class TransportError.
    """
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(cls.__name__ == "TransportError" and cls.__module__.startswith("httpx") for cls in type(error).__mro__)
