"""Generation: chunked prefill, a decode loop, sampling, and one result the CLI/API/benchmarks read."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx

DEFAULT_PREFILL_STEP = 512


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclass
class GenerationResult:
    """What one generation produced, and how fast."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (a stop token) or "length" (max_tokens reached)
    prompt_tokens: int = 0
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
    prefill_step: int = DEFAULT_PREFILL_STEP,
    cache: list | None = None,
    stats: GenerationResult | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one (a stop token is yielded, then generation ends).

    ``stats`` (if given) is filled in as generation goes: counts, speeds, memory, finish reason.
    """
    stats = stats if stats is not None else GenerationResult()
    n_ctx = model.config.max_position_embeddings
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) + max_tokens > n_ctx:
        raise PromptTooLongError(
            f"the prompt has {len(prompt)} tokens; with max_tokens={max_tokens} that exceeds the "
            f"model's context of {n_ctx} tokens"
        )
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp, top_p)
    cache = model.make_cache() if cache is None else cache
    stops = set(stop_tokens)
    stats.prompt_tokens = len(prompt)
    mx.reset_peak_memory()

    def step(ids: mx.array) -> mx.array:
        return sampler(model(ids[None], cache)[:, -1, :])[0]

    t0 = time.perf_counter()
    prefill(model, prompt[:-1], cache, prefill_step)
    y = step(mx.array(prompt[-1:]))
    mx.async_eval(y)
    t_first = None
    for n in range(max_tokens):
        # queue the next step before reading this token, so the device never waits on Python
        nxt = step(y[None]) if n + 1 < max_tokens else None
        if nxt is not None:
            mx.async_eval(nxt)
        token = y.item()
        if t_first is None:
            t_first = time.perf_counter()
            stats.prompt_tps = len(prompt) / (t_first - t0)
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
    prefill_step: int = DEFAULT_PREFILL_STEP,
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
    from .harmony import ChannelSplitter, render_prompt

    tok = model.tokenizer
    if isinstance(prompt, str):
        ids = tok.encode(prompt, allow_special=True) if raw else render_prompt(
            tok.encoding, prompt, system=system, reasoning_effort=reasoning_effort
        )
    else:
        ids = list(prompt)
    result = GenerationResult()
    splitter = None if raw else ChannelSplitter(tok.encoding)
    detok = tok.detokenizer()
    parts: dict[str | None, list[str]] = {}
    stops = set(tok.stop_tokens)

    def emit(channel: str | None, text: str) -> None:
        parts.setdefault(channel, []).append(text)
        if on_text is not None and text:
            on_text(channel, text)

    for t in stream_tokens(model, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                           stop_tokens=stops, prefill_step=prefill_step, stats=result):  # fmt: skip
        if splitter is None:
            if t not in stops:
                emit(None, detok.add(t))
        elif (delta := splitter.add(t)) is not None:
            # text outside any channel is answer text too (a model that skipped the header)
            emit(delta.channel or "final", delta.text)
    if splitter is None:
        emit(None, detok.flush())
        result.text = "".join(parts.get(None, []))
    else:
        result.text = "".join(parts.get("final", []))
        result.reasoning = "".join(parts.get("analysis", []))
    return result
