"""Generation: chunked prefill, a decode loop, sampling, and one result the CLI/API/benchmarks read."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

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

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


def make_sampler(temp: float = 0.0, top_p: float = 1.0) -> Callable[[mx.array], mx.array]:
    """logits [B, V] -> token ids [B]: greedy at temp 0, else nucleus sampling at ``top_p``."""
    if temp < 0 or not 0 < top_p <= 1:
        raise ValueError("temp must be >= 0 and top_p in (0, 1]")
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temp
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_logits = mx.take_along_axis(logits, order, axis=-1)
            probs = mx.softmax(sorted_logits, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            keep = (mx.cumsum(probs, axis=-1) - probs) < top_p
            sorted_logits = mx.where(keep, sorted_logits, -mx.inf)
            choice = mx.random.categorical(sorted_logits, axis=-1)
            return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
        return mx.random.categorical(logits, axis=-1)

    return sample


def prefill(model, ids: Sequence[int], cache: list, step: int = DEFAULT_PREFILL_STEP) -> None:
    """Run ``ids`` through the model into ``cache``, ``step`` tokens at a time (bounded activations)."""
    for i in range(0, len(ids), step):
        model(mx.array(ids[i : i + step])[None], cache)
        mx.eval([c.state for c in cache])


def stream_tokens(
    model,
    prompt: Sequence[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
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

    Args:
        cache, cached: continue a cache that already holds ``prompt[:cached]``.
        sampler: logits [1, V] -> token [1]; default from ``temp``/``top_p``.
        cancel: anything with ``is_set()`` (a threading.Event); checked before each token.
        on_fed: called with each generated token once the cache holds it.
        on_prefilled: called once the cache holds all of the prompt but its last token.
        stats: filled in as generation goes (counts, speeds, memory, finish reason).
    """
    stats = stats if stats is not None else GenerationResult()
    n_ctx = model.config.max_position_embeddings
    if not prompt:
        raise ValueError("the prompt is empty")
    if not 0 <= min(prompt) <= max(prompt) < model.config.vocab_size:
        # an id outside the embedding table would read out of bounds
        raise ValueError(f"token ids must be in 0..{model.config.vocab_size - 1} (the model's vocabulary); got {min(prompt)}..{max(prompt)}")
    plan = getattr(model, "memory_plan", None)
    if plan is not None:
        n_ctx = min(n_ctx, plan.context)
    if len(prompt) + max_tokens > n_ctx:
        limit = f"the context of {n_ctx} tokens the memory budget was planned for (load with a larger context=)" if plan is not None and n_ctx == plan.context else f"the model's context of {n_ctx} tokens"
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; with max_tokens={max_tokens} that exceeds {limit}")
    if prefill_step is None:
        prefill_step = plan.prefill_step if plan is not None else DEFAULT_PREFILL_STEP
    if seed is not None:
        mx.random.seed(seed)
    sampler = sampler or make_sampler(temp, top_p)
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
    prefill(model, prompt[cached:-1], cache, prefill_step)
    if on_prefilled is not None:
        on_prefilled()
    y = step(mx.array(prompt[-1:]))
    mx.async_eval(y)
    t_first = None
    for n in range(max_tokens):
        # queue the next step before reading this token, so the device never waits on Python
        nxt = step(y[None]) if n + 1 < max_tokens else None
        if nxt is not None:
            mx.async_eval(nxt)
        token = y.item()
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


def generate(
    model,
    prompt: str | Sequence[int],
    *,
    raw: bool = False,
    system: str | None = None,
    reasoning_effort: str = "medium",
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    prefill_step: int | None = None,
    on_text: Callable[[str | None, str], None] | None = None,
) -> GenerationResult:
    """Generate a reply to ``prompt`` and return it with its statistics.

    Args:
        prompt: a user message (rendered with harmony), raw text (``raw=True``), or token ids.
        system: instructions for the developer message (harmony).
        reasoning_effort: "low", "medium" or "high" (harmony).
        max_tokens, temp, top_p, seed: generation length and sampling (temp 0 = greedy).
        on_text: called with (channel, text) for each new piece of text as it is generated;
            channel is "analysis"/"final"/... with harmony, None in raw mode.

    ``result.text`` is the final answer (harmony) or the whole continuation (raw);
    ``result.reasoning`` the analysis channel.
    """
    tok = model.tokenizer
    if isinstance(prompt, str) and not raw:
        # harmony: the same code path as chat sessions (one turn of a fresh session)
        from .chat import ChatSession, Done
        from .harmony import CommentaryDelta, FinalDelta, ReasoningDelta

        channels = {ReasoningDelta: "analysis", FinalDelta: "final", CommentaryDelta: "commentary"}
        session = ChatSession(model, instructions=system, reasoning_effort=reasoning_effort)
        for ev in session.stream(prompt, max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed,
                                 prefill_step=prefill_step):  # fmt: skip
            if isinstance(ev, Done):
                result = ev.reply.stats
                result.text, result.reasoning = ev.reply.final, ev.reply.reasoning
                return result
            if on_text is not None and type(ev) in channels:
                on_text(channels[type(ev)], ev.text)
        raise RuntimeError("the chat stream ended without its Done event")
    ids = tok.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
    result = GenerationResult()
    detok = tok.detokenizer()
    stops = set(tok.stop_tokens)
    pieces = []
    for t in stream_tokens(model, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                           stop_tokens=stops, prefill_step=prefill_step, stats=result):  # fmt: skip
        text = detok.add(t) if t not in stops else ""
        pieces.append(text)
        if on_text is not None and text:
            on_text(None, text)
    tail = detok.flush()
    if on_text is not None and tail:
        on_text(None, tail)
    result.text = "".join(pieces) + tail
    return result
