"""Whether a checkpoint is served as patched, served differently, or refused by the engines users serve with.

`retrofit serve-check` and the model card answer from config.json alone (no weight is read), with rules written as
data: each `Rule` says, for one engine and one kind of output (`KINDS`: a predicate on the config), the verdict, how
the engine serves it, and the engine source the rule comes from. docs/serving.md lists the same rules; the engines
are vLLM 0.34, SGLang 0.5.23, the llama.cpp of llama-cpp-python 0.3.36 (through `retrofit export`, the only way
llm-retrofit offers there), and transformers itself, the reference every patch is tested against.

An engine's verdict for a checkpoint is the worst verdict among the kinds the checkpoint is: one refused kind refuses
the model, one kind served differently makes the model served differently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..io.provenance import HISTORY_KEY
from ..modeling.shipped import STOCK_CLASSES

AS_PATCHED, DIFFERENTLY, REFUSED = "as patched", "differently", "refused"
VERDICTS = (AS_PATCHED, DIFFERENTLY, REFUSED)  # best to worst
ENGINES = ("transformers", "vLLM", "SGLang", "llama.cpp")
DEFAULT_ROPE_THETA = 10000.0  # what readers of a top-level rope_theta assume when it is absent

Config = Mapping[str, Any]


@dataclass(frozen=True)
class Kind:
    """One kind of output a patch writes, recognised in config.json."""

    name: str
    applies: Callable[[Config], bool]


@dataclass(frozen=True)
class Rule:
    """How one engine serves one kind of output, and where in the engine's source that is decided."""

    engine: str
    kind: str
    verdict: str
    how: str
    source: str
    condition: str = ""  # what the verdict needs from the user (e.g. trust_remote_code=True): shown with the verdict


# ----------------------------------------------------------------------------------------------- reading the config


def rope_parameters(config: Config) -> dict[str, Any]:
    """The RoPE parameters as transformers 5 reads them: `rope_parameters`, else the older `rope_scaling` plus a
    top-level `rope_theta`."""
    found = config.get("rope_parameters") or config.get("rope_scaling") or {}
    found = dict(found)
    found.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    found.setdefault("rope_type", found.get("type", "default"))
    return found


def _rope(rope_type: str) -> Callable[[Config], bool]:
    return lambda config: rope_parameters(config)["rope_type"] == rope_type


def _shipped(module: str, named: bool) -> Callable[[Config], bool]:
    """Config loads `module` through auto_map, and `architectures` names that class (`named`) or a stock one."""
    def applies(config: Config) -> bool:
        classes = {v.split(".", 1)[1] for v in (config.get("auto_map") or {}).values() if v.startswith(module + ".")}
        return bool(classes) and bool(classes & set(config.get("architectures") or ())) == named
    return applies


def _theta_hidden(config: Config) -> bool:
    """The base RoPE frequency is not where older readers look (a top-level rope_theta, default 10000)."""
    top = config.get("rope_theta", DEFAULT_ROPE_THETA)
    return float(top) != float(rope_parameters(config)["rope_theta"])


def _applied(patch: str) -> Callable[[Config], bool]:
    return lambda config: any(r.get("patch") == patch for r in config.get(HISTORY_KEY) or ())


KINDS = (
    Kind("Llama / Mistral / Mixtral", lambda c: c.get("model_type") in (*STOCK_CLASSES, "mixtral", "ministral")),
    Kind("RoPE default or NTK (a new rope_theta)", _rope("default")),
    Kind("RoPE base only in rope_parameters", _theta_hidden),
    Kind("RoPE linear", _rope("linear")),
    Kind("RoPE dynamic NTK", _rope("dynamic")),
    Kind("RoPE YaRN", _rope("yarn")),
    Kind("RoPE Llama 3", _rope("llama3")),
    Kind("RoPE LongRoPE", _rope("longrope")),
    Kind("reduced KV heads (GQA)", lambda c: c.get("num_key_value_heads", c.get("num_attention_heads")) !=
         c.get("num_attention_heads")),
    Kind("expanded depth", lambda c: _applied("expand")(c) or _applied("dus")(c)),
    Kind("Mixtral, tied embeddings", lambda c: c.get("model_type") == "mixtral" and bool(c.get("tie_word_embeddings"))),
    # A window at least as long as the context never binds.
    Kind("Mistral sliding window", lambda c: c.get("model_type") == "mistral" and bool(c.get("sliding_window"))
         and c["sliding_window"] < c.get("max_position_embeddings", float("inf"))),
    Kind("Ministral layer_types", lambda c: c.get("model_type") == "ministral"),
    Kind("shipped attention pattern", _shipped("modeling_retrofit_attention", named=True)),
    Kind("shipped Infini-attention", _shipped("modeling_retrofit_infini", named=True)),
    Kind("shipped code, stock architectures", lambda c: _shipped("modeling_retrofit_attention", False)(c)
         or _shipped("modeling_retrofit_infini", False)(c)),
)

# ------------------------------------------------------------------------------------------------------- the rules

_HF = "transformers: models/{llama,mistral,ministral,mixtral}/modeling_*.py; this repository's tests"
_VLLM_ROPE = "vllm/model_executor/layers/rotary_embedding/__init__.py get_rope"
_VLLM_LEN = "vllm/config/model.py _get_and_verify_max_len"
_VLLM_ARCH = ("vllm/model_executor/models/registry.py _ModelRegistry.resolve_model_cls, _try_resolve_transformers; "
              "transformers PreTrainedModel.is_backend_compatible")
_SGL_LLAMA = "python/sglang/srt/models/llama.py LlamaDecoderLayer.__init__ (rope_theta, rope_scaling)"
_SGL_ROPE = "python/sglang/srt/layers/rotary_embedding/factory.py get_rope"
_SGL_LEN = "python/sglang/srt/utils/hf_transformers_utils.py get_context_length"
_SGL_ARCH = "python/sglang/srt/model_loader/utils.py get_model_architecture, resolve_transformers_arch"
_EXPORT = "llm_retrofit export (docs/export.md); llama.cpp src/llama-model.cpp, src/models/llama.cpp"
EXPORT_REFUSES = "retrofit export refuses it: "
"""How a llama.cpp refusal's `how` begins; `retrofit export` gives the rest as its reason."""
_LONG_FOR_ALL = ("long factors for every token, short prompts too, once max_model_len > "
                 "original_max_position_embeddings; attention factor from short_mscale/long_mscale (else its own "
                 "formula)")
_SHIPPED_REFUSED_VLLM = ("refuses: architectures names a class vLLM does not know; with trust_remote_code its "
                         "Transformers backend refuses it too (the class declares no attention-backend support)")
_SHIPPED_REFUSED_SGL = ("refuses: the class is not in transformers and auto_map has no AutoModel entry "
                        "(--model-impl transformers overrides this with a warning and runs the stock model)")


def _shipped_code(kind: str, without_flag: str, export_reason: str) -> list[Rule]:
    """A kind that runs only in the modeling file the checkpoint ships: transformers runs it with trust_remote_code
    (`without_flag`: what it runs otherwise), the engines refuse it."""
    return [Rule("transformers", kind, AS_PATCHED,
                 f"the class auto_map names; without trust_remote_code, {without_flag}",
                 "transformers dynamic_module_utils.py resolve_trust_remote_code (local code wins)",
                 "with trust_remote_code=True"),
            Rule("vLLM", kind, REFUSED, _SHIPPED_REFUSED_VLLM, _VLLM_ARCH),
            Rule("SGLang", kind, REFUSED, _SHIPPED_REFUSED_SGL, _SGL_ARCH),
            Rule("llama.cpp", kind, REFUSED, EXPORT_REFUSES + export_reason, "src/models/llama.cpp")]


def _same_everywhere(kind: str, how: str, vllm: str, sglang: str, export: str = _EXPORT) -> list[Rule]:
    """A kind every engine serves as patched."""
    return [Rule("transformers", kind, AS_PATCHED, how, _HF), Rule("vLLM", kind, AS_PATCHED, how, vllm),
            Rule("SGLang", kind, AS_PATCHED, how, sglang), Rule("llama.cpp", kind, AS_PATCHED, how, export)]


RULES: tuple[Rule, ...] = (
    *_same_everywhere("Llama / Mistral / Mixtral", "its own implementation of the architecture",
                      "vllm/model_executor/models/{llama,mistral,mixtral}.py", "python/sglang/srt/models/"
                      "{llama,mistral,mixtral}.py"),
    *_same_everywhere("RoPE default or NTK (a new rope_theta)", "plain RoPE with the written base", _VLLM_ROPE,
                      _SGL_LLAMA),
    Rule("transformers", "RoPE base only in rope_parameters", AS_PATCHED, "reads rope_parameters", _HF),
    Rule("vLLM", "RoPE base only in rope_parameters", AS_PATCHED, "reads rope_parameters (under transformers 4, "
         "and before PR #28542, rope_scaling and a top-level rope_theta, default 10000)",
         f"vllm/transformers_utils/config.py patch_rope_parameters; {_VLLM_ROPE}", "with transformers 5"),
    Rule("SGLang", "RoPE base only in rope_parameters", DIFFERENTLY, "reads a top-level rope_theta, default 10000: "
         "the wrong base at every position (every llm-retrofit rewrite writes the top-level rope_theta too: "
         "`retrofit convert MODEL OUT` adds it)", _SGL_LLAMA),
    Rule("llama.cpp", "RoPE base only in rope_parameters", AS_PATCHED, "export writes rope.freq_base from "
         "rope_parameters", _EXPORT),
    Rule("transformers", "RoPE linear", AS_PATCHED, "linear interpolation", _HF),
    Rule("vLLM", "RoPE linear", DIFFERENTLY, "same frequencies, but the default max_model_len is "
         "max_position_embeddings x factor, past the length the patch targets: pass --max-model-len",
         f"{_VLLM_LEN}; linear_scaling_rope.py"),
    Rule("SGLang", "RoPE linear", DIFFERENTLY, "same frequencies, but the default context length is "
         "max_position_embeddings x factor: pass --context-length", f"{_SGL_LEN}; {_SGL_ROPE}"),
    Rule("llama.cpp", "RoPE linear", AS_PATCHED, "rope.scaling.type linear", _EXPORT),
    Rule("transformers", "RoPE dynamic NTK", AS_PATCHED, "base grows with the sequence length", _HF),
    Rule("vLLM", "RoPE dynamic NTK", DIFFERENTLY, "the base never grows (fixed cos/sin cache): plain RoPE at "
         "every length", f"vllm/model_executor/layers/rotary_embedding/dynamic_ntk_scaling_rope.py "
         f"DynamicNTKScalingRotaryEmbedding._compute_cos_sin_cache; {_VLLM_LEN}"),
    Rule("SGLang", "RoPE dynamic NTK", DIFFERENTLY, "as vLLM: a fixed base, and a context length of "
         "max_position_embeddings x factor", f"python/sglang/srt/layers/rotary_embedding/rope_variant.py "
         f"DynamicNTKScalingRotaryEmbedding; {_SGL_LEN}"),
    Rule("llama.cpp", "RoPE dynamic NTK", REFUSED, EXPORT_REFUSES + ("dynamic NTK recomputes the base from each "
         "sequence's length, which llama.cpp has no mode for; patch the original with ntk:factor=S (the base dynamic "
         "NTK reaches at S x the context, fixed) or yarn, which llama.cpp runs"),
         "src/llama-model.cpp LLAMA_ROPE_SCALING_TYPES"),
    *_same_everywhere("RoPE YaRN", "factor, original length, beta_fast/beta_slow; default attention factor",
                      f"{_VLLM_ROPE}; yarn_scaling_rope.py", _SGL_ROPE),
    *_same_everywhere("RoPE Llama 3", "llama3 frequencies (llama.cpp: the rope_freqs tensor)",
                      f"{_VLLM_ROPE}; llama3_rope.py", _SGL_ROPE),
    Rule("transformers", "RoPE LongRoPE", AS_PATCHED, "short factors up to the original length, long factors for a "
         "longer sequence", _HF),
    Rule("vLLM", "RoPE LongRoPE", DIFFERENTLY, _LONG_FOR_ALL, "vllm/model_executor/layers/rotary_embedding/"
         "phi3_long_rope_scaled_rope.py Phi3LongRoPEScaledRotaryEmbedding.__init__"),
    Rule("SGLang", "RoPE LongRoPE", DIFFERENTLY, "long factors for every token of a forward batch in which any "
         "position passes original_max_position_embeddings (other requests in the batch too; keys cached earlier "
         "keep the short ones); attention factor from short_mscale/long_mscale (else its own formula)",
         "python/sglang/srt/layers/rotary_embedding/rope_variant.py Phi3LongRoPEScaledRotaryEmbedding.forward"),
    Rule("llama.cpp", "RoPE LongRoPE", DIFFERENTLY, "rope_factors_long for every token when the context (n_ctx per "
         "sequence) exceeds the original length, else rope_factors_short", "src/llama-model.cpp "
         "llama_model::get_rope_factors"),
    *_same_everywhere("reduced KV heads (GQA)", "num_key_value_heads", "vllm/model_executor/models/llama.py",
                      "python/sglang/srt/models/llama.py"),
    *_same_everywhere("expanded depth", "num_hidden_layers", "vllm/model_executor/models/llama.py",
                      "python/sglang/srt/models/llama.py"),
    Rule("transformers", "Mixtral, tied embeddings", AS_PATCHED, "ties lm_head to the embeddings", _HF),
    Rule("vLLM", "Mixtral, tied embeddings", AS_PATCHED, "ties lm_head when tie_word_embeddings",
         "vllm/model_executor/models/mixtral.py MixtralForCausalLM"),
    Rule("SGLang", "Mixtral, tied embeddings", DIFFERENTLY, "builds an untied LM head and finds no lm_head weight: "
         "an untrained head (write an untied lm_head)", "python/sglang/srt/models/mixtral.py MixtralForCausalLM"),
    Rule("llama.cpp", "Mixtral, tied embeddings", AS_PATCHED, "no output tensor: the embeddings are used",
         "src/models/llama.cpp (output falls back to token_embd)"),
    Rule("transformers", "Mistral sliding window", AS_PATCHED, "sliding_window", _HF),
    Rule("vLLM", "Mistral sliding window", AS_PATCHED, "sliding_window", "vllm/model_executor/models/llama.py"),
    Rule("SGLang", "Mistral sliding window", DIFFERENTLY, "the window is ignored: full attention",
         "python/sglang/srt/models/llama.py LlamaAttention (RadixAttention without a window)"),
    Rule("llama.cpp", "Mistral sliding window", REFUSED, EXPORT_REFUSES + ("a sliding window shorter than the "
         "context, which llama.cpp's llama architecture ignores (it would attend to the whole context past the "
         "window); export the checkpoint from before the attention patch, or serve this one with vLLM"),
         "src/models/llama.cpp"),
    Rule("transformers", "Ministral layer_types", AS_PATCHED, "sliding window on the layers layer_types names", _HF),
    Rule("vLLM", "Ministral layer_types", AS_PATCHED, "a window per layer from layer_types",
         "vllm/model_executor/models/registry.py (MinistralForCausalLM), llama.py"),
    Rule("SGLang", "Ministral layer_types", DIFFERENTLY, "no native Ministral; the windows are not applied",
         _SGL_ARCH),
    Rule("llama.cpp", "Ministral layer_types", REFUSED, EXPORT_REFUSES + ("layers that mix sliding-window and "
         "full attention (Ministral's layer_types) are no llama.cpp architecture; export the checkpoint from before "
         "the attention patch"),
         "src/llama-arch.cpp"),
    *_shipped_code("shipped attention pattern", "model_type llama loads the stock class: dense attention",
                   "an attention pattern (sinks or block-sparse) in the modeling code it ships, which llama.cpp does "
                   "not run; for sinks, llama.cpp's --keep N --context-shift keeps the first N tokens as the window "
                   "slides, an approximation; otherwise export the checkpoint from before the attention patch"),
    *_shipped_code("shipped Infini-attention", "the stock class loads and drops the gates: no memory",
                   "Infini-attention's compressive memory, in the modeling code it ships, which llama.cpp does not "
                   "run; export the checkpoint from before the infini patch"),
    Rule("transformers", "shipped code, stock architectures", AS_PATCHED, "the class auto_map names", _HF,
         "with trust_remote_code=True"),
    Rule("vLLM", "shipped code, stock architectures", DIFFERENTLY, "runs its own Llama: the shipped behaviour is "
         "silently dropped (re-patch with this llm-retrofit to name the class)", _VLLM_ARCH),
    Rule("SGLang", "shipped code, stock architectures", DIFFERENTLY, "runs its own Llama: the shipped behaviour is "
         "silently dropped (re-patch with this llm-retrofit to name the class)", _SGL_ARCH),
    Rule("llama.cpp", "shipped code, stock architectures", REFUSED, EXPORT_REFUSES + ("modeling code it ships, which "
         "llama.cpp does not run"),
         _EXPORT),
)


# ------------------------------------------------------------------------------------------------------ the check


def kinds_of(config: Config) -> list[str]:
    """The kinds of output `config` is, in `KINDS` order."""
    return [kind.name for kind in KINDS if kind.applies(config)]


def serve_check(config: Config) -> list[dict[str, Any]]:
    """Per engine, in `ENGINES` order: its verdict (the worst over the checkpoint's kinds) and each kind's rule, those
    not served as patched first."""
    kinds = kinds_of(config)
    rules = {(rule.engine, rule.kind): rule for rule in RULES}
    report = []
    for engine in ENGINES:
        found = sorted((rules[engine, kind] for kind in kinds), key=lambda r: -VERDICTS.index(r.verdict))
        verdict = found[0].verdict if found else AS_PATCHED
        report.append({"engine": engine, "verdict": verdict,
                       "rules": [{"kind": r.kind, "verdict": r.verdict, "how": r.how, "source": r.source,
                                  "condition": r.condition} for r in found]})
    return report


def refusals(config: Config, engine: str) -> list[Rule]:
    """The rules by which `engine` refuses this checkpoint (`retrofit export` refuses for llama.cpp by these)."""
    kinds = set(kinds_of(config))
    return [rule for rule in RULES if rule.engine == engine and rule.kind in kinds and rule.verdict == REFUSED]


def summary_rows(report: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(engine, verdict, how) per engine: the one table the CLI and the model card show. `how` names what is not
    served as patched, or the kinds that are."""
    rows = []
    for entry in report:
        off = [r for r in entry["rules"] if r["verdict"] != AS_PATCHED]
        how = "; ".join(f"{r['kind']}: {r['how']}" for r in off) or ", ".join(
            r["kind"] + (f" ({r['condition']})" if r["condition"] else "") for r in entry["rules"]) + ": as written"
        engine = entry["engine"] + (" (via retrofit export)" if entry["engine"] == "llama.cpp" else "")
        rows.append((engine, entry["verdict"], how))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(report: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table, for the model card."""
    cell = _cell
    lines = ["| engine | served | how |", "|---|---|---|"]
    lines += [f"| {cell(engine)} | {verdict} | {cell(how)} |" for engine, verdict, how in summary_rows(report)]
    return "\n".join(lines)


def render(report: list[dict[str, Any]], model: str) -> Any:
    """The summary as a rich table, for `retrofit serve-check`."""
    from rich.markup import escape
    from rich.table import Table

    colour = {AS_PATCHED: "green", DIFFERENTLY: "yellow", REFUSED: "red"}
    table = Table(title=f"how engines serve {escape(model)}", title_justify="left")
    table.add_column("engine", no_wrap=True)
    table.add_column("served", no_wrap=True)
    table.add_column("how", overflow="fold")
    for engine, verdict, how in summary_rows(report):
        table.add_row(engine, f"[{colour[verdict]}]{verdict}[/]", escape(how))
    table.caption = "rules and engine sources: docs/serving.md (retrofit serve-check --json lists each rule's source)"
    return table


def rules_markdown() -> str:
    """Every rule as a Markdown table, kind by kind: the table docs/serving.md carries (a test keeps them equal)."""
    lines = ["| output kind | engine | served | how | engine source |", "|---|---|---|---|---|"]
    order = {kind.name: i for i, kind in enumerate(KINDS)}
    for rule in sorted(RULES, key=lambda r: (order[r.kind], ENGINES.index(r.engine))):
        how = f"{rule.condition}: {rule.how}" if rule.condition else rule.how
        lines.append(f"| {_cell(rule.kind)} | {rule.engine} | {rule.verdict} | {_cell(how)} | "
                     f"`{_cell(rule.source)}` |")
    return "\n".join(lines)
