"""The chat session: a harmony conversation an app holds with one model (see :mod:`mlx_gptoss.chat`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from typing import Any

import mlx.core as mx
from openai_harmony import Author, Conversation, Message, Role

from ..generate import PromptTooLongError, make_sampler
from ..harmony import Event, ToolCall, developer_message, for_rendering, render_for_completion, system_message
from ..kvreuse import KVState
from ..options import check_number, check_seed
from ..tokenizer import TokenizerError
from ..tools import Tool, unique_tools
from .context import CONTEXT_POLICIES, context_size, fit, is_instruction, turn_starts, visible
from .reply import CallIds, Done, Reply, generate_reply, last_reply

DEFAULT_MAX_TOKENS = 2048
_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "sampler", "prefill_step")


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
                JSON schemas ``{"name", "description", "parameters"}``; two with one name raise
                :class:`~mlx_gptoss.tools.DuplicateToolError` (a ValueError).
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
        if context is not None:
            check_number("context", context, integer=True, min=2, max=limit)  # at most the model's context
        self.model = model
        self.reuse_kv = reuse_kv
        self.context_policy = context_policy
        self.context_size = context or limit
        self.encoding = model.tokenizer.encoding
        # one name, one tool: the model could not tell two apart (the last one used to win, silently)
        self.tools: dict[str, Tool] = {tool.name: tool for tool in unique_tools(tools)}
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
        return [m.to_dict() for m in visible(self._messages, self._hidden)]

    def to_json(self) -> str:
        """openai-harmony's conversation JSON; :meth:`from_json` restores the session."""
        return Conversation.from_messages(self._messages).to_json()

    @classmethod
    def from_json(cls, model, payload: str, *, tools: Sequence[Tool | Callable | Mapping] = (), **defaults: Any) -> ChatSession:
        """Restore a session saved with :meth:`to_json`. Instructions, effort and tool schemas
        travel in the conversation; pass ``tools`` again to make Python tools callable.

        Raises ValueError when the payload is not a conversation the model can be given."""
        try:
            messages = Conversation.from_json(payload).messages
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a harmony conversation JSON: {e}") from None
        except RecursionError:  # json.loads on thousands of nested brackets
            raise ValueError("not a harmony conversation JSON: it is nested too deeply") from None
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
        """Forget the conversation, keep the system and developer messages (and settings).

        Raises RuntimeError while a turn is generating (an open :meth:`stream`, or :meth:`send` in
        another thread): the turn would append its reply to the emptied conversation. Stop it
        first: :meth:`cancel` and read the stream to its end (the turn is kept), or close the
        stream (the turn is undone); then reset."""
        with self._idle("reset the conversation"):
            self._messages = [m for m in self._messages if is_instruction(m)]
            self._hidden = 0
            self._kv.reset()

    @property
    def reasoning_effort(self) -> str:
        sys_msg = self._system_index()
        effort = self._messages[sys_msg].content[0].reasoning_effort if sys_msg is not None else None
        return str(getattr(effort, "value", effort) or "medium").lower()

    @reasoning_effort.setter
    def reasoning_effort(self, effort: str) -> None:
        """Change the effort of the next turns (RuntimeError while a turn is generating, as :meth:`reset`)."""
        msg = system_message(effort, identity=self._identity, today=self._today)
        with self._idle("change the reasoning effort"):
            i = self._system_index()
            messages = list(self._messages)  # a copy: a list handed out before is never changed in place
            if i is None:
                messages.insert(0, msg)
            else:
                old = messages[i].content[0]
                msg.content[0].conversation_start_date = old.conversation_start_date or msg.content[0].conversation_start_date
                msg.content[0].model_identity = old.model_identity
                messages[i] = msg
            self._messages = messages

    # -- turns ------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the generation in progress (from any thread); the session stays usable."""
        self._cancel.set()

    def send(self, text: str, **options: Any) -> Reply:
        """Add a user message and generate the assistant's reply.

        Options (per call): max_tokens, temperature, top_p, top_k, min_p, seed (0..2**64-1; None
        or -1: random), stop (strings that end the answer), sampler (logits [1, V] -> token [1]),
        prefill_step (prompt chunk size). Bad options or text raise before the conversation
        changes (:class:`~mlx_gptoss.options.OptionError`, a ValueError, naming the option).
        """
        return last_reply(self.stream(text, **options))

    def stream(self, text: str, **options: Any) -> Iterator[Event | Done]:
        """Like :meth:`send`, yielding events as tokens arrive; the last event is :class:`Done`.

        Options and text are checked here; closing the stream before ``Done`` undoes the turn
        (to stop early and keep the partial answer, call :meth:`cancel`)."""
        opts = self._options(options)
        return self._turn(Message.from_role_and_content(Role.USER, _checked_text(text, "the message")), opts)

    def send_tool_result(self, call: ToolCall | str, result: Any, **options: Any) -> Reply:
        """Give the model the result of a tool call and continue the turn."""
        return last_reply(self.stream_tool_result(call, result, **options))

    def stream_tool_result(self, call: ToolCall | str, result: Any, **options: Any) -> Iterator[Event | Done]:
        """Like :meth:`send_tool_result`, yielding events as tokens arrive; the last event is :class:`Done`."""
        opts = self._options(options)
        if not isinstance(call, (ToolCall, str)) or isinstance(call, str) and not call.strip():
            raise TypeError(f"call must be a ToolCall (from reply.tool_calls) or a tool's name; got {call!r}")
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
        check_number("max_steps", max_steps, integer=True, min=0)
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

    @contextmanager
    def _idle(self, what: str) -> Iterator[None]:
        """Hold the session's turn lock while changing the conversation; RuntimeError if a turn has it."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"cannot {what} while a turn is generating: call cancel() and read the stream to its end "
                "(or close it), then try again"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _options(self, options: Mapping[str, Any]) -> dict:
        """This turn's options, checked (nothing is changed here); the sampler is built.

        Numbers are checked with :mod:`mlx_gptoss.options` (OptionError, a ValueError, naming the
        option); a seed of None or -1 means no seeding (random)."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))} (known: {', '.join(_OPTIONS)})")
        opts = {**self.defaults, **options}
        n = check_number("max_tokens", opts["max_tokens"], integer=True, min=1)
        if n >= self.context_size:
            raise PromptTooLongError(f"max_tokens={n} leaves no room for a prompt in {self._context_text()}")
        if opts.get("prefill_step") is not None:
            check_number("prefill_step", opts["prefill_step"], integer=True, min=1)
        opts["seed"] = check_seed("seed", opts.get("seed"))
        stop = opts.get("stop") or []
        opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in opts["stop"]):
            raise ValueError(f"stop must be a string or a list of strings; got {stop!r}")
        if opts.get("sampler") is None:
            opts["sampler"] = make_sampler(opts["temperature"], opts["top_p"], opts["top_k"], opts["min_p"],
                                           names=("temperature", "top_p", "top_k", "min_p"))  # fmt: skip
        elif not callable(opts["sampler"]):
            raise ValueError(f"sampler must be callable (logits [1, V] -> token [1]); got {opts['sampler']!r}")
        return opts

    def _context_text(self) -> str:
        plan = getattr(self.model, "memory_plan", None)
        if plan is not None and plan.context == self.context_size:
            return (
                f"the context of {self.context_size} tokens the memory budget was planned for (load with a larger "
                "context: context= in Python, --context on the command line)"
            )
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
        """The prompt for ``messages`` and how many messages the context policy hides (see :func:`.context.fit`)."""
        return fit(self._render, messages, hidden, max_tokens, context_size=self.context_size, policy=self.context_policy,
                   context_text=self._context_text())  # fmt: skip

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
        stop = self._cancel if cancel is None else Either(self._cancel, cancel)
        saved = (self._messages, self._hidden, self._n_calls, self.last_prompt_ids)
        done = False
        try:
            self._cancel.clear()
            messages = [*(self._messages if history is None else history), message]
            was_hidden = self._hidden if history is None else 0
            ids, hidden = self._fit(messages, was_hidden, opts["max_tokens"])
            dropped = sum(1 for c in turn_starts(messages, was_hidden) if c <= hidden)
            # nothing has changed so far; from here on a failure restores `saved`
            self._messages, self._hidden = messages, hidden
            self.last_prompt_ids = list(ids)  # what this turn was generated from
            if not self.reuse_kv:
                kv.reset()
            call_ids = CallIds(self._n_calls)
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


class Either:
    """Set when any of its events is set (the session's cancel, or one request's)."""

    def __init__(self, *events: Any):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _checked_conversation(messages: Sequence[Any]) -> list:
    messages = list(messages) if isinstance(messages, (list, tuple)) else messages
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Message) for m in messages):
        raise TypeError("messages must be a non-empty list of openai-harmony Messages")
    if is_instruction(messages[-1]):
        raise ValueError("the conversation must end with a user, tool or assistant message, not with instructions")
    return messages


def _checked_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at character {e.start} "
                         f"(decode its bytes with errors='replace')") from None  # fmt: skip
    return text
