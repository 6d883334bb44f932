"""llm-retrofit: rewrite a Hugging Face Llama or Mistral checkpoint into a better one.

    import llm_retrofit
    ckpt = llm_retrofit.load_checkpoint("path/or/owner-name")      # lazy: headers only
    llm_retrofit.patch("path", "dtype:to=bfloat16", output="out")  # streamed, tensor by tensor
    model = llm_retrofit.patch(model, "dtype:to=bfloat16")         # on a loaded PreTrainedModel
    docs = llm_retrofit.load_documents(["bundled:python-docs"])
    result = llm_retrofit.evaluate("path", docs, lengths=[2048, 8192])  # perplexity by length; .to_markdown(), .plot()
    llm_retrofit.render_card("out", eval_results="results.json")   # README.md model card
    llm_retrofit.push("out", "owner/name")                         # to the Hugging Face Hub, card included
    model = llm_retrofit.pool_kv_heads(model, 1)                    # GQA/MQA: fewer KV heads, fitted merge
    model = llm_retrofit.set_attention(model, pattern="sinks", window=4096)  # kernel and attention pattern
    llm_retrofit.finetune("out", "out-ft", steps=200, train=["new_layers"])  # short finetune on accelerate
    llm_retrofit.run_recipe("path", "llama-pro", output="run", overrides={"finetune.steps": 200})
"""

from __future__ import annotations

from ._version import __version__

from .api import expand_blocks, extend_context, patch, pool_kv_heads, set_attention, upcycle_moe  # noqa: E402
from .publishing.card import render_card  # noqa: E402
from .io.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from .convert import convert  # noqa: E402
from .evaluation.documents import Document, load_documents  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    DataError,
    EvaluationError,
    ExportError,
    OutputError,
    PatchError,
    PatchSpecError,
    PublishError,
    RetrofitError,
    UnsupportedArchitectureError,
)
from .evaluation.report import EvalResult  # noqa: E402
from .evaluation.perplexity import evaluate  # noqa: E402
from .training.finetune import FinetuneError, finetune  # noqa: E402
from .publishing.hub import push  # noqa: E402
from .recipes import RecipeError, run_recipe  # noqa: E402

__all__ = [
    "__version__",
    "Checkpoint",
    "CheckpointError",
    "DataError",
    "Document",
    "EvalResult",
    "EvaluationError",
    "ExportError",
    "FinetuneError",
    "OutputError",
    "PatchError",
    "PatchSpecError",
    "PublishError",
    "RecipeError",
    "RetrofitError",
    "UnsupportedArchitectureError",
    "convert",
    "evaluate",
    "expand_blocks",
    "extend_context",
    "finetune",
    "load_checkpoint",
    "load_documents",
    "patch",
    "pool_kv_heads",
    "upcycle_moe",
    "push",
    "set_attention",
    "render_card",
    "run_recipe",
]
