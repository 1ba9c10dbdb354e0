"""The package facade: conveniences that compose the layers below into what ``import mlx_gptoss`` offers.

- :func:`load` resolves a folder or a Hugging Face repo id (:mod:`mlx_gptoss.models`), loads it
  with the core loader (:mod:`mlx_gptoss.loader`) and applies a LoRA adapter (:mod:`mlx_gptoss.lora`).
- :class:`Model` is the core :class:`~mlx_gptoss.model.GptOss` with the sessions' convenience
  ``chat()``: the core model knows nothing of sessions; this subclass, built by :func:`load`, does.
- :func:`generate` answers one prompt: through a chat session (harmony) or the token loop (raw).

Nothing below imports this module: it is the top of the house, beside the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import loader
from .chat import ChatSession, Done
from .generate import GenerationResult, make_sampler, stream_tokens
from .harmony import CommentaryDelta, FinalDelta, ReasoningDelta
from .lora.io import load_adapter
from .memory import MemoryPlan
from .model import GptOss
from .models import DEFAULT_MODEL, resolve_model
from .options import check_seed

_CHANNELS = {ReasoningDelta: "analysis", FinalDelta: "final", CommentaryDelta: "commentary"}


class Model(GptOss):
    """A loaded gpt-oss model (:class:`~mlx_gptoss.model.GptOss`) with ``chat()``."""

    def chat(self, **options: Any) -> ChatSession:
        """A harmony chat session with this model; options as :class:`mlx_gptoss.chat.ChatSession`."""
        return ChatSession(self, **options)


def load(
    path_or_repo: str | Path = DEFAULT_MODEL,
    *,
    dtype: Any = None,
    lazy: bool = True,
    memory_budget: str | int | MemoryPlan | None = None,
    context: int = 8192,
    prefetch: bool = True,
    verbose: bool = False,
    adapter: str | Path | None = None,
) -> Model:
    """Load a converted gpt-oss model (a folder, or a Hugging Face repo id converted once into a cache).

    Args:
        path_or_repo: a folder written by ``mlx-gptoss convert``, or a repo id such as
            ``openai/gpt-oss-20b`` (downloaded and converted on first use; see
            :func:`mlx_gptoss.models.resolve_model`).
        dtype, lazy, memory_budget, context, prefetch, verbose: as :func:`mlx_gptoss.loader.load`
            (float dtype, when weights are read, a memory budget with expert streaming, the
            context it is planned for, expert prefetch, printing the plan).
        adapter: a LoRA adapter folder (ours, PEFT or mlx-lm) to serve unfused: the base stays as
            stored and the expert update is computed for the routed experts only. An adapter
            trained on another base is refused (:class:`~mlx_gptoss.lora.adapters.LoRAError`).

    Returns a :class:`Model` with ``.config``, ``.tokenizer``, ``.path`` and ``.chat()``. A bad
    ``dtype``, ``memory_budget`` or ``context`` raises :class:`~mlx_gptoss.options.OptionError`
    naming it, before a repo id is resolved (downloaded or converted).
    """
    loader.check_load_options(dtype, memory_budget, context)
    path = resolve_model(path_or_repo)
    model = loader.load(path, dtype=dtype, lazy=True, memory_budget=memory_budget, context=context, prefetch=prefetch,
                        verbose=verbose, cls=Model)  # fmt: skip
    if adapter is not None:
        load_adapter(model, adapter)
    if not lazy:
        mx.eval(model.parameters())
    return model


def generate(
    model: GptOss,
    prompt: str | Sequence[int],
    *,
    raw: bool = False,
    system: str | None = None,
    reasoning_effort: str = "medium",
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    prefill_step: int | None = None,
    on_text: Callable[[str | None, str], None] | None = None,
) -> GenerationResult:
    """Generate a reply to ``prompt`` and return it with its statistics.

    Args:
        prompt: a user message (rendered with harmony), raw text (``raw=True``), or token ids.
        system: instructions for the developer message (harmony).
        reasoning_effort: "low", "medium" or "high" (harmony).
        max_tokens, temp, top_p, top_k, min_p, seed: generation length and sampling (temp 0 =
            greedy; see :func:`mlx_gptoss.generate.make_sampler`); seed: 0..2**64-1, None or -1
            for a random one. A bad value raises :class:`~mlx_gptoss.options.OptionError` (a
            ValueError) naming it, before anything runs.
        on_text: called with (channel, text) for each new piece of text as it is generated;
            channel is "analysis"/"final"/... with harmony, None in raw mode.

    ``result.text`` is the final answer (harmony) or the whole continuation (raw);
    ``result.reasoning`` the analysis channel; ``result.problems`` what was wrong with the
    model's harmony output (the text is kept; empty when all was well).
    """
    sampler = make_sampler(temp, top_p, top_k, min_p)  # validated before anything runs
    seed = check_seed("seed", seed)
    if isinstance(prompt, str) and not raw:
        return _chat_turn(model, prompt, system, reasoning_effort, max_tokens, sampler, seed, prefill_step, on_text)
    tok = model.tokenizer
    ids = tok.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
    result = GenerationResult()
    detok = tok.detokenizer()
    stops = set(tok.stop_tokens)
    pieces = []
    for t in stream_tokens(model, ids, max_tokens=max_tokens, sampler=sampler, seed=seed, stop_tokens=stops,
                           prefill_step=prefill_step, stats=result):  # fmt: skip
        text = detok.add(t) if t not in stops else ""
        pieces.append(text)
        if on_text is not None and text:
            on_text(None, text)
    tail = detok.flush()
    if on_text is not None and tail:
        on_text(None, tail)
    result.text = "".join(pieces) + tail
    return result


def _chat_turn(model, prompt, system, effort, max_tokens, sampler, seed, prefill_step, on_text) -> GenerationResult:  # noqa: ANN001
    """One turn of a fresh chat session: the harmony path of :func:`generate` is the sessions' own."""
    session = ChatSession(model, instructions=system, reasoning_effort=effort)
    for ev in session.stream(prompt, max_tokens=max_tokens, sampler=sampler, seed=seed, prefill_step=prefill_step):
        if isinstance(ev, Done):
            result = ev.reply.stats
            result.text, result.reasoning = ev.reply.final, ev.reply.reasoning
            result.problems = list(ev.reply.problems)
            return result
        if on_text is not None and type(ev) in _CHANNELS:
            on_text(_CHANNELS[type(ev)], ev.text)
    raise RuntimeError("the chat stream ended without its Done event")
