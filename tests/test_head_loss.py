"""The finetune's loss through the LM head a chunk of positions at a time (training/head_loss.py) is transformers'
own `model(**batch).loss`, and so are its gradients: of a full finetune's parameters, of a tied head, of a LoRA
adapter and its trained copy of a tied embedding; with labels masked (-100) and padded as chat rows are, and with
packed position ids.

The reference is transformers' loss on the same model (all the logits at once); ours sums the same cross-entropies in
chunks of 5 positions, so the two agree to float32 rounding of a differently ordered sum: loss within rel 1e-6,
gradients within rtol 1e-4, atol 1e-6 (measured: about 1e-7 apart).
"""

from __future__ import annotations

import pytest
import torch

from llm_retrofit.training.head_loss import IGNORE, language_model_loss, student_outputs
from conftest import tiny_model

CHUNK = 5  # positions per chunk: not a divisor of the 2 x 23 predicting positions, so the last chunk is short


def masked_batch() -> dict[str, torch.Tensor]:
    """Two rows as chat rows come: the prompt's tokens and the right padding of the shorter row are not targets,
    and the position ids restart where a second conversation is packed into the first row."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 24), generator=generator)
    labels = ids.clone()
    labels[0, :6] = IGNORE  # row 0: a prompt of 6 tokens, then a second conversation from position 14
    labels[0, 14:17] = IGNORE
    labels[1, :4] = IGNORE  # row 1: a prompt, 15 tokens, then padding
    labels[1, 15:] = IGNORE
    positions = torch.cat([torch.arange(14), torch.arange(10)])[None].repeat(2, 1)
    positions[1] = torch.arange(24)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def assert_same_loss_and_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained
    reference = model(**batch).loss
    expected = torch.autograd.grad(reference, trained)
    loss = language_model_loss(student_outputs(model, model, batch), CHUNK)
    grads = torch.autograd.grad(loss, trained)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_the_chunked_loss_and_every_gradient_of_a_full_finetune_are_transformers_own(tied: bool) -> None:
    model = tiny_model(tie_word_embeddings=tied).train()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_same_loss_and_gradients(model, masked_batch())


def test_unmasked_rows_too() -> None:
    batch = masked_batch()
    batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}  # packed documents: every token a target
    assert_same_loss_and_gradients(tiny_model().train(), batch)


def test_a_lora_adapter_and_its_trained_copy_of_a_tied_embedding_get_transformers_gradients() -> None:
    from llm_retrofit.training.lora import parse_lora

    lora = parse_lora({"r": 4, "trainable": ["embed_tokens", "norm"]})
    model = lora.attach(tiny_model(tie_word_embeddings=True)).train()
    with torch.no_grad():  # B starts at 0: give it values, so that the gradient of A is not 0 as well
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("embed_tokens" in n for n in names)
    assert_same_loss_and_gradients(model, masked_batch())


def test_no_logits_are_made_for_the_whole_batch() -> None:
    """The forward computes logits for no position; the head sees at most CHUNK positions at a time."""
    model = tiny_model().train()
    seen: list[int] = []
    forward = model.lm_head.forward  # the chunks call the head's forward (no module hooks): count there
    model.lm_head.forward = lambda x: seen.append(x.numel() // x.shape[-1]) or forward(x)  # type: ignore[method-assign]
    language_model_loss(student_outputs(model, model, masked_batch()), CHUNK).backward()
    assert seen[0] == 0, "the model's own forward computed logits"
    assert max(seen) == CHUNK and sum(seen[1:]) == 2 * 23
