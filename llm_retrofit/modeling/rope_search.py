"""LongRoPE's evolutionary search for per-frequency RoPE factors, made practical on one small machine.

A candidate is a non-decreasing vector of factors lambda_i >= 1, one per RoPE frequency pair (theta_i / lambda_i is
the frequency used past the original context). Its fitness is the mean NLL per token of the search documents cut
to the target length, with the model running exactly as transformers runs a `longrope` config there (the long
factors and the attention factor sqrt(1 + ln s / ln L)). The search follows the LongRoPE paper (arXiv 2402.13753,
section 3.2): an initial population seeded with the PI, NTK and YaRN factors and mutations of them, then per
generation the top-k as parents, `mutations` children (each factor multiplied by exp(N(0, 0.1)) with probability
`mutation_probability`) and `crossovers` children (each factor from either parent), made non-decreasing again.

What makes it affordable here:
- A candidate costs one forward pass per document, run in segments with the KV cache, so that the NLL of every
  prefix is known on the way. After each segment a candidate whose cumulative NLL is already worse than that of the
  current k-th best at the same point (plus a small margin) is dropped: a bad candidate costs a fraction of a pass,
  a good one costs nothing extra. (All segments see the same long factors, as transformers uses them for the whole
  sequence once it is longer than the original context.)
- The model is loaded once; a candidate only replaces the rotary frequencies and attention factor in place.
- Results are cached by candidate, so a repeated child is never evaluated twice.
- Under `accelerate launch` each process evaluates its share of every generation (all processes make the same
  candidates from the same seed and exchange fitnesses), one process per GPU.
- The state is written after every generation; `resume` continues, and with the same seed gives what an
  uninterrupted run gives.

Not searched: LongRoPE's n_hat (positions kept un-interpolated), because transformers' `longrope` config has no
place for it: a factor found with it would not be the factor the saved model uses. Short factors: see
`SHORT_FACTOR_RULE`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import RetrofitError
from .precision import arithmetic, check_autocast, inference_autocast
from .rope import RopeShape, longrope_attention_factor, ntk_factors, pi_factors, yarn_factors

log = logging.getLogger(__name__)

SHORT_FACTOR_RULE = (
    "short_factor is 1.0 for every pair: below the original context the model keeps the frequencies it was trained "
    "with, and the only change there is transformers' attention factor sqrt(1 + ln s / ln L) (1.038 for 8k -> 16k), "
    "whose cost benchmarks/rope_extension.py measures; a short-factor search could only win back part of it."
)
STATE_VERSION = 1


class SearchError(RetrofitError):
    """The factor search cannot run as asked (documents too short, a state file from another search...)."""


@dataclass(frozen=True)
class SearchSettings:
    target_length: int
    population: int = 8
    iterations: int = 4
    mutations: int = 4
    crossovers: int = 4
    parents: int = 4
    mutation_probability: float = 0.3
    segments: int = 4
    reject_margin: float = 0.002
    seed: int = 0
    attention_factor: float | None = None
    """None: the paper's sqrt(1 + ln s / ln L). transformers applies it at every length, short ones included, so
    1.0 keeps short contexts exactly as they were (the long factors are then searched without the scaling)."""

    @property
    def candidates(self) -> int:
        """The most candidates the search scores (a repeated one is scored once): its cost in forward passes per
        document."""
        crossovers = self.crossovers if self.parents > 1 else 0
        return self.population + self.iterations * (self.mutations + crossovers)

    def __post_init__(self) -> None:
        if self.population < 2 or self.parents < 1 or self.parents > self.population or self.segments < 1:
            raise SearchError("search-rope: need population >= 2, 1 <= parents <= population, segments >= 1.")


@dataclass
class Candidate:
    factors: list[float]
    nll: float | None = None  # mean NLL per token over all documents at the target length; None if rejected
    checkpoints: list[float] = field(default_factory=list)  # cumulative NLL sums after each segment of each document
    origin: str = ""

    @property
    def key(self) -> str:
        return ",".join(f"{f:.4f}" for f in self.factors)


@dataclass
class SearchState:
    settings: SearchSettings
    shape: dict[str, Any]
    generation: int = 0
    population: list[Candidate] = field(default_factory=list)
    evaluated: dict[str, Candidate] = field(default_factory=dict)
    best_per_generation: list[float] = field(default_factory=list)
    evaluations: int = 0
    rejected_early: int = 0
    seconds: float = 0.0
    rng: Any = None

    def save(self, path: Path) -> None:
        data = asdict(self)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)  # a crash mid-write leaves the previous state

    @classmethod
    def load(cls, path: Path, settings: SearchSettings, shape: RopeShape) -> SearchState:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SearchError(f"cannot resume from {path}: {e}. Start without --resume.") from None
        # Everything but the number of generations must match: resuming may carry a search further.
        same = {**data.get("settings", {}), "iterations": settings.iterations} == asdict(settings)
        if not same or data.get("shape") != asdict(shape):
            raise SearchError(
                f"{path} is the state of a search with other settings or another model; resume with the same "
                "settings, or start a new search."
            )
        state = cls(settings=settings, **{k: v for k, v in data.items() if k != "settings"})
        state.population = [Candidate(**c) for c in data["population"]]
        state.evaluated = {k: Candidate(**c) for k, c in data["evaluated"].items()}
        state.rng = _to_tuple(data["rng"])
        return state


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


# ------------------------------------------------------------------------------------------------ fitness


class FactorEvaluator:
    """Runs a loaded model with candidate long factors and scores documents at the target length, in segments."""

    def __init__(
        self,
        model: Any,
        documents: Sequence[torch.Tensor],
        shape: RopeShape,
        target_length: int,
        segments: int = 4,
        attention_factor: float | None = None,
        autocast: str = "auto",
    ):
        check_autocast(autocast)
        self.model = model
        self.autocast = autocast
        self.shape = shape
        self.segments = segments
        self.scale = target_length / shape.original_length
        self.attention_factor = attention_factor or longrope_attention_factor(self.scale, shape.original_length)
        self.documents = [ids[:target_length] for ids in documents if len(ids) >= target_length]
        if not self.documents:
            raise SearchError(
                f"no document has {target_length} tokens; the search scores documents at the target length. Pass "
                "longer documents (or concatenate short ones into one file)."
            )
        rotary = model.model.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            raise SearchError("search the factors on the original model (its RoPE is already scaled).")
        self.rotary = rotary
        self.original_inv_freq = rotary.inv_freq.detach().clone()
        self.tokens = sum(len(ids) - 1 for ids in self.documents)

    def use(self, factors: Sequence[float] | None) -> None:
        """Make the model compute as a longrope config with these long factors does past the original length."""
        if factors is None:
            self.rotary.inv_freq.copy_(self.original_inv_freq)
            self.rotary.attention_scaling = 1.0
            return
        divisor = torch.tensor(factors, dtype=self.original_inv_freq.dtype, device=self.original_inv_freq.device)
        self.rotary.inv_freq.copy_(self.original_inv_freq / divisor)
        self.rotary.attention_scaling = self.attention_factor

    def score(self, factors: Sequence[float], reject: Callable[[int, float], bool] | None = None) -> Candidate:
        """Cumulative NLL after each segment; stops as soon as `reject(step, nll_so_far)` says it cannot win."""
        self.use(factors)
        candidate = Candidate(list(factors))
        total = 0.0
        try:
            with inference_autocast(self.model, self.autocast):
                for ids in self.documents:
                    for nll in segment_nll(self.model, ids, self.segments):
                        total += nll
                        candidate.checkpoints.append(total)
                        if reject is not None and reject(len(candidate.checkpoints) - 1, total):
                            return candidate  # rejected early: nll stays None
        finally:
            self.use(None)
        candidate.nll = total / self.tokens
        return candidate


def segment_nll(model: Any, ids: torch.Tensor, segments: int) -> Iterator[float]:
    """The summed NLL of each of `segments` consecutive pieces of one KV-cached forward pass over `ids`.

    The pieces add up to exactly the NLL of one forward pass over all of `ids` (token 0 is never scored).
    """
    from transformers import DynamicCache

    from .kv_cache import cache_argument
    from .nll import decoder_and_head, default_chunk_size, head_nll
    from .devices import input_device

    decoder, head = decoder_and_head(model)
    chunk = default_chunk_size(model)
    device = input_device(model)  # the embedding's: a placed model's first parameter may be offloaded (meta)
    ids = ids.to(device)
    bounds = [round(len(ids) * k / segments) for k in range(segments + 1)]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for start, end in zip(bounds, bounds[1:]):
            positions = torch.arange(start, end, device=device)[None]
            hidden = decoder(
                input_ids=ids[None, start:end], position_ids=positions, use_cache=True, **cache_argument(decoder, cache)
            ).last_hidden_state[0]
            targets = ids[start + 1 : end + 1]  # position p predicts token p + 1
            yield head_nll(head, hidden[: len(targets)], targets, chunk).double().sum().item()


# -------------------------------------------------------------------------------------------- the search


def _legal(factors: Sequence[float], scale: float) -> list[float]:
    """Clamp to [1, 2s] and make non-decreasing (low frequencies interpolated at least as much as high ones)."""
    legal, floor = [], 1.0
    for value in factors:
        floor = max(floor, min(max(value, 1.0), 2 * scale))
        legal.append(round(floor, 4))
    return legal


def mutate(factors: Sequence[float], rng: random.Random, probability: float, scale: float) -> list[float]:
    return _legal([f * math.exp(rng.gauss(0.0, 0.1)) if rng.random() < probability else f for f in factors], scale)


def crossover(a: Sequence[float], b: Sequence[float], rng: random.Random, scale: float) -> list[float]:
    return _legal([x if rng.random() < 0.5 else y for x, y in zip(a, b)], scale)


def initial_population(shape: RopeShape, scale: float, settings: SearchSettings, rng: random.Random) -> list[Candidate]:
    seeds = [
        Candidate(_legal(pi_factors(shape, scale), scale), origin="pi"),
        Candidate(_legal(ntk_factors(shape, scale), scale), origin="ntk"),
        Candidate(_legal(yarn_factors(shape, scale), scale), origin="yarn"),
    ]
    population = seeds[: settings.population]
    while len(population) < settings.population:
        parent = rng.choice(seeds)
        population.append(Candidate(mutate(parent.factors, rng, settings.mutation_probability, scale), origin=f"{parent.origin}*"))
    return population


def search(
    evaluator: FactorEvaluator,
    settings: SearchSettings,
    state_path: Path | None = None,
    resume: bool = False,
) -> SearchState:
    """Run (or resume) the evolutionary search; the state is saved to `state_path` after every generation."""
    from ..io.progress import Progress

    distributed = distributed_state()
    shape = evaluator.shape
    scale = settings.target_length / shape.original_length
    children = settings.mutations + settings.crossovers
    if resume and state_path is not None and state_path.exists():
        state = SearchState.load(state_path, settings, shape)
        rng = random.Random()
        rng.setstate(state.rng)
        log.info("resuming the search at generation %d of %d", state.generation, settings.iterations)
        progress = Progress((settings.iterations - state.generation) * children, "search-rope", "candidate",
                            enabled=distributed.is_main_process)
    else:
        state = SearchState(settings=settings, shape=asdict(shape))
        rng = random.Random(settings.seed)
        initial = initial_population(shape, scale, settings, rng)
        # At most this many candidates (a repeated one is not evaluated again): the ETA covers the whole search.
        progress = Progress(settings.candidates, "search-rope", "candidate",
                            enabled=distributed.is_main_process)
        _evaluate_generation(state, evaluator, initial, distributed, "initial", progress)
        _finish_generation(state, rng, state_path, distributed)
    with progress:
        _generations(state, evaluator, settings, rng, scale, state_path, distributed, progress)
    return state


def _generations(state: SearchState, evaluator: FactorEvaluator, settings: SearchSettings, rng: random.Random,
                 scale: float, state_path: Path | None, distributed: Any, progress: Any) -> None:
    while state.generation < settings.iterations:
        parents = state.population[: settings.parents]
        children = [
            Candidate(mutate(rng.choice(parents).factors, rng, settings.mutation_probability, scale), origin="mutation")
            for _ in range(settings.mutations)
        ] + [
            Candidate(crossover(*(p.factors for p in rng.sample(parents, 2)), rng, scale), origin="crossover")
            for _ in range(settings.crossovers if len(parents) > 1 else 0)
        ]
        state.generation += 1
        _evaluate_generation(state, evaluator, children, distributed, f"generation {state.generation}", progress)
        _finish_generation(state, rng, state_path, distributed)


def distributed_state() -> Any:
    """accelerate's view of the processes this search runs in (one, or those of `accelerate launch`).

    `PartialState` alone does not read `ACCELERATE_USE_CPU` (only `AcceleratorState` does): without it, processes
    launched on CPU each think they are alone, and each runs the whole search. Made before the model is placed, it
    also sets each GPU process's current device to its own GPU, so that `cuda` means that one.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _evaluate_generation(
    state: SearchState, evaluator: FactorEvaluator, candidates: list[Candidate], distributed: Any, label: str,
    progress: Any,
) -> None:
    from accelerate.utils import gather_object

    settings = state.settings
    full = len(state.population) >= settings.population
    kth = state.population[settings.population - 1] if full else None

    def reject(step: int, total: float) -> bool:
        # Worse than the k-th best so far at the same point: it cannot enter the population.
        return kth is not None and step < len(kth.checkpoints) and total > kth.checkpoints[step] * (1 + settings.reject_margin)

    fresh = list({c.key: c for c in candidates if c.key not in state.evaluated}.values())  # each once, ever
    started = time.perf_counter()
    scored: list[Candidate] = []
    progress.update(len(candidates) - len(fresh))  # repeats: not evaluated again
    with distributed.split_between_processes(fresh) as mine:
        for candidate in mine:
            result = evaluator.score(candidate.factors, reject)
            result.origin = candidate.origin
            scored.append(result)
            best = min((c.nll for c in state.population + scored if c.nll is not None), default=math.inf)
            progress.set_postfix(at=label, best_ppl=f"{math.exp(best):.3f}")
            progress.update(distributed.num_processes)  # each process scores its share at the same time
    if distributed.num_processes > 1:
        scored = gather_object(scored)
    for candidate in scored:
        state.evaluated[candidate.key] = candidate
    state.evaluations += len(scored)
    state.rejected_early += sum(c.nll is None for c in scored)
    survivors = state.population + [c for c in scored if c.nll is not None]
    state.population = sorted(survivors, key=lambda c: c.nll)[: settings.population]  # type: ignore[arg-type, return-value]
    state.seconds += time.perf_counter() - started


def _finish_generation(state: SearchState, rng: random.Random, path: Path | None, distributed: Any) -> None:
    best = state.population[0]
    state.best_per_generation.append(best.nll)  # type: ignore[arg-type]
    state.rng = rng.getstate()
    log.info(
        "generation %d: best perplexity %.4f (%s), %d evaluations, %d rejected early",
        state.generation, math.exp(best.nll), best.origin, state.evaluations, state.rejected_early,  # type: ignore[arg-type]
    )
    if path is not None and distributed.is_main_process:
        state.save(path)


def write_factors(path: Path, state: SearchState, evaluator: FactorEvaluator, source: str) -> dict[str, Any]:
    """The factors JSON that `longrope:factors=FILE` reads, with how it was found."""
    best = state.population[0]
    shape = evaluator.shape
    result = {
        "target_length": state.settings.target_length,
        "original_length": shape.original_length,
        "long_factor": best.factors,
        "short_factor": [1.0] * shape.pairs,
        "short_factor_rule": SHORT_FACTOR_RULE,
        "attention_factor": evaluator.attention_factor,
        "perplexity_at_target": math.exp(best.nll),  # type: ignore[arg-type]
        "arithmetic": arithmetic(evaluator.model, evaluator.autocast),
        "origin": best.origin,
        "search": {
            **asdict(state.settings),
            "model": source,
            "documents": len(evaluator.documents),
            "tokens_per_evaluation": evaluator.tokens,
            "evaluations": state.evaluations,
            "rejected_early": state.rejected_early,
            "seconds": round(state.seconds, 1),
            "best_perplexity_per_generation": [math.exp(n) for n in state.best_per_generation],
        },
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
