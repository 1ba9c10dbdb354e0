"""Chat sessions for apps: harmony conversations with tools, streaming, cancellation, KV reuse.

    chat = model.chat(instructions="Be brief.", reasoning_effort="low", tools=[get_weather])
    reply = chat.send("Weather in Paris?")          # .final, .reasoning, .tool_calls, .stats
    for event in chat.stream("And in Rome?"): ...   # typed events as tokens arrive

Each turn prefills only what is new: the cache is cut back to the longest common token prefix
of what it holds and the new rendering (harmony drops earlier turns' reasoning when it
re-renders, so the reply of the previous turn is usually recomputed, never reused wrongly).
Sliding-window layers cannot be cut back by themselves; the session keeps small snapshots of
them at message boundaries and restores the nearest one (:mod:`mlx_gptoss.kvreuse`, which the
server's prompt cache shares).

A turn that fails changes nothing (options, text and the fitted prompt are checked before the
conversation changes; anything raised later, KeyboardInterrupt included, is rolled back). When
the conversation outgrows the context, the session's ``context_policy`` hides its oldest turns
from the model (they stay in ``messages``) or raises :class:`PromptTooLongError`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import mlx.core as mx

from .generate import GenerationResult, PromptTooLongError, make_sampler, stream_tokens
from .harmony import (
    CommentaryDelta,
    Event,
    FinalDelta,
    HarmonyStream,
    ReasoningDelta,
    ToolCall,
    ToolCallCompleted,
    developer_message,  # fmt: skip
    for_rendering,
    render_for_completion,
    system_message,
)
from .kvreuse import KVState
from .tokenizer import TokenizerError
from .tools import Tool, as_tool

DEFAULT_MAX_TOKENS = 2048
# "rolling" (the default) drops turns in bulk, so the KV cache is reused between drops; "drop_oldest"
# keeps the most history but, once the context is full, recomputes the whole prompt every turn
CONTEXT_POLICIES = ("rolling", "drop_oldest", "error")
_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "sampler", "prefill_step")


def context_size(model) -> int:
    """The most tokens (prompt + reply) one turn may use: the model's context, or the context its
    memory plan reserved the KV cache for."""
    plan = getattr(model, "memory_plan", None)
    n = model.config.max_position_embeddings
    return min(n, plan.context) if plan is not None else n


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


class ChatSession:
    """A harmony conversation with one model (see the module docstring). Not for concurrent
    ``send`` calls; :meth:`cancel` may be called from any thread.

    A turn that fails (bad options or text, a prompt that cannot fit, an exception or
    KeyboardInterrupt while generating, a stream closed before its ``Done``) leaves the
    conversation as it was: the next turn gives what a fresh session with the same history gives.
    """

    def __init__(
        self,
        model,
        *,
        instructions: str | None = None,
        system: str | None = None,
        reasoning_effort: str = "medium",
        tools: Sequence[Tool | Callable | Mapping] = (),
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        context_policy: str = "rolling",
        context: int | None = None,
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
            max_tokens, temperature, top_p, top_k, min_p: defaults for each turn (overridable
                per call). ``max_tokens`` defaults to 2048, or half the context when that is less.
            context_policy: what a turn does when the conversation no longer fits the context
                with ``max_tokens`` of room for the reply: "rolling" hides the oldest turns until
                the prompt fills at most half of what is left (the KV cache is then reused for
                the next turns), "drop_oldest" hides as few as fit (the most history, but the
                whole prompt is recomputed every turn once full), "error" raises
                :class:`PromptTooLongError`. System and developer messages are always kept,
                turns are hidden whole (a tool call never loses its result), and hidden turns
                stay in :attr:`messages`.
            context: the most tokens a turn may use (default: :func:`context_size` of the model).
            reuse_kv: keep the KV cache between turns (False prefills the whole conversation
                every turn, like a stateless server; for comparisons).
        """
        if context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy must be one of {', '.join(CONTEXT_POLICIES)}; got {context_policy!r}")
        limit = context_size(model)
        if context is not None and not (isinstance(context, int) and 1 < context <= limit):
            raise ValueError(f"context must be an integer in 2..{limit} (the model's context); got {context!r}")
        self.model = model
        self.reuse_kv = reuse_kv
        self.context_policy = context_policy
        self.context_size = context or limit
        self.encoding = model.tokenizer.encoding
        self.tools: dict[str, Tool] = {}
        for t in tools:
            tool = as_tool(t)
            self.tools[tool.name] = tool
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.context_size // 2)
        self.defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
        self._options({})  # bad defaults fail here, not at the first turn
        self._identity, self._today = system, today
        if _messages is not None:
            self._messages = list(_messages)
        else:
            self._messages = [system_message(reasoning_effort, identity=system, today=today)]
            dev = developer_message(instructions, self.tools.values())
            if dev is not None:
                self._messages.append(dev)
        self._hidden = 0  # leading conversation messages (not system/developer) the model no longer sees
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        # A session needs every weight; reading them here, in the creating thread, lets turns run
        # in other threads (MLX evaluates a lazy array only in the thread that built it).
        mx.eval(model.parameters())
        self._n_calls = 0  # tool-call ids handed out so far
        self.last_prompt_ids: list[int] = []
        self._kv = KVState(model)

    # -- the conversation as data --------------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        """The conversation, as openai-harmony message dicts (JSON-compatible), turns hidden by
        the context policy included."""
        return [m.to_dict() for m in self._messages]

    @property
    def context_messages(self) -> list[dict]:
        """The messages the model sees now: :attr:`messages` less the turns the context policy hid."""
        return [m.to_dict() for m in _visible(self._messages, self._hidden)]

    def to_json(self) -> str:
        """openai-harmony's conversation JSON; :meth:`from_json` restores the session."""
        from openai_harmony import Conversation

        return Conversation.from_messages(self._messages).to_json()

    @classmethod
    def from_json(cls, model, payload: str, *, tools: Sequence[Tool | Callable | Mapping] = (), **defaults: Any) -> ChatSession:
        """Restore a session saved with :meth:`to_json`. Instructions, effort and tool schemas
        travel in the conversation; pass ``tools`` again to make Python tools callable.

        Raises ValueError when the payload is not a conversation the model can be given."""
        from openai_harmony import Conversation

        try:
            messages = Conversation.from_json(payload).messages
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a harmony conversation JSON: {e}") from None
        session = cls(model, tools=tools, _messages=messages, **defaults)
        try:
            session._render(messages)
        except ValueError:
            # name the first message that breaks the rendering
            for i in range(1, len(messages) + 1):
                try:
                    session._render(messages[:i])
                except ValueError as e:
                    role = messages[i - 1].author.role.value
                    raise ValueError(f"conversation message {i - 1} ({role}) cannot be used: {e}") from None
            raise
        return session

    def reset(self) -> None:
        """Forget the conversation, keep the system and developer messages (and settings)."""
        self._messages = [m for m in self._messages if _is_instruction(m)]
        self._hidden = 0
        self._kv.reset()

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

        Options (per call): max_tokens, temperature, top_p, top_k, min_p, seed, stop (strings
        that end the answer), sampler (logits [1, V] -> token [1]), prefill_step (prompt chunk
        size). Bad options or text raise before the conversation changes.
        """
        return _last(self.stream(text, **options))

    def stream(self, text: str, **options: Any) -> Iterator[Event | Done]:
        """Like :meth:`send`, yielding events as tokens arrive; the last event is :class:`Done`.

        Options and text are checked here; closing the stream before ``Done`` undoes the turn
        (to stop early and keep the partial answer, call :meth:`cancel`)."""
        from openai_harmony import Message, Role

        opts = self._options(options)
        return self._turn(Message.from_role_and_content(Role.USER, _checked_text(text, "the message")), opts)

    def send_tool_result(self, call: ToolCall | str, result: Any, **options: Any) -> Reply:
        """Give the model the result of a tool call and continue the turn."""
        return _last(self.stream_tool_result(call, result, **options))

    def stream_tool_result(self, call: ToolCall | str, result: Any, **options: Any) -> Iterator[Event | Done]:
        from openai_harmony import Author, Message, Role

        opts = self._options(options)
        recipient = call.recipient if isinstance(call, ToolCall) else (call if "." in call else f"functions.{call}")
        content = result if isinstance(result, str) else json.dumps(result, default=str)
        msg = Message.from_author_and_content(Author.new(Role.TOOL, recipient), _checked_text(content, "the tool result"))
        return self._turn(msg.with_recipient("assistant").with_channel("commentary"), opts)

    def stream_reply(self, messages: Sequence[Any], *, kv: KVState | None = None, cancel: Any = None,
                     **options: Any) -> Iterator[Event | Done]:  # fmt: skip
        """Make ``messages`` the conversation and stream the assistant's reply to it (for servers,
        whose clients send the whole conversation each time).

        ``messages`` are openai-harmony Messages: the system message (reasoning effort), the
        developer message (instructions and tools) and the turns, the last one a user or tool
        message. The conversation is rendered exactly as the session's own turns are, so the KV
        cache is reused for the prefix it shares with what was computed before, and too long a
        conversation is handled by the session's ``context_policy``. ``kv`` is the KV state to
        continue (default: the session's own); it is updated in place. ``cancel`` (anything
        with ``is_set()``) stops this reply like :meth:`cancel`. Options as :meth:`send`;
        bad options or messages raise before anything changes.
        """
        opts = self._options(options)
        messages = _checked_conversation(messages)
        return self._turn(messages[-1], opts, history=messages[:-1], kv=kv, cancel=cancel)

    def reply_prompt(self, messages: Sequence[Any], **options: Any) -> list[int]:
        """The prompt :meth:`stream_reply` would generate from (token ids), checking the options
        and messages as it would (ValueError, TypeError, :class:`PromptTooLongError`); nothing
        changes, so it may be called from another thread while the session generates."""
        opts = self._options(options)
        return self._fit(_checked_conversation(messages), 0, opts["max_tokens"])[0]

    def run(self, text: str, *, max_steps: int = 8, **options: Any) -> Reply:
        """Send ``text`` and execute the model's tool calls with the session's Python tools,
        feeding results back, until a reply without tool calls (or ``max_steps`` calls).

        A failing tool, an unknown tool or unusable arguments are reported back to the model as
        ``{"error": ...}``. When the step limit stops the loop, the reply's ``finish_reason`` is
        "max_steps" (its last tool call was not executed) and ``problems`` says so.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an integer >= 0; got {max_steps!r}")
        reply = self.send(text, **options)
        for step in range(max_steps + 1):
            if reply.finish_reason != "tool_calls" or not reply.tool_calls:
                return reply
            if step == max_steps:
                break
            call = reply.tool_calls[-1]
            reply = self.send_tool_result(call, self._execute(call), **options)
        reply.finish_reason = "max_steps"
        reply.problems.append(f"the tool loop stopped after max_steps={max_steps} tool calls; "
                              f"the last call ({reply.tool_calls[-1].name}) was not executed")  # fmt: skip
        return reply

    # -- internals ----------------------------------------------------------------------------

    def _options(self, options: Mapping[str, Any]) -> dict:
        """This turn's options, checked (nothing is changed here); the sampler is built."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))} (known: {', '.join(_OPTIONS)})")
        opts = {**self.defaults, **options}
        n = opts["max_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_tokens must be an integer >= 1; got {n!r}")
        if n >= self.context_size:
            raise PromptTooLongError(f"max_tokens={n} leaves no room for a prompt in {self._context_text()}")
        step = opts.get("prefill_step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise ValueError(f"prefill_step must be an integer >= 1; got {step!r}")
        seed = opts.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        stop = opts.get("stop") or []
        opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in opts["stop"]):
            raise ValueError(f"stop must be a string or a list of strings; got {stop!r}")
        if opts.get("sampler") is None:
            opts["sampler"] = make_sampler(opts["temperature"], opts["top_p"], top_k=opts["top_k"], min_p=opts["min_p"])
        elif not callable(opts["sampler"]):
            raise ValueError(f"sampler must be callable (logits [1, V] -> token [1]); got {opts['sampler']!r}")
        return opts

    def _context_text(self) -> str:
        plan = getattr(self.model, "memory_plan", None)
        if plan is not None and plan.context == self.context_size:
            return f"the context of {self.context_size} tokens the memory budget was planned for (load with a larger context=)"
        return f"the context of {self.context_size} tokens"

    def _render(self, messages: list) -> list[int]:
        """The prompt for ``messages`` (all shown), ending where the assistant's reply begins."""
        try:
            return render_for_completion(self.encoding, for_rendering(messages))
        except TokenizerError:  # a panic inside openai-harmony, already said clearly
            raise
        except Exception as e:  # noqa: BLE001 - openai-harmony raises its own error types
            raise ValueError(f"the conversation cannot be rendered in the harmony format: {e}") from None

    def _fit(self, messages: list, hidden: int, max_tokens: int) -> tuple[list[int], int]:
        """The prompt for ``messages`` with ``max_tokens`` of room left in the context, hiding
        oldest turns as the policy says; returns the prompt and how many messages are hidden."""
        room = self.context_size - max_tokens
        ids = self._render(_visible(messages, hidden))
        if len(ids) <= room:
            return ids, hidden
        cuts = _turn_starts(messages, hidden)  # each one hides one more whole turn
        if self.context_policy == "error" or not cuts:
            what = (
                "shorten the message, lower max_tokens, or reset the conversation"
                if cuts
                else "shorten the message or lower max_tokens"
            )
            raise PromptTooLongError(
                f"the conversation makes a prompt of {len(ids)} tokens; with max_tokens={max_tokens} for the reply "
                f"that exceeds {self._context_text()} "
                f"({'context_policy=error' if cuts else 'no earlier turn to drop'}: {what})"
            )
        prompts: dict[int, list[int]] = {}

        def size(i: int) -> int:
            if i not in prompts:
                prompts[i] = self._render(_visible(messages, cuts[i]))
            return len(prompts[i])

        targets = [room // 2, room] if self.context_policy == "rolling" else [room]
        for target in targets:
            lo, hi = 0, len(cuts)  # prompts shrink as more turns are hidden: the first cut that fits
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if size(mid) <= target else (mid + 1, hi)
            if lo < len(cuts):
                return prompts[lo], cuts[lo]
        raise PromptTooLongError(
            f"even with every earlier turn dropped the prompt has {size(len(cuts) - 1)} tokens; with "
            f"max_tokens={max_tokens} for the reply that exceeds {self._context_text()} "
            f"(shorten the message or lower max_tokens)"
        )

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

    def _system_index(self) -> int | None:
        from openai_harmony import Role

        return next((i for i, m in enumerate(self._messages) if m.author.role == Role.SYSTEM), None)

    @property
    def _tokens(self) -> list[int]:
        """What the session's KV cache holds, position by position."""
        return self._kv.tokens

    def _turn(self, message, opts: dict, *, history: list | None = None, kv: KVState | None = None,
              cancel: Any = None) -> Iterator[Event | Done]:  # fmt: skip
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this chat session is already generating")
        kv = self._kv if kv is None else kv
        stop = self._cancel if cancel is None else _Either(self._cancel, cancel)
        saved = (self._messages, self._hidden, self._n_calls, self.last_prompt_ids)
        done = False
        try:
            self._cancel.clear()
            messages = [*(self._messages if history is None else history), message]
            was_hidden = self._hidden if history is None else 0
            ids, hidden = self._fit(messages, was_hidden, opts["max_tokens"])
            dropped = sum(1 for c in _turn_starts(messages, was_hidden) if c <= hidden)
            # nothing has changed so far; from here on a failure restores `saved`
            self._messages, self._hidden = messages, hidden
            self.last_prompt_ids = list(ids)  # what this turn was generated from
            if not self.reuse_kv:
                kv.reset()
            call_ids = _CallIds(self._n_calls)
            for ev in generate_reply(self.model, kv, ids, opts, call_ids=call_ids, cancel=stop):
                if isinstance(ev, Done):
                    ev.reply.dropped_turns = dropped
                    self._messages = self._messages + ev.reply.messages
                    self._n_calls = call_ids.n
                    done = True  # a consumer that stops at Done keeps the turn
                yield ev
        except BaseException:
            if not done:
                self._messages, self._hidden, self._n_calls, self.last_prompt_ids = saved
            raise
        finally:
            self._lock.release()


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
        stop_text = _StopText(opts["stop"])
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
        reply.messages = _assistant_messages(parser.messages, stop_text)
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


class _CallIds:
    """Fresh tool-call ids ("call_1", ...), counted so that a failed turn can give them back."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> _CallIds:
        return self

    def __next__(self) -> str:
        self.n += 1
        return f"call_{self.n}"


class _Either:
    """Set when any of its events is set (the session's cancel, or one request's)."""

    def __init__(self, *events: Any):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _checked_conversation(messages: Sequence[Any]) -> list:
    from openai_harmony import Message

    messages = list(messages) if isinstance(messages, (list, tuple)) else messages
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Message) for m in messages):
        raise TypeError("messages must be a non-empty list of openai-harmony Messages")
    if _is_instruction(messages[-1]):
        raise ValueError("the conversation must end with a user, tool or assistant message, not with instructions")
    return messages


def _is_instruction(message) -> bool:
    from openai_harmony import Role

    return message.author.role in (Role.SYSTEM, Role.DEVELOPER)


def _visible(messages: list, hidden: int) -> list:
    """``messages`` less the first ``hidden`` conversation messages (instructions always stay)."""
    out, n = [], 0
    for m in messages:
        if _is_instruction(m):
            out.append(m)
            continue
        if n >= hidden:
            out.append(m)
        n += 1
    return out


def _turn_starts(messages: list, hidden: int) -> list[int]:
    """Where each visible turn but the current one ends: the positions (among conversation
    messages) of the user messages after the first visible one, up to the last user message."""
    from openai_harmony import Role

    conv = [m for m in messages if not _is_instruction(m)]
    users = [i for i, m in enumerate(conv) if m.author.role == Role.USER]
    return [i for i in users if i > hidden]


def _checked_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at character {e.start} "
                         f"(decode its bytes with errors='replace')") from None  # fmt: skip
    return text


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
