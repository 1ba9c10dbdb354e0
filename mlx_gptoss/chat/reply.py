"""One assistant reply: generated token by token, parsed into harmony events, cut at stop strings,
gathered into a :class:`Reply`; the piece chat sessions and the server's engine share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from openai_harmony import Message, Role

from ..generate import GenerationResult, stream_tokens
from ..harmony import CommentaryDelta, Event, FinalDelta, HarmonyStream, ReasoningDelta, ToolCall, ToolCallCompleted
from ..kvreuse import KVState


@dataclass
class Reply:
    """One assistant turn: the answer, the reasoning, tool calls, why it ended, and statistics."""

    final: str = ""
    reasoning: str = ""
    commentary: str = ""  # preambles addressed to the user before tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "length"  # "stop", "tool_calls", "length", "cancelled", "max_steps" (run())
    problems: list[str] = field(default_factory=list)  # malformed model output, as found
    dropped_turns: int = 0  # oldest turns this turn hid from the model to fit the context
    stats: GenerationResult = field(default_factory=GenerationResult)
    # the assistant's openai-harmony Messages this turn added to the conversation
    messages: list = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Done:
    """The last event of a stream: the complete reply."""

    reply: Reply


def generate_reply(model, kv: KVState, ids: list[int], opts: dict, *, call_ids: Any = None,
                   cancel: Any = None) -> Iterator[Event | Done]:  # fmt: skip
    """Generate the assistant's reply to the rendered prompt ``ids``, continuing ``kv``: events
    as tokens arrive, then :class:`Done`. ``opts`` are checked turn options (``sampler``,
    ``max_tokens``, ``stop``, ``seed``, ``prefill_step``); ``call_ids`` hands out tool-call ids.

    However it ends, ``kv`` holds what was computed (nothing lazy), ready for the next prompt.
    """
    generated: list[int] = []
    tokens = None
    settled = False
    try:
        cached = kv.reuse(ids)  # a failure inside leaves kv empty, never half cut
        parser = HarmonyStream(model.tokenizer.encoding, call_ids=call_ids)
        stop_text = StopText(opts["stop"])
        reply = Reply()
        tokens = stream_tokens(
            model, ids, max_tokens=opts["max_tokens"], seed=opts.get("seed"), sampler=opts["sampler"],
            stop_tokens=model.tokenizer.stop_tokens, cache=kv.cache, cached=cached,
            cancel=cancel, on_fed=kv.fed, on_prefilled=kv.snapshot, stats=reply.stats,
            prefill_step=opts.get("prefill_step"),
        )  # fmt: skip
        for tok in tokens:
            generated.append(tok)
            for ev in parser.add(tok):
                if isinstance(ev, FinalDelta):
                    ev = stop_text.feed(ev.text)
                if ev is not None:
                    accumulate(reply, ev)
                    yield ev
            if stop_text.hit:
                break
        # what the parser still holds (text without a header, cut off by max_tokens) is answer text
        # too: cut at the stop strings like the rest, then what StopText held back
        for ev in [*parser.finish(), None]:
            if ev is None:
                ev = stop_text.flush()
            elif isinstance(ev, FinalDelta):
                ev = stop_text.feed(ev.text)
            if ev is not None:
                accumulate(reply, ev)
                yield ev
        if stop_text.hit:
            reply.stats.finish_reason = "stop"
        elif reply.stats.finish_reason == "stop" and generated[-1] == parser.special["<|call|>"]:
            reply.stats.finish_reason = "tool_calls"
        reply.finish_reason = reply.stats.finish_reason
        reply.problems = list(parser.problems)
        reply.messages = assistant_messages(parser.messages, stop_text)
        settled = True
        kv.settle(ids + generated)
        yield Done(reply)
    except BaseException:
        if not settled:
            kv.settle(ids + generated)  # what the caches hold is still valid (or dropped if it is not)
        raise
    finally:
        if tokens is not None:
            tokens.close()  # an abandoned generation lets go of the model now, not at garbage collection


class CallIds:
    """Fresh tool-call ids ("call_1", ...), counted so that a failed turn can give them back."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> CallIds:
        return self

    def __next__(self) -> str:
        self.n += 1
        return f"call_{self.n}"


class StopText:
    """Cuts the answer at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> FinalDelta | None:
        if self.hit:
            return None  # the answer ended at the stop string: nothing after it goes out
        if not self.stops:
            return FinalDelta(text)
        self.pending += text
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            i, self.hit = min(found)
            out, self.pending = self.pending[:i], ""
        else:
            keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
            out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return FinalDelta(out) if out else None

    def flush(self) -> FinalDelta | None:
        out, self.pending = self.pending, ""
        return FinalDelta(out) if out and not self.hit else None

    def cut(self, text: str) -> str:
        return text[: text.find(self.hit)] if self.hit and self.hit in text else text


def assistant_messages(parsed: list, stop_text: StopText) -> list:
    out = []
    for m in parsed:
        text = stop_text.cut(m.text) if m.channel in (None, "final") and not m.recipient else m.text
        if not text and not m.recipient:
            continue
        msg = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(m.channel or "final")
        if m.recipient:
            msg = msg.with_recipient(m.recipient)
        if m.content_type:
            msg = msg.with_content_type(m.content_type)
        out.append(msg)
    return out


def accumulate(reply: Reply, ev: Event) -> None:
    if isinstance(ev, ReasoningDelta):
        reply.reasoning += ev.text
    elif isinstance(ev, FinalDelta):
        reply.final += ev.text
    elif isinstance(ev, CommentaryDelta):
        reply.commentary += ev.text
    elif isinstance(ev, ToolCallCompleted):
        reply.tool_calls.append(ev.call)


def last_reply(events: Iterator[Event | Done]) -> Reply:
    done = None
    for ev in events:
        done = ev
    if not isinstance(done, Done):
        raise RuntimeError("the reply stream ended without its Done event")
    return done.reply
