"""Evaluation documents: every accepted source reads in a fixed order, and every bad one says what to do."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from llm_retrofit import DataError, Document, load_documents
from llm_retrofit.evaluation.documents import BUNDLED_MIN_CHARS, bundled_documents


def test_text_files_directories_and_jsonl_in_order(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("first file")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.md").write_text("b")
    (corpus / "a.txt").write_text("a")
    (corpus / "sub" / "c.jsonl").write_text('{"text": "c1"}\n\n{"text": "c2", "id": 7}\n')
    (corpus / "image.png").write_bytes(b"\x89PNG")  # not text: ignored
    (corpus / ".hidden.txt").write_text("hidden")  # hidden: ignored
    documents = load_documents([tmp_path / "one.txt", corpus])
    assert [d.text for d in documents] == ["first file", "a", "b", "c1", "c2"]
    assert documents[4] == Document(f"{corpus / 'sub' / 'c.jsonl'}:3", "c2")


def test_max_docs_stops_reading(tmp_path: Path) -> None:
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    assert [d.text for d in load_documents([tmp_path / "many.jsonl"], max_docs=3)] == ["0", "1", "2"]


def test_bundled_python_docs_are_long_and_cover_every_topic() -> None:
    from pydoc_data.topics import topics

    documents = load_documents(["bundled:python-docs"])
    assert len(documents) >= 4 and all(len(d.text) >= BUNDLED_MIN_CHARS for d in documents)
    assert documents == bundled_documents(), "the same documents every time"
    joined = "".join(d.text for d in documents)
    assert all(text.strip() in joined for text in topics.values())


def test_bundled_python_source_is_code_long_enough_for_16k_and_holds_every_top_level_module() -> None:
    import sysconfig

    documents = load_documents(["bundled:python-source[:2]"])
    assert [d.name for d in documents] == ["bundled:python-source[0]", "bundled:python-source[1]"]
    assert all(len(d.text) >= BUNDLED_MIN_CHARS for d in documents)
    assert documents[0].text.startswith("# file: __future__.py\n"), "modules in file-name order"
    everything = "".join(d.text for d in bundled_documents("bundled:python-source"))
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert len(modules) > 50 and all(f"# file: {m.name}\n" in everything for m in modules)
    assert "import " in documents[0].text and "def " in documents[0].text, "code, unlike python-docs' prose"


def test_a_selection_picks_documents_by_position_so_one_corpus_gives_train_and_held_out_sets(tmp_path: Path) -> None:
    documents = bundled_documents()
    assert load_documents(["bundled:python-docs[1:]"]) == documents[1:]
    assert load_documents(["bundled:python-docs[:1]"]) == documents[:1]
    assert load_documents(["bundled:python-docs[-1]"]) == documents[-1:]
    assert documents[0].name == "bundled:python-docs[0]", "a document's name is the selection that gives it back"
    (tmp_path / "many.jsonl").write_text("".join(f'{{"text": "{i}"}}\n' for i in range(5)))
    assert [d.text for d in load_documents([f"{tmp_path / 'many.jsonl'}[1:3]"])] == ["1", "2"]
    weird = tmp_path / "notes[1].txt"  # a file whose own name looks like a selection is read as the file
    weird.write_text("itself")
    assert [d.text for d in load_documents([weird])] == ["itself"]
    with pytest.raises(DataError, match=r"python-docs\[9\] is out of range: .* holds \d+ documents"):
        load_documents(["bundled:python-docs[9]"])
    with pytest.raises(DataError, match="no documents found"):
        load_documents(["bundled:python-docs[9:]"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', r"bad.jsonl:2 is not JSON"),
        ('{"body": "no text field"}\n', r'bad.jsonl:1 has no string "text" field'),
        ('["a list"]\n', r'bad.jsonl:1 has no string "text" field'),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_documents([tmp_path / "bad.jsonl"])


def test_unreadable_sources_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text.*convert it to UTF-8"):
        load_documents([tmp_path / "latin1.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        load_documents([tmp_path / "empty"])
    with pytest.raises(DataError, match="no bundled documents"):
        bundled_documents("bundled:nope")


def test_a_name_that_is_no_path_needs_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "datasets" else object())
    with pytest.raises(DataError, match="is not a file or directory.*pip install datasets"):
        load_documents(["wikitext:wikitext-2-raw-v1"])


def test_a_dataset_name_is_loaded_with_datasets_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str | None, split: str) -> list[dict]:
        calls.append((name, config, split))
        return [{"text": "one"}, {"text": ""}, {"text": "three"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    documents = load_documents(["wikitext:wikitext-2-raw-v1@validation", "owner/books"])
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("owner/books", None, "test")]
    # Empty rows (wikitext has many) are no documents; names say where each came from.
    assert [(d.name, d.text) for d in documents] == [
        ("wikitext@validation[0]", "one"), ("wikitext@validation[2]", "three"),
        ("owner/books@test[0]", "one"), ("owner/books@test[2]", "three"),
    ]
