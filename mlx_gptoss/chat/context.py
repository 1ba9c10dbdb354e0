"""Context policy: which turns the model still sees when a conversation outgrows its context.

System and developer messages always stay; turns are hidden whole, oldest first (a tool call never
loses its result), and hidden turns stay in the session's ``messages``.
"""

from __future__ import annotations

from collections.abc import Callable

from openai_harmony import Role

from ..generate import PromptTooLongError

# "rolling" (the default) drops turns in bulk, so the KV cache is reused between drops; "drop_oldest"
# keeps the most history but, once the context is full, recomputes the whole prompt every turn
CONTEXT_POLICIES = ("rolling", "drop_oldest", "error")


def context_size(model) -> int:
    """The most tokens (prompt + reply) one turn may use: the model's context, or the context its
    memory plan reserved the KV cache for."""
    plan = getattr(model, "memory_plan", None)
    n = model.config.max_position_embeddings
    return min(n, plan.context) if plan is not None else n


def fit(render: Callable[[list], list[int]], messages: list, hidden: int, max_tokens: int, *, context_size: int,
        policy: str, context_text: str) -> tuple[list[int], int]:  # fmt: skip
    """The prompt for ``messages`` with ``max_tokens`` of room left in ``context_size`` tokens,
    hiding oldest turns as ``policy`` says; returns the prompt and how many messages are hidden.

    ``render`` turns the visible messages into prompt ids; ``context_text`` names the context in
    the :class:`PromptTooLongError` raised when nothing fits."""
    room = context_size - max_tokens
    ids = render(visible(messages, hidden))
    if len(ids) <= room:
        return ids, hidden
    cuts = turn_starts(messages, hidden)  # each one hides one more whole turn
    if policy == "error" or not cuts:
        what = (
            "shorten the message, lower max_tokens, or reset the conversation"
            if cuts
            else "shorten the message or lower max_tokens"
        )
        raise PromptTooLongError(
            f"the conversation makes a prompt of {len(ids)} tokens; with max_tokens={max_tokens} for the reply "
            f"that exceeds {context_text} "
            f"({'context_policy=error' if cuts else 'no earlier turn to drop'}: {what})"
        )
    prompts: dict[int, list[int]] = {}

    def size(i: int) -> int:
        if i not in prompts:
            prompts[i] = render(visible(messages, cuts[i]))
        return len(prompts[i])

    targets = [room // 2, room] if policy == "rolling" else [room]
    for target in targets:
        lo, hi = 0, len(cuts)  # prompts shrink as more turns are hidden: the first cut that fits
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if size(mid) <= target else (mid + 1, hi)
        if lo < len(cuts):
            return prompts[lo], cuts[lo]
    raise PromptTooLongError(
        f"even with every earlier turn dropped the prompt has {size(len(cuts) - 1)} tokens; with "
        f"max_tokens={max_tokens} for the reply that exceeds {context_text} "
        f"(shorten the message or lower max_tokens)"
    )


def is_instruction(message) -> bool:
    """A system or developer message: kept whatever the policy."""
    return message.author.role in (Role.SYSTEM, Role.DEVELOPER)


def visible(messages: list, hidden: int) -> list:
    """``messages`` less the first ``hidden`` conversation messages (instructions always stay)."""
    out, n = [], 0
    for m in messages:
        if is_instruction(m):
            out.append(m)
            continue
        if n >= hidden:
            out.append(m)
        n += 1
    return out


def turn_starts(messages: list, hidden: int) -> list[int]:
    """Where each visible turn but the current one ends: the positions (among conversation
    messages) of the user messages after the first visible one, up to the last user message."""
    conv = [m for m in messages if not is_instruction(m)]
    users = [i for i, m in enumerate(conv) if m.author.role == Role.USER]
    return [i for i in users if i > hidden]
