"""Conversations: chat data read and checked, rendered with the model's chat template, the assistant's tokens found.

Formats. A chat source is a JSONL file whose rows are either `{"messages": [{"role", "content"}, ...]}` (the format
of `datasets` and the Hub) or `{"prompt": ..., "completion": ...}`, where a string prompt is one user message and a
string completion one assistant message (either may also be a list of messages); or a bundled set
(`bundled:python-chat`, made at run time from the Python standard library's docstrings, `@test` for its held-out
split). Any chat source followed by `[i]` or `[a:b]` gives only those conversations, as for documents.

Assistant spans. Transformers' `return_assistant_tokens_mask` needs `{% generation %}` markers in the template,
which most templates (SmolLM2's, Llama's, Mistral's) lack. So the spans are found by rendering prefixes: the
assistant turn k is what `messages[:k+1]` renders to beyond what `messages[:k]` renders to with the generation
prompt (`<|im_start|>assistant\\n`), i.e. its content and its end-of-turn token, without the template's whitespace
after that. Characters map to tokens through the tokenizer's offsets, as transformers maps its generation markers,
so on a template that has the markers both give the same mask (tests/test_chat.py checks it). A template that
renders earlier turns differently once a later one follows (some strip the reasoning of old turns) has no such
prefixes: that is an error, and `assistant_only_loss: false` trains on every token instead.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # the label transformers' loss skips
BUNDLED_CHAT = {
    "bundled:python-chat": "questions about Python standard library functions, answered with the first paragraph "
                           "of their docstrings (PSF License, as the standard library); `@test` is the held-out split",
}
HELD_OUT_EVERY = 10  # one conversation in ten (by a hash of its subject) is in bundled:python-chat@test


class ChatTemplateError(DataError):
    """A tokenizer has no chat template, or its template refuses a conversation."""


@dataclass(frozen=True)
class Conversation:
    """One conversation: `name` says where it came from (`path:LINE`, `bundled:python-chat[3]`)."""

    name: str
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Encoded:
    """A tokenized conversation: its ids and, for each, whether it belongs to an assistant turn."""

    name: str
    ids: list[int]
    assistant: list[bool]

    def labels(self, assistant_only: bool = True) -> list[int]:
        """Targets for transformers' shifted loss: the assistant's tokens (or all), never the first token."""
        labels = [t if (a or not assistant_only) else IGNORE for t, a in zip(self.ids, self.assistant)]
        return [IGNORE, *labels[1:]] if labels else labels


# -- reading ---------------------------------------------------------------------------------------------------------


def is_chat_source(source: str | os.PathLike[str]) -> bool:
    """Whether a data source holds conversations: a bundled chat set, or a JSONL file whose first row has
    `messages` or `prompt` and `completion` (and no `text`, the documents' field)."""
    source = str(source)
    if _bundled_name(source) is not None:
        return True
    from .documents import JSONL_SUFFIXES, SELECTION

    selection = SELECTION.match(source)
    path = Path(selection["source"] if selection and not Path(source).exists() else source).expanduser()
    if not (path.is_file() and path.suffix in JSONL_SUFFIXES):
        return False
    try:
        with path.open(encoding="utf-8") as file:
            first = next((line for line in file if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the documents' reader names the problem
    return isinstance(record, dict) and "text" not in record and (
        "messages" in record or {"prompt", "completion"} <= record.keys())


def load_conversations(sources: Iterable[str | os.PathLike[str]], max_conversations: int | None = None) -> list[Conversation]:
    """Every conversation of every source, in order, checked (roles, non-empty string contents), at most
    `max_conversations`."""
    sources = [str(s) for s in sources]
    found: list[Conversation] = []
    for source in sources:
        found += _read_source(source)
        if max_conversations is not None and len(found) >= max_conversations:
            return found[:max_conversations]
    if not found:
        raise DataError(f"no conversations found in {', '.join(sources) or 'no sources'}; pass JSONL rows with "
                        '"messages" or "prompt" and "completion".')
    return found


def _read_source(source: str) -> list[Conversation]:
    from .documents import JSONL_SUFFIXES, SELECTION

    selection = SELECTION.match(source)
    if selection and not Path(source).expanduser().exists():
        every = _read_source(selection["source"])
        if not selection["colon"]:
            index = int(selection["start"]) if selection["start"] else None
            if index is None or not -len(every) <= index < len(every):
                raise DataError(f"{source}: {selection['source']} holds {len(every)} conversations; write "
                                f"{selection['source']}[i] with 0 <= i < {len(every)}, or [a:b] for several.")
            return [every[index]]
        start, stop = selection["start"], selection["stop"]
        return every[slice(int(start) if start else None, int(stop) if stop else None)]
    bundled = _bundled_name(source)
    if bundled is not None:
        return bundled_conversations(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"chat data {source} is not a file; pass a .jsonl file of conversations or one of "
                        f"{', '.join(BUNDLED_CHAT)}.")
    if path.suffix not in JSONL_SUFFIXES:
        raise DataError(f"chat data {path} is not JSONL (it ends in {path.suffix or 'no suffix'}); write one JSON "
                        'object per line, {"messages": [...]} or {"prompt": ..., "completion": ...}, to a .jsonl file.')
    return list(_jsonl(path))


def _jsonl(path: Path) -> Iterable[Conversation]:
    from .documents import _read_text

    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        name = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} is not JSON ({e.msg}); chat data is JSONL, one JSON object per line.") from None
        yield Conversation(name, parse_row(record, name))


def parse_row(record: Any, name: str) -> tuple[dict[str, str], ...]:
    """A row's messages, checked: `messages`, or `prompt` + `completion` (strings or lists of messages)."""
    if not isinstance(record, dict):
        raise DataError(f"{name} is {_kind(record)}, not an object; write "
                        '{"messages": [...]} or {"prompt": ..., "completion": ...} on each line.')
    if "messages" in record:
        return _messages(record["messages"], name, "messages")
    if "prompt" in record and "completion" in record:
        prompt = _side(record["prompt"], name, "prompt", "user")
        completion = _side(record["completion"], name, "completion", "assistant")
        return prompt + completion
    raise DataError(f'{name} has neither "messages" nor "prompt" and "completion" (it has {", ".join(map(repr, record)) or "no keys"}); '
                    'write {"messages": [{"role": "user", "content": ...}, ...]} or {"prompt": ..., "completion": ...}.')


def _side(value: Any, name: str, key: str, role: str) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):
        return _messages([{"role": role, "content": value}], name, key)
    return _messages(value, name, key)


def _messages(value: Any, name: str, key: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f'{name}: "{key}" must be a non-empty list of {{"role", "content"}} messages'
                        + (" or a string" if key != "messages" else "") + f", not {_kind(value)}.")
    messages = []
    for index, message in enumerate(value):
        where = f'{name}: "{key}"[{index}]'
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f'{where} must be an object with a string "role" and "content", not {_kind(message)}.')
        if message["role"] not in ROLES:
            raise DataError(f"{where} has role {message['role']!r}; the roles are {', '.join(ROLES)}.")
        content = message.get("content")
        if not isinstance(content, str):
            found = f'{_kind(content)} as "content"' if "content" in message else 'no "content"'
            raise DataError(f'{where} ({message["role"]}) has {found}; it must be text (a string), e.g. '
                            '"content": "Hello!".')
        if not content.strip():
            raise DataError(f"{where} ({message['role']}) has empty content; drop the message or the row.")
        messages.append({"role": message["role"], "content": content})
    return tuple(messages)


_JSON_KINDS = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
               (dict, "an object"))


def _kind(value: Any) -> str:
    """A JSON value's kind with its article, as the person who wrote the line would name it: "a list", "null"."""
    if value is None:
        return "null"
    kind = next((name for types, name in _JSON_KINDS if isinstance(value, types)), f"a {type(value).__name__}")
    if value in ("", [], {}):
        return f"an empty {kind.split()[-1]}"
    return kind


# -- rendering and assistant spans -----------------------------------------------------------------------------------


def require_chat_template(tokenizer: Any, model: str | os.PathLike[str] = "the model") -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{model}'s tokenizer has no chat template, so conversations cannot be rendered as it expects; use a "
            "chat (instruct) model, or add a chat_template.jinja to the checkpoint directory (or train on documents)."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"{model}'s tokenizer is a slow (Python) one without character offsets; save the "
                                "checkpoint with its fast tokenizer (tokenizer.json) to find the assistant's tokens.")


def render(tokenizer: Any, messages: Sequence[dict[str, str]], name: str, generation_prompt: bool = False) -> str:
    """The template's text for `messages`; a template's refusal (a role it does not know) names the row."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError from raise_exception(), or whatever the template trips over
        raise ChatTemplateError(f"{name}: the model's chat template refuses this conversation ({e}); fix the row's "
                                "roles or order (many templates want user and assistant turns in turn).") from None


def assistant_spans(tokenizer: Any, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text of a conversation and the character spans of its assistant turns (see the module doc)."""
    messages = conversation.messages
    text = render(tokenizer, messages, conversation.name)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], conversation.name, generation_prompt=True) if k else ""
        through = render(tokenizer, messages[: k + 1], conversation.name)
        start = len(before)
        if not (text.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(
                f"{conversation.name}: the chat template renders turn {k} differently once later turns follow, so "
                "the assistant's tokens cannot be told from prefixes; train with assistant_only_loss: false "
                "(--no-assistant-only-loss)."
            )
        end = len(through.rstrip())  # the template's newline after the end-of-turn token is formatting
        if end > start:
            spans.append((start, end))
    return text, spans


def encode(tokenizer: Any, conversation: Conversation) -> Encoded:
    """Token ids of a rendered conversation and its assistant mask, through the tokenizer's character offsets."""
    text, spans = assistant_spans(tokenizer, conversation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask = [any(start < e and end > s for s, e in spans) for start, end in encoding["offset_mapping"]]
    return Encoded(conversation.name, list(encoding["input_ids"]), mask)


def encode_all(tokenizer: Any, conversations: Sequence[Conversation], model: str | os.PathLike[str] = "the model") -> list[Encoded]:
    require_chat_template(tokenizer, model)
    return [encode(tokenizer, c) for c in conversations]


# -- the bundled set -------------------------------------------------------------------------------------------------

# Modules of the standard library, pure Python, documented, importable anywhere without side effects.
PYTHON_CHAT_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv", "dataclasses", "difflib",
    "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "html", "inspect", "ipaddress", "json", "os.path",
    "pathlib", "pprint", "quopri", "random", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap",
    "tokenize", "urllib.parse", "uuid", "zipfile",
)
QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain `{name}` from the Python standard library.",
    "I found `{name}` in some code. What is it for?",
)


def _bundled_name(source: str) -> str | None:
    base = source.partition("@")[0]
    return base if base in BUNDLED_CHAT else None


def bundled_conversations(name: str = "bundled:python-chat") -> list[Conversation]:
    """`bundled:python-chat` (the training split) or `bundled:python-chat@test` (one subject in ten, held out):
    made from this Python's own docstrings, so the same on every run of one Python version."""
    base, _, split = name.partition("@")
    if base not in BUNDLED_CHAT or split not in ("", "train", "test"):
        raise DataError(f"no bundled chat data {name!r}; there is {', '.join(BUNDLED_CHAT)} (and @test, held out).")
    wanted = split == "test"
    conversations = []
    for subject, answer in _docstring_answers():
        held_out = zlib.crc32(subject.encode()) % HELD_OUT_EVERY == 0
        if held_out != wanted:
            continue
        question = QUESTIONS[zlib.crc32(subject.encode(), 1) % len(QUESTIONS)].format(name=subject)
        conversations.append(Conversation(f"{name}[{len(conversations)}]", (
            {"role": "user", "content": question}, {"role": "assistant", "content": answer})))
    return conversations


def _docstring_answers() -> list[tuple[str, str]]:
    """(qualified name, first paragraph of its docstring) for each module of PYTHON_CHAT_MODULES and its public
    functions and classes, in a fixed order; paragraphs shorter than 40 characters say too little to answer with."""
    import importlib
    import inspect

    found = []
    for module_name in PYTHON_CHAT_MODULES:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        subjects = [(module_name, module)] + [(f"{module_name}.{n}", getattr(module, n, None)) for n in sorted(public)]
        for subject, value in subjects:
            if subject != module_name and not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            if subject != module_name and getattr(value, "__module__", None) != module.__name__:
                continue  # re-exported from elsewhere: documented there
            doc = inspect.getdoc(value) or ""
            paragraph = " ".join(doc.split("\n\n")[0].split())
            if len(paragraph) >= 40:
                found.append((subject, paragraph))
    return found
