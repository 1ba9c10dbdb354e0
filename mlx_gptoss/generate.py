"""Generation: chunked prefill, a decode loop, sampling, and one result the CLI/API/benchmarks read."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from .locking import model_lock
from .options import check_number, check_sampling, check_seed

DEFAULT_PREFILL_STEP = 512


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclass
class GenerationResult:
    """What one generation produced, and how fast."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop", "length" (max_tokens), "tool_calls", "cancelled"
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the KV cache)
    generation_tokens: int = 0
    prompt_tps: float = 0.0  # prefill tokens per second, up to the first generated token
    generation_tps: float = 0.0  # decode tokens per second after the first one
    peak_memory_gb: float = 0.0  # MLX's peak allocation
    peak_rss_gb: float = 0.0  # the process's peak resident memory
    reasoning: str = ""  # harmony analysis channel, when the prompt was rendered with harmony
    problems: list[str] = field(default_factory=list)  # malformed model output (harmony), as found

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, *,
                 names: tuple[str, str, str, str] = ("temp", "top_p", "top_k", "min_p")) -> Callable[[mx.array], mx.array]:  # fmt: skip
    """logits [B, V] -> token ids [B]: greedy at temp 0, else sampling at temperature ``temp``
    from the tokens that pass every filter: the ``top_k`` most likely (0, or at least the
    vocabulary's size = all), those at least ``min_p`` times as likely as the most likely one
    (0 = all), and the nucleus of mass ``top_p``.

    Raises :class:`~mlx_gptoss.options.OptionError` (a ValueError) naming the option (as ``names``
    spell them: a chat session says ``temperature``) for NaN, infinities, booleans, non-numbers and
    values out of range (temp >= 0, top_p in (0, 1], top_k an integer >= 0, min_p in [0, 1)).
    """
    check_sampling(temp, top_p, top_k, min_p, names=names)
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temp
        # a top_k of the vocabulary's size or more keeps every token (and must not reach MLX: int32)
        k = top_k if top_k < logits.shape[-1] else 0
        if top_p == 1.0 and k == 0 and min_p == 0.0:
            return mx.random.categorical(logits, axis=-1)
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # each filter keeps the most likely token, so something is always left to sample
        keep = (mx.cumsum(probs, axis=-1) - probs) < top_p  # smallest prefix reaching top_p
        if k:
            keep = keep & (mx.arange(logits.shape[-1]) < k)
        if min_p:
            keep = keep & (probs >= min_p * probs[:, :1])
        choice = mx.random.categorical(mx.where(keep, sorted_logits, -mx.inf), axis=-1)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

    return sample


def prefill(model, ids: Sequence[int], cache: list, step: int = DEFAULT_PREFILL_STEP, cancel: Any = None) -> bool:
    """Run ``ids`` through the model into ``cache``, ``step`` tokens at a time (bounded activations).

    ``cancel`` (anything with ``is_set()``) is checked before each chunk. Returns False when it
    stopped the prefill: the cache then holds whole chunks only, ``cache[i].offset`` tokens.
    """
    for i in range(0, len(ids), step):
        if cancel is not None and cancel.is_set():
            return False
        model(mx.array(ids[i : i + step])[None], cache)
        mx.eval([c.state for c in cache])
    return True


def stream_tokens(
    model,
    prompt: Sequence[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    prefill_step: int | None = None,
    cache: list | None = None,
    cached: int = 0,
    sampler: Callable[[mx.array], mx.array] | None = None,
    cancel: Any = None,
    on_fed: Callable[[int], None] | None = None,
    on_prefilled: Callable[[], None] | None = None,
    stats: GenerationResult | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one (a stop token is yielded, then generation ends).

    Generations on one model run one after another: the generator holds the model's lock
    (:func:`mlx_gptoss.locking.model_lock`) from its first ``next()`` until it ends, is closed
    or is garbage-collected; another thread's generation waits for it.

    Args:
        seed: seeds MLX's random generator first (an integer in 0..2**64-1); None or -1: no
            seeding (random). Checked with :func:`mlx_gptoss.options.check_seed`.
        cache, cached: continue a cache that already holds ``prompt[:cached]``.
        sampler: logits [1, V] -> token [1]; default from ``temp``/``top_p``/``top_k``/``min_p``.
            An id outside the vocabulary raises ValueError (it is never fed to the model).
        cancel: anything with ``is_set()`` (a threading.Event); checked between prefill chunks
            and before each token (finish reason "cancelled").
        on_fed: called with each generated token once the cache holds it.
        on_prefilled: called once the cache holds all of the prompt but its last token.
        stats: filled in as generation goes (counts, speeds, memory, finish reason).

    However it ends (finished, cancelled, closed, or an error), the cache holds the first
    ``cache[0].offset`` tokens of ``prompt`` + the generated tokens: a cancelled prefill stops
    after a whole chunk, and the cache may hold one generated token more than was yielded
    (the next step is queued before a token is read).
    """
    seed = check_seed("seed", seed)
    check_number("max_tokens", max_tokens, integer=True, min=0)
    if prefill_step is not None:
        check_number("prefill_step", prefill_step, integer=True, min=1)
    with model_lock(model):
        yield from _stream_locked(model, prompt, max_tokens=max_tokens, seed=seed, stop_tokens=stop_tokens,
                                  prefill_step=prefill_step, cache=cache, cached=cached,
                                  sampler=sampler or make_sampler(temp, top_p, top_k, min_p), cancel=cancel,
                                  on_fed=on_fed, on_prefilled=on_prefilled,
                                  stats=stats if stats is not None else GenerationResult())  # fmt: skip


def _stream_locked(model, prompt, *, max_tokens, seed, stop_tokens, prefill_step, cache, cached, sampler, cancel,
                   on_fed, on_prefilled, stats) -> Iterator[int]:  # fmt: skip
    n_ctx, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if not prompt:
        raise ValueError("the prompt is empty")
    if not 0 <= min(prompt) <= max(prompt) < vocab:
        # an id outside the embedding table would read out of bounds
        raise ValueError(f"token ids must be in 0..{vocab - 1} (the model's vocabulary); got {min(prompt)}..{max(prompt)}")
    plan = getattr(model, "memory_plan", None)
    if plan is not None:
        n_ctx = min(n_ctx, plan.context)
    if len(prompt) + max_tokens > n_ctx:
        limit = (
            f"the context of {n_ctx} tokens the memory budget was planned for (load with a larger context: "
            "context= in Python, --context on the command line)"
            if plan is not None and n_ctx == plan.context
            else f"the model's context of {n_ctx} tokens"
        )
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; with max_tokens={max_tokens} that exceeds {limit}")
    if prefill_step is None:
        prefill_step = plan.prefill_step if plan is not None else DEFAULT_PREFILL_STEP
    if seed is not None:
        mx.random.seed(seed)
    # room for the whole generation up front: no buffer regrowth (and no recompiled decode step)
    cache = model.make_cache(reserve=len(prompt) + max_tokens) if cache is None else cache
    if not 0 <= cached < len(prompt) or any(c.offset != cached for c in cache):
        raise ValueError(f"the cache must hold exactly the first {cached} < {len(prompt)} prompt tokens")
    stops = set(stop_tokens)
    stats.prompt_tokens = len(prompt)
    stats.prefill_tokens = len(prompt) - cached
    mx.reset_peak_memory()

    def step(ids: mx.array) -> mx.array:
        return sampler(model(ids[None], cache)[:, -1, :])[0]

    t0 = time.perf_counter()
    if not prefill(model, prompt[cached:-1], cache, prefill_step, cancel):
        stats.finish_reason = "cancelled"
        return
    if on_prefilled is not None:
        on_prefilled()
    y = step(mx.array(prompt[-1:]))
    mx.async_eval(y)
    t_first = None
    for n in range(max_tokens):
        # queue the next step before reading this token, so the device never waits on Python;
        # the id fed back is clipped into the vocabulary (a bad sampler id is rejected below)
        nxt = step(mx.clip(y, 0, vocab - 1)[None]) if n + 1 < max_tokens else None
        if nxt is not None:
            mx.async_eval(nxt)
        token = y.item()
        if not 0 <= token < vocab:
            raise ValueError(
                f"the sampler returned token id {token}, outside the model's vocabulary of {vocab} ids (0..{vocab - 1})"
            )
        if nxt is not None and on_fed is not None:
            on_fed(token)
        if t_first is None:
            t_first = time.perf_counter()
            stats.prompt_tps = stats.prefill_tokens / (t_first - t0)
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            return
        stats.tokens.append(token)
        stats.generation_tokens = n + 1
        if n > 0:
            stats.generation_tps = n / (time.perf_counter() - t_first)
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        stats.peak_rss_gb = peak_rss_gb()
        yield token
        if token in stops:
            stats.finish_reason = "stop"
            return
        y = nxt
    stats.finish_reason = "length"
