"""Chat sessions for apps: harmony conversations with tools, streaming, cancellation, KV reuse.

    chat = model.chat(instructions="Be brief.", reasoning_effort="low", tools=[get_weather])
    reply = chat.send("Weather in Paris?")          # .final, .reasoning, .tool_calls, .stats
    for event in chat.stream("And in Rome?"): ...   # typed events as tokens arrive

Each turn prefills only what is new: the cache is cut back to the longest common token prefix
of what it holds and the new rendering (harmony drops earlier turns' reasoning when it
re-renders, so the reply of the previous turn is usually recomputed, never reused wrongly).
Sliding-window layers cannot be cut back by themselves; the session keeps small snapshots of
them at message boundaries and restores the nearest one.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable, Iterator, Mapping, Sequence

import mlx.core as mx

from .cache import SlidingKVCache
from .generate import GenerationResult, make_sampler, stream_tokens
from .harmony import (CommentaryDelta, Event, FinalDelta, HarmonyStream, ReasoningDelta, ToolCall, ToolCallCompleted,
                      system_message)  # fmt: skip
from .tools import Tool, as_tool

MAX_SNAPSHOTS = 8


@dataclass
class Reply:
    """One assistant turn: the answer, the reasoning, tool calls, why it ended, and statistics."""

    final: str = ""
    reasoning: str = ""
    commentary: str = ""  # preambles addressed to the user before tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "length"  # "stop", "tool_calls", "length", "cancelled"
    problems: list[str] = field(default_factory=list)  # malformed model output, as found
    stats: GenerationResult = field(default_factory=GenerationResult)


@dataclass(frozen=True)
class Done:
    """The last event of a stream: the complete reply."""

    reply: Reply


class ChatSession:
    """A harmony conversation with one model (see the module docstring). Not for concurrent
    ``send`` calls; :meth:`cancel` may be called from any thread."""

    def __init__(
        self,
        model,
        *,
        instructions: str | None = None,
        system: str | None = None,
        reasoning_effort: str = "medium",
        tools: Sequence[Tool | Callable | Mapping] = (),
        max_tokens: int = 2048,
        temperature: float = 0.0,
        top_p: float = 1.0,
        today: date | None = None,
        reuse_kv: bool = True,
        _messages: list | None = None,
    ):
        """
        Args:
            model: a loaded model (``mlx_gptoss.load``).
            instructions: the developer instructions (what other formats call the system prompt).
            system: the identity line of harmony's system message (default: harmony's own).
            reasoning_effort: "low", "medium" or "high".
            tools: Python functions (schema from signature and docstring), ``Tool`` objects or
                JSON schemas ``{"name", "description", "parameters"}``.
            max_tokens, temperature, top_p: defaults for each turn (overridable per call).
            reuse_kv: keep the KV cache between turns (False prefills the whole conversation
                every turn, like a stateless server; for comparisons).
        """
        self.model = model
        self.reuse_kv = reuse_kv
        self.encoding = model.tokenizer.encoding
        self.tools: dict[str, Tool] = {}
        for t in tools:
            tool = as_tool(t)
            self.tools[tool.name] = tool
        self.defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self._identity, self._today = system, today
        if _messages is not None:
            self._messages = list(_messages)
        else:
            self._messages = [system_message(reasoning_effort, identity=system, today=today)]
            dev = self._developer_message(instructions)
            if dev is not None:
                self._messages.append(dev)
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        # A session needs every weight; reading them here, in the creating thread, lets turns run
        # in other threads (MLX evaluates a lazy array only in the thread that built it).
        mx.eval(model.parameters())
        self._ids = (f"call_{i}" for i in itertools.count(1))
        self.last_prompt_ids: list[int] = []
        self._reset_cache()

    # -- the conversation as data --------------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        """The conversation, as openai-harmony message dicts (JSON-compatible)."""
        return [m.to_dict() for m in self._messages]

    def to_json(self) -> str:
        """openai-harmony's conversation JSON; :meth:`from_json` restores the session."""
        from openai_harmony import Conversation

        return Conversation.from_messages(self._messages).to_json()

    @classmethod
    def from_json(cls, model, payload: str, *, tools: Sequence[Tool | Callable | Mapping] = (), **defaults: Any) -> "ChatSession":
        """Restore a session saved with :meth:`to_json`. Instructions, effort and tool schemas
        travel in the conversation; pass ``tools`` again to make Python tools callable."""
        from openai_harmony import Conversation

        try:
            messages = Conversation.from_json(payload).messages
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a harmony conversation JSON: {e}") from None
        return cls(model, tools=tools, _messages=messages, **defaults)

    def reset(self) -> None:
        """Forget the conversation, keep the system and developer messages (and settings)."""
        from openai_harmony import Role

        self._messages = [m for m in self._messages if m.author.role in (Role.SYSTEM, Role.DEVELOPER)]
        self._reset_cache()

    @property
    def reasoning_effort(self) -> str:
        sys_msg = self._system_index()
        effort = self._messages[sys_msg].content[0].reasoning_effort if sys_msg is not None else None
        return str(getattr(effort, "value", effort) or "medium").lower()

    @reasoning_effort.setter
    def reasoning_effort(self, effort: str) -> None:
        i = self._system_index()
        msg = system_message(effort, identity=self._identity, today=self._today)
        if i is None:
            self._messages.insert(0, msg)
        else:
            old = self._messages[i].content[0]
            msg.content[0].conversation_start_date = old.conversation_start_date or msg.content[0].conversation_start_date
            msg.content[0].model_identity = old.model_identity
            self._messages[i] = msg

    # -- turns ------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the generation in progress (from any thread); the session stays usable."""
        self._cancel.set()

    def send(self, text: str, **options: Any) -> Reply:
        """Add a user message and generate the assistant's reply.

        Options (per call): max_tokens, temperature, top_p, seed, stop (strings that end the
        answer), sampler (logits [1, V] -> token [1]), prefill_step (prompt chunk size).
        """
        return _last(self.stream(text, **options))

    def stream(self, text: str, **options: Any) -> Iterator[Event | Done]:
        """Like :meth:`send`, yielding events as tokens arrive; the last event is :class:`Done`."""
        from openai_harmony import Message, Role

        return self._turn(Message.from_role_and_content(Role.USER, text), options)

    def send_tool_result(self, call: ToolCall | str, result: Any, **options: Any) -> Reply:
        """Give the model the result of a tool call and continue the turn."""
        return _last(self.stream_tool_result(call, result, **options))

    def stream_tool_result(self, call: ToolCall | str, result: Any, **options: Any) -> Iterator[Event | Done]:
        from openai_harmony import Author, Message, Role

        recipient = call.recipient if isinstance(call, ToolCall) else (call if "." in call else f"functions.{call}")
        content = result if isinstance(result, str) else json.dumps(result, default=str)
        msg = Message.from_author_and_content(Author.new(Role.TOOL, recipient), content)
        return self._turn(msg.with_recipient("assistant").with_channel("commentary"), options)

    def run(self, text: str, *, max_steps: int = 8, **options: Any) -> Reply:
        """Send ``text`` and execute the model's tool calls with the session's Python tools,
        feeding results back, until a reply without tool calls (or ``max_steps`` calls).

        A failing tool, an unknown tool or unusable arguments are reported back to the model as
        ``{"error": ...}``. The returned reply's ``finish_reason`` is "tool_calls" when the step
        limit stopped the loop.
        """
        reply = self.send(text, **options)
        for _ in range(max_steps):
            if reply.finish_reason != "tool_calls" or not reply.tool_calls:
                return reply
            call = reply.tool_calls[-1]
            reply = self.send_tool_result(call, self._execute(call), **options)
        return reply

    # -- internals ----------------------------------------------------------------------------

    def _execute(self, call: ToolCall) -> Any:
        tool = self.tools.get(call.name)
        if tool is None or tool.fn is None:
            return {"error": f"no callable tool named {call.name!r}"}
        if call.error or not isinstance(call.arguments, dict):
            return {"error": call.error or "arguments must be a JSON object"}
        try:
            return tool(**call.arguments)
        except Exception as e:  # noqa: BLE001 - the model should hear about any tool failure
            return {"error": f"{type(e).__name__}: {e}"}

    def _developer_message(self, instructions: str | None):
        from openai_harmony import DeveloperContent, Message, Role, ToolDescription

        if not instructions and not self.tools:
            return None
        content = DeveloperContent.new()
        if instructions:
            content = content.with_instructions(instructions)
        if self.tools:
            content = content.with_function_tools(
                [ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in self.tools.values()]
            )
        return Message.from_role_and_content(Role.DEVELOPER, content)

    def _system_index(self) -> int | None:
        from openai_harmony import Role

        return next((i for i, m in enumerate(self._messages) if m.author.role == Role.SYSTEM), None)

    def _reset_cache(self) -> None:
        self._cache = self.model.make_cache()
        self._tokens: list[int] = []  # what the cache holds, position by position
        self._snaps: dict[int, list] = {}  # position -> sliding caches' state there

    def _snapshot(self) -> None:
        pos = self._cache[0].offset
        self._snaps[pos] = [c.snapshot() if isinstance(c, SlidingKVCache) else None for c in self._cache]
        for old in sorted(self._snaps)[:-MAX_SNAPSHOTS]:
            del self._snaps[old]

    def _reuse(self, ids: list[int]) -> int:
        """Cut the cache back to what the new rendering shares with it; returns how many it keeps."""
        if not self.reuse_kv:
            self._reset_cache()
            return 0
        p, limit = 0, min(len(self._tokens), len(ids) - 1)
        while p < limit and self._tokens[p] == ids[p]:
            p += 1
        held = self._cache[0].offset if self._cache else 0
        if p < held:
            if any(isinstance(c, SlidingKVCache) for c in self._cache):
                # sliding layers go back only to a snapshot
                s = max((k for k in self._snaps if k <= p), default=None)
                if s is None:
                    self._reset_cache()
                    return 0
                for c, snap in zip(self._cache, self._snaps[s]):
                    if snap is not None:
                        c.restore(snap)
                p = s
            for c in self._cache:
                if not isinstance(c, SlidingKVCache):
                    c.trim(c.offset - p)
        self._snaps = {k: v for k, v in self._snaps.items() if k <= p}
        self._tokens = self._tokens[:p]
        return p

    def _turn(self, message, options: Mapping[str, Any]) -> Iterator[Event | Done]:
        from openai_harmony import Conversation, Role

        unknown = set(options) - {"max_tokens", "temperature", "top_p", "seed", "stop", "sampler", "prefill_step"}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        opts = {**self.defaults, **options}
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this chat session is already generating")
        self._cancel.clear()
        ids: list[int] = []
        generated: list[int] = []
        try:
            self._messages.append(message)
            ids = self.encoding.render_conversation_for_completion(Conversation.from_messages(_for_rendering(self._messages)), Role.ASSISTANT)
            self.last_prompt_ids = list(ids)  # what this turn was generated from
            cached = self._reuse(ids)
            parser = HarmonyStream(self.encoding, call_ids=self._ids)
            boundaries = {parser.special["<|start|>"], parser.special["<|end|>"]}
            stop_text = _StopText(opts.get("stop") or [])
            reply = Reply()

            def on_fed(token: int) -> None:
                if token in boundaries:
                    self._snapshot()  # a place where a later rendering may diverge

            tokens = stream_tokens(
                self.model, ids, max_tokens=opts["max_tokens"], seed=opts.get("seed"),
                sampler=opts.get("sampler") or make_sampler(opts["temperature"], opts["top_p"]),
                stop_tokens=self.model.tokenizer.stop_tokens, cache=self._cache, cached=cached,
                cancel=self._cancel, on_fed=on_fed, on_prefilled=self._snapshot, stats=reply.stats,
                prefill_step=opts.get("prefill_step"),
            )  # fmt: skip
            for tok in tokens:
                generated.append(tok)
                for ev in parser.add(tok):
                    if isinstance(ev, FinalDelta):
                        ev = stop_text.feed(ev.text)
                    if ev is not None:
                        _accumulate(reply, ev)
                        yield ev
                if stop_text.hit:
                    break
            for ev in [stop_text.flush(), *parser.finish()]:
                if ev is not None:
                    _accumulate(reply, ev)
                    yield ev
            if stop_text.hit:
                reply.stats.finish_reason = "stop"
            elif reply.stats.finish_reason == "stop" and generated[-1] == parser.special["<|call|>"]:
                reply.stats.finish_reason = "tool_calls"
            reply.finish_reason = reply.stats.finish_reason
            reply.problems = list(parser.problems)
            self._messages += _assistant_messages(parser.messages, stop_text)
            yield Done(reply)
        finally:
            # what the cache holds: the prompt and every generated token it was fed
            if ids:
                self._tokens = (list(ids) + generated)[: self._cache[0].offset]
            self._materialize()
            self._lock.release()

    def _materialize(self) -> None:
        # MLX evaluates a lazy array only in the thread that built it: leave nothing lazy, so the
        # next turn may run in another thread (an app's worker thread, or its main thread).
        snaps = [a for per_pos in self._snaps.values() for snap in per_pos if snap is not None for a in snap[:2]]
        mx.eval([c.state for c in self._cache], [a for a in snaps if a is not None])


def _for_rendering(messages: list) -> list:
    """The conversation as the model should see it: reasoning of answered turns dropped.

    harmony's renderer drops it only when a user message comes last, not in the middle of a
    tool loop; dropping it here, always, follows harmony's rule for earlier turns and keeps
    renderings of consecutive calls consistent (so the KV cache can be reused).
    """
    last_final = max((i for i, m in enumerate(messages) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_final)]


class _StopText:
    """Cuts the answer at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> FinalDelta | None:
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


def _assistant_messages(parsed: list, stop_text: _StopText) -> list:
    from openai_harmony import Message, Role

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


def _accumulate(reply: Reply, ev: Event) -> None:
    if isinstance(ev, ReasoningDelta):
        reply.reasoning += ev.text
    elif isinstance(ev, FinalDelta):
        reply.final += ev.text
    elif isinstance(ev, CommentaryDelta):
        reply.commentary += ev.text
    elif isinstance(ev, ToolCallCompleted):
        reply.tool_calls.append(ev.call)


def _last(events: Iterator[Event | Done]) -> Reply:
    done = None
    for ev in events:
        done = ev
    if not isinstance(done, Done):
        raise RuntimeError("the reply stream ended without its Done event")
    return done.reply
