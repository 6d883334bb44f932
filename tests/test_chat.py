"""Chat data (evaluation/conversations.py, training/chat.py, evaluation/chat.py): assistant masks, packing, the loss, errors, `retrofit eval --chat`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import char_tokenizer, save_tiny, tiny_model
from llm_retrofit.cli import main
from llm_retrofit.errors import DataError
from llm_retrofit.evaluation.conversations import (ChatTemplateError, Conversation, bundled_conversations, encode,
                                                   encode_all, load_conversations, parse_row)
from llm_retrofit.training.chat import chat_rows

# A ChatML template like SmolLM2's, with the generation markers transformers' return_assistant_tokens_mask reads:
# the reference the derived spans are compared with.
MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Refuses the system role, as some templates do.
NO_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, since 3+3=6."}],
    [{"role": "user", "content": "Écris «bonjour» 👋"}, {"role": "assistant", "content": "  bonjour 👋\n\nvoilà  "}],
]


def chars(template: str | None = MARKED):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def conversation(messages, name="row") -> Conversation:
    return Conversation(name, parse_row({"messages": messages}, name))


def reference_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(messages, chat_template=MARKED, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- assistant spans -------------------------------------------------------------------------------------------------


def test_assistant_mask_matches_generation_markers_on_the_real_tokenizer(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.chat_template = MARKED  # our spans come from prefixes; the reference from the markers
    for messages in CONVERSATIONS:
        ids, mask = reference_mask(tokenizer, messages)
        encoded = encode(tokenizer, conversation(messages))
        assert encoded.ids == ids
        assert [int(a) for a in encoded.assistant] == mask
        assert sum(mask) > 0


def test_assistant_mask_on_smollm2s_own_template_is_the_content_and_end_token(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)  # its template has no generation markers
    encoded = encode(tokenizer, conversation(CONVERSATIONS[1]))
    spans, current = [], []
    for token, assistant in zip(encoded.ids, encoded.assistant):
        if assistant:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ["4<|im_end|>", "6, since 3+3=6.<|im_end|>"]


def test_assistant_mask_matches_generation_markers_per_character() -> None:
    tokenizer = chars()
    for messages in CONVERSATIONS[:2]:
        ids, mask = reference_mask(tokenizer, messages)
        encoded = encode(tokenizer, conversation(messages))
        assert (encoded.ids, [int(a) for a in encoded.assistant]) == (ids, mask)


def test_prompt_completion_rows_are_a_user_and_an_assistant_message() -> None:
    assert parse_row({"prompt": "q", "completion": "a"}, "r") == (
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    listed = parse_row({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                        "completion": [{"role": "assistant", "content": "a"}]}, "r")
    assert [m["role"] for m in listed] == ["system", "user", "assistant"]


# -- packing ---------------------------------------------------------------------------------------------------------


def per_token_loss(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_conversations_do_not_attend_across_boundaries(attention: str) -> None:
    model = tiny_model(max_position_embeddings=512)
    model.set_attn_implementation(attention)
    tokenizer = chars()
    first, second = CONVERSATIONS[0], CONVERSATIONS[1]
    changed = [{"role": "user", "content": "Yo where"}, {"role": "assistant", "content": "Goodbye! Why did I go?"}]
    assert len(encode(tokenizer, conversation(changed)).ids) == len(encode(tokenizer, conversation(first)).ids)
    losses = []
    for head in (first, changed):
        encoded = encode_all(tokenizer, [conversation(head), conversation(second)])
        rows = chat_rows(encoded, 400, packing=True, assistant_only=True, pad_id=0)
        assert len(rows) == 1  # both in one row
        losses.append(per_token_loss(model, rows.batch([0])))
    start = len(encoded[0].ids)  # the second conversation's tokens are predicted from position start on
    assert not torch.allclose(losses[0][: start - 1], losses[1][: start - 1])
    torch.testing.assert_close(losses[0][start:], losses[1][start:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("packing", [True, False])
def test_batch_loss_is_the_token_weighted_loss_of_each_conversation_alone(packing: bool) -> None:
    model = tiny_model(max_position_embeddings=512)
    tokenizer = chars()
    encoded = encode_all(tokenizer, [conversation(m) for m in CONVERSATIONS[:2]])
    rows = chat_rows(encoded, 400, packing=packing, assistant_only=True, pad_id=0)
    assert len(rows) == (1 if packing else 2)
    with torch.no_grad():
        together = model(**rows.batch(list(range(len(rows)))), use_cache=False).loss.item()
        total = count = 0
        for item in encoded:
            ids, labels = torch.tensor([item.ids]), torch.tensor([item.labels()])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
    assert together == pytest.approx(total / count, abs=1e-5)


def test_truncation_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    encoded = encode_all(chars(), [conversation(m) for m in CONVERSATIONS])
    longest = max(len(e.ids) for e in encoded)
    with caplog.at_level("WARNING"):
        rows = chat_rows(encoded, longest - 1, packing=False, assistant_only=True, pad_id=0)
    assert "1 of 3 conversations are longer than seq_len" in caplog.text
    assert max(len(p.ids) for row in rows.rows for p in row) == longest - 1


# -- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ([1, 2], "not an object"),
    ({"text": "a document"}, 'neither "messages" nor "prompt" and "completion"'),
    ({"messages": "hello"}, "must be a non-empty list"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": [{"content": "no role"}]}, 'string "role"'),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "role 'robot'; the roles are system, user, assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, 'has a number as "content"'),
    ({"messages": [{"role": "user", "content": None}]}, 'has null as "content"'),
    ({"messages": [{"role": "user"}]}, 'has no "content"'),
    ({"messages": [{"role": "user", "content": []}]}, 'has an empty list as "content"'),
    ({"messages": [{"role": "user", "content": "  "}]}, "empty content"),
    ({"prompt": "q", "completion": None}, '"completion" must be a non-empty list'),
])
def test_malformed_rows_are_named(tmp_path: Path, row, message: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, row])
    with pytest.raises(DataError, match="chat.jsonl:2") as error:
        load_conversations([path])
    assert message in str(error.value)


def test_content_given_as_a_list_of_parts_is_named_once(tmp_path: Path) -> None:
    """The multimodal form `"content": [{"type": "text", ...}]` is the usual mistake: the message says what was found
    and what to write instead, with one article."""
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    with pytest.raises(DataError) as error:
        load_conversations([path])
    assert str(error.value) == (f'{path}:1: "messages"[0] (user) has a list as "content"; it must be text (a string), '
                                'e.g. "content": "Hello!".')


def test_a_file_that_is_not_jsonl_is_refused(tmp_path: Path) -> None:
    (tmp_path / "chat.jsonl").write_text(json.dumps([{"messages": CONVERSATIONS[0]}], indent=1))
    with pytest.raises(DataError, match=r"chat.jsonl:1 is not JSON .*one JSON object per line"):
        load_conversations([tmp_path / "chat.jsonl"])
    (tmp_path / "chat.txt").write_text("hello")
    with pytest.raises(DataError, match=r"chat.txt is not JSONL"):
        load_conversations([tmp_path / "chat.txt"])


def test_a_tokenizer_without_chat_template_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="has no chat template.*chat_template.jinja"):
        encode_all(chars(None), [conversation(CONVERSATIONS[0])], "tiny/")


def test_a_role_the_template_rejects_names_the_row() -> None:
    with pytest.raises(ChatTemplateError, match=r"data.jsonl:7: the model's chat template refuses .*System role"):
        encode_all(chars(NO_SYSTEM), [conversation(CONVERSATIONS[1], "data.jsonl:7")])


# -- the bundled set -------------------------------------------------------------------------------------------------


def test_bundled_python_chat_is_deterministic_with_a_disjoint_held_out_split() -> None:
    train, test = bundled_conversations(), bundled_conversations("bundled:python-chat@test")
    assert len(train) > 100 and len(test) > 10
    assert train == bundled_conversations()
    assert not {json.dumps(c.messages) for c in train} & {json.dumps(c.messages) for c in test}
    assert all([m["role"] for m in c.messages] == ["user", "assistant"] for c in train + test)
    assert load_conversations(["bundled:python-chat@test[:3]"]) == test[:3]


# -- finetune and eval -----------------------------------------------------------------------------------------------


@pytest.fixture
def chat_model(tmp_path: Path) -> Path:
    path = save_tiny(tmp_path / "tiny-chat", max_position_embeddings=512)
    chars().save_pretrained(path)
    return path


def test_finetune_trains_on_auto_detected_chat_data(chat_model: Path, tmp_path: Path) -> None:
    from llm_retrofit.training.finetune import finetune

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS[:2]] +
                       [{"prompt": "Say yes", "completion": "yes"}])
    result = finetune(chat_model, tmp_path / "out", steps=2, seq_len=400, batch_size=2, data=[str(data)], bf16=False)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    rows = sum(len(encode(chars(), c).ids) for c in load_conversations([data]))
    assert result.tokens == 4 * rows  # one packed row of all three, read twice a step (batch 2) for 2 steps: no padding
    assert (tmp_path / "out" / "config.json").is_file()


def test_finetune_cli_with_chat_and_no_packing(chat_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CONVERSATIONS[:2]])
    result = CliRunner().invoke(main, ["finetune", str(chat_model), "-o", str(tmp_path / "out"), "--data", str(data),
                                       "--chat", "--no-packing", "--steps", "1", "--seq-len", "256", "--bf16", "false"])
    assert result.exit_code == 0, result.output
    assert "1 steps" in result.output


def test_chat_data_with_a_teacher_is_refused(chat_model: Path, tmp_path: Path) -> None:
    from llm_retrofit.training.finetune import FinetuneError, finetune

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(FinetuneError, match="distill .* does not train on chat data"):
        finetune(chat_model, tmp_path / "out", steps=1, seq_len=128, data=[str(data)], distill="teacher=base",
                 bf16=False, base=chat_model)


def test_eval_reports_assistant_token_perplexity_as_plain_transformers_computes_it(chat_model: Path,
                                                                                    tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "held-out.jsonl", [{"messages": m} for m in CONVERSATIONS[:2]])
    out = tmp_path / "eval.json"
    # float32 throughout, as the reference below computes (auto would use bf16 autocast on a CPU with AMX)
    result = CliRunner().invoke(main, ["eval", str(chat_model), "--chat", str(data), "--json", str(out),
                                       "--autocast", "off"])
    assert result.exit_code == 0, result.output
    chat = json.loads(out.read_text())["models"][0]["chat"]

    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    tokenizer = chars()
    total = count = 0.0
    for messages in CONVERSATIONS[:2]:
        ids, mask = reference_mask(tokenizer, messages)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        scored = torch.tensor(mask[1:], dtype=torch.bool)
        total, count = total + nll[scored].sum().item(), count + int(scored.sum())
    assert chat["tokens"] == count
    assert chat["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert "chat perplexity" in result.output


def test_eval_without_data_or_chat_is_a_usage_error(chat_model: Path) -> None:
    result = CliRunner().invoke(main, ["eval", str(chat_model)])
    assert result.exit_code == 2 and "pass --data (documents) or --chat" in result.output
