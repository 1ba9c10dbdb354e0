"""The harmony chat format, through openai-harmony: rendering prompts, and turning the model's
token stream into typed events (reasoning, answer, tool calls) that never raise.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
)

from .tokenizer import TextTooCostlyError, check_encode_cost, harmony_errors

Effort = Literal["low", "medium", "high"]
EFFORTS = ("low", "medium", "high")


def system_message(reasoning_effort: Effort = "medium", *, identity: str | None = None, today: date | None = None) -> Message:
    """Harmony's system message: reasoning effort, date and (optionally) the model identity line."""
    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    content = content.with_conversation_start_date((today or date.today()).isoformat())
    if identity:
        content = content.with_model_identity(identity)
    return Message.from_role_and_content(Role.SYSTEM, content)


def developer_message(instructions: str | None, tools: Iterable[Any] = ()) -> Message | None:
    """Harmony's developer message: the instructions and the function tools (objects with
    ``name``, ``description`` and ``parameters``, e.g. :class:`~mlx_gptoss.tools.Tool`); None
    when there is neither."""
    tools = list(tools)
    if not instructions and not tools:
        return None
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(
            [ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in tools]
        )
    return Message.from_role_and_content(Role.DEVELOPER, content)


def for_rendering(messages: list[Message]) -> list[Message]:
    """The conversation as the model should see it: the reasoning of answered turns dropped.

    harmony's renderer drops it only when a user message comes last, not in the middle of a
    tool loop; dropping it here, always, follows harmony's rule for earlier turns (the analysis
    since the last final answer stays) and keeps renderings of consecutive calls consistent, so
    a KV cache can be reused. Chat sessions, the server and LoRA data all render through this.
    """
    last_final = max((i for i, m in enumerate(messages) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_final)]


def render_prompt(
    encoding: HarmonyEncoding,
    user: str,
    *,
    system: str | None = None,
    reasoning_effort: Effort = "medium",
    today: date | None = None,
) -> list[int]:
    """Token ids for a one-turn conversation, ending where the assistant's reply begins.

    ``system`` becomes the developer message's instructions (harmony's place for what other chat
    formats call the system prompt); the harmony system message carries the reasoning effort.
    """
    messages = [system_message(reasoning_effort, today=today)]
    if system:
        messages.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(system)))
    messages.append(Message.from_role_and_content(Role.USER, user))
    return render_for_completion(encoding, messages)


def render_for_completion(encoding: HarmonyEncoding, messages: list[Message]) -> list[int]:
    """Token ids of ``messages``, ending where the assistant's reply begins.

    Raises :class:`~mlx_gptoss.tokenizer.TextTooCostlyError` (a ValueError) before rendering when
    a string of the messages has too long a run without a break to tokenize in reasonable time
    (:func:`check_render_cost`), and :class:`~mlx_gptoss.tokenizer.TokenizerError` when
    openai-harmony fails on the text (a panic) instead of a BaseException.
    """
    check_render_cost(messages)
    with harmony_errors("render the conversation"):
        return encoding.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


# harmony's templates put a few bytes beside each string of a message ("// " before a description,
# quotes around an enum value, newlines around instructions): counted on both ends of each string
TEMPLATE_BYTES = 16
# harmony indents a tool schema 4 spaces a level and writes a nested default as brackets: within this
# many levels of Message.to_dict() that stays under tokenizer.MIN_PIECE bytes (ordinary cost)
MAX_NESTING = 64


def message_strings(messages: Iterable[Message]) -> Iterator[tuple[int, str]]:
    """(message index, string) for every string of the messages' ``to_dict()``: text, instructions,
    tool names, descriptions and schemas (keys too), recipients... Raises
    :class:`~mlx_gptoss.tokenizer.TextTooCostlyError` for a message nested deeper than
    :data:`MAX_NESTING` levels (harmony's indentation would grow with the depth)."""
    for i, message in enumerate(messages):
        stack: list[tuple[Any, int]] = [(message.to_dict(), 0)]
        while stack:
            o, depth = stack.pop()
            if isinstance(o, str):
                yield i, o
                continue
            if not isinstance(o, (dict, list, tuple)):
                continue  # numbers, booleans, None: a few digits or letters at most
            if depth >= MAX_NESTING:
                raise TextTooCostlyError(
                    f"the {_role(message)} message is nested more than {MAX_NESTING} levels deep (a tool schema?): "
                    "harmony indents every level, which makes the prompt too costly to tokenize; flatten it"
                )
            items = [*o.keys(), *o.values()] if isinstance(o, dict) else o
            stack.extend((x, depth + 1) for x in items)


def check_render_cost(messages: Sequence[Message]) -> None:
    """Refuse ``messages`` whose rendering would take too long to tokenize (see
    :func:`mlx_gptoss.tokenizer.check_encode_cost`): raises
    :class:`~mlx_gptoss.tokenizer.TextTooCostlyError` (a ValueError) naming the message by its role.
    Every string is counted as if harmony's template added :data:`TEMPLATE_BYTES` to its ends."""
    owners, strings = [], []
    for i, text in message_strings(messages):
        owners.append(i)
        strings.append(text)

    def name(k: int) -> str:
        message = messages[owners[k]]
        if message.author.role == Role.ASSISTANT:
            return "an assistant message (a reply of the model, in the history: reset the conversation or leave that turn out)"
        role = _role(message)
        return f"{'the' if role in ('system', 'developer') else 'a'} {role} message"

    check_encode_cost(strings, what="the conversation", name=name, context=TEMPLATE_BYTES)


def _role(message: Message) -> str:
    return str(getattr(message.author.role, "value", message.author.role))


# -- events ------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """A call the model made: ``arguments`` is the parsed JSON (None when it is not valid JSON)."""

    id: str
    name: str  # e.g. "get_weather" (the "functions." namespace removed)
    recipient: str  # as the model wrote it, e.g. "functions.get_weather"
    raw_arguments: str = ""
    arguments: Any = None
    error: str | None = None  # why the arguments could not be used


@dataclass(frozen=True)
class ReasoningDelta:
    """New text of the reasoning (harmony's analysis channel)."""

    text: str


@dataclass(frozen=True)
class FinalDelta:
    """New text of the answer (harmony's final channel)."""

    text: str


@dataclass(frozen=True)
class CommentaryDelta:
    """New text of a preamble the model addresses to the user before a tool call."""

    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """New text of a tool call's (JSON) arguments."""

    call_id: str
    text: str


@dataclass(frozen=True)
class ToolCallCompleted:
    call: ToolCall


Event = ReasoningDelta | FinalDelta | CommentaryDelta | ToolCallStarted | ToolCallDelta | ToolCallCompleted


@dataclass
class _Msg:
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str = ""


# a real header ("<|channel|>commentary to=functions.get_weather <|constrain|>json") is ~10 tokens
MAX_HEADER_TOKENS = 48


@dataclass
class HarmonyStream:
    """Turns generated tokens into :data:`Event` s with openai-harmony's streaming parser.

    Never raises on bad model output: the text still arrives as events and :attr:`problems`
    says what was wrong. When the parser rejects a token, or the model writes text without a
    channel header, the text goes on as answer text and parsing resumes at the next
    ``<|start|>``; a ``<|start|>`` inside an open message closes that message first; tool-call
    arguments that are not usable JSON (invalid, too deep, too large) give the call an ``error``.
    :attr:`messages` are the assistant messages so far (for the conversation).
    """

    encoding: HarmonyEncoding
    call_ids: Any = None  # iterator of fresh call ids
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:

        enc = self.encoding
        self._StreamableParser, self._Role = StreamableParser, Role
        self._parser = StreamableParser(enc, Role.ASSISTANT, strict=False)
        # ids of the message-structure tokens, read from the encoding
        names = ("<|start|>", "<|end|>", "<|call|>", "<|return|>", "<|message|>")
        self.special = {name: enc.encode(name, allowed_special="all")[0] for name in names}
        self._ends = {self.special[k] for k in ("<|end|>", "<|call|>", "<|return|>")}
        self._header_starts = {enc.encode(name, allowed_special="all")[0] for name in ("<|channel|>", "<|constrain|>")}
        self._done: list[_Msg] = []
        self._n_tokens = 0  # tokens fed
        self._n_parsed = 0
        self._call: ToolCall | None = None
        self._recovering = False
        self._utf8 = None
        self._seq = 0
        self._next_message(after_start=False)

    # public ---------------------------------------------------------------------------------

    def add(self, token: int) -> list[Event]:
        """Feed one generated token; returns the events it completes."""
        self._n_tokens += 1
        if self._recovering:
            return self._recover(token)
        events: list[Event] = []
        if token == self.special["<|start|>"] and self._in_content:
            events += self._close_unended()
        try:
            self._parser.process(token)
        except Exception as e:  # noqa: BLE001 - the Rust parser raises its own error type
            return events + self._fail(f"harmony parser rejected token {token}: {e}", token)
        delta = self._parser.last_content_delta
        if delta:
            self._streamed = True
            events += self._content(self._parser.current_channel, self._parser.current_recipient, delta)
        if token in self._ends:
            events += self._message_done()
            self._next_message(after_start=False)
        elif token == self.special["<|start|>"]:
            self._next_message(after_start=True)
        elif token == self.special["<|message|>"] and not self._in_content:
            self._in_content = True
        elif not self._in_content:
            self._header.append(token)
            if len(self._header) > MAX_HEADER_TOKENS:
                events += self._headerless()
        return events

    def finish(self) -> list[Event]:
        """End of generation: close a message left open (max_tokens, cancel, a stop string).

        Text is never dropped silently: what the model wrote where a header belongs becomes the
        answer (special tokens among it left out); a real header cut off before ``<|message|>``
        and a reply with no text at all are reported in :attr:`problems`."""
        events: list[Event] = []
        if not self._recovering:
            if not self._in_content and self._header:
                if self._header_begun():
                    self._note("the reply ended inside a message header, before any of its text")
                else:
                    events += self._headerless()  # plain text cut off before any <|end|>
            else:
                partial = self._current_partial()
                if partial is not None:
                    self._done.append(partial)
        if self._recovering:
            tail = self._utf8.decode(b"", final=True)
            if tail:
                self._done[-1].text += tail
                events.append(FinalDelta(tail))
        if self._call is not None:
            events += self._complete_call(self._call, truncated=True)
        if self._n_tokens and not self.problems and not any(m.text or m.recipient for m in self._done):
            self._note(f"the model generated {self._n_tokens} tokens and no text")
        return events

    @property
    def messages(self) -> list[_Msg]:
        """Assistant messages completed so far."""
        return list(self._done)

    # internals ------------------------------------------------------------------------------

    def _next_message(self, *, after_start: bool) -> None:
        self._in_content = False  # reading the header until <|message|>
        self._header: list[int] = []
        self._after_start = after_start  # then the header begins with the role
        self._streamed = False  # some of the message's text went out as events

    def _next_id(self) -> str:
        if self.call_ids is not None:
            return next(self.call_ids)
        self._seq += 1
        return f"call_{self._seq}"

    def _content(self, channel: str | None, recipient: str | None, text: str) -> list[Event]:
        if recipient and recipient != "assistant":
            events: list[Event] = []
            if self._call is None:
                name = recipient.split(".", 1)[1] if recipient.startswith("functions.") else recipient
                self._call = ToolCall(self._next_id(), name, recipient)
                events.append(ToolCallStarted(self._call.id, name))
            self._call.raw_arguments += text
            return [*events, ToolCallDelta(self._call.id, text)]
        if channel == "analysis":
            return [ReasoningDelta(text)]
        if channel == "commentary":
            return [CommentaryDelta(text)]
        if channel not in (None, "final"):
            self._note(f"unknown channel {channel!r}: its text was treated as the answer")
        return [FinalDelta(text)]

    def _message_done(self) -> list[Event]:
        try:
            msgs = self._parser.messages
        except Exception as e:  # noqa: BLE001
            self._note(f"harmony parser could not report messages: {e}")
            return []
        events: list[Event] = []
        for m in msgs[self._n_parsed :]:
            text = "".join(getattr(c, "text", "") for c in m.content)
            msg = _Msg(m.channel, m.recipient, m.content_type, text)
            self._done.append(msg)
            if msg.recipient and msg.recipient != "assistant":
                if self._call is None:  # a call with empty arguments streams no content
                    name = msg.recipient.split(".", 1)[1] if msg.recipient.startswith("functions.") else msg.recipient
                    self._call = ToolCall(self._next_id(), name, msg.recipient)
                    events.append(ToolCallStarted(self._call.id, name))
                self._call.raw_arguments = text
                events += self._complete_call(self._call)
            elif text and not self._streamed:
                # the parser read it all as a header (no <|message|>): nothing went out yet
                self._note("the model wrote text without a channel header: it was taken as the answer")
                msg.channel = "final"
                events.append(FinalDelta(text))
        self._n_parsed = len(msgs)
        return events

    def _complete_call(self, call: ToolCall, truncated: bool = False) -> list[Event]:
        self._call = None
        raw = call.raw_arguments.strip()
        if truncated:
            call.error = "the call was cut off before it was complete"
        elif not raw:
            call.arguments = {}
        else:
            try:
                call.arguments = json.loads(raw)
            except json.JSONDecodeError as e:
                call.error = f"arguments are not valid JSON: {e}"
            except (ValueError, RecursionError) as e:  # nested too deep, a number too long, ...
                call.error = f"arguments are not usable JSON: {type(e).__name__}: {str(e)[:200]}"
        if call.error:
            self._note(f"tool call {call.name!r}: {call.error}")
        return [ToolCallCompleted(call)]

    def _current_partial(self) -> _Msg | None:
        try:
            text = self._parser.current_content
            channel, recipient = self._parser.current_channel, self._parser.current_recipient
            ctype = self._parser.current_content_type
        except Exception:  # noqa: BLE001
            return None
        if not text and recipient is None:
            return None
        return _Msg(channel, recipient, ctype, text)

    def _note(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def _close_unended(self) -> list[Event]:
        """A ``<|start|>`` inside a message: the model left out ``<|end|>``; close the message here."""
        self._note("a message was not closed with <|end|> before the next <|start|>: it was closed there")
        partial = self._current_partial()
        if partial is not None:
            self._done.append(partial)
        events = self._complete_call(self._call) if self._call is not None else []
        self._parser = self._StreamableParser(self.encoding, None, strict=False)
        self._n_parsed = 0
        return events

    def _header_begun(self) -> bool:
        """The buffered header tokens begin a real header (a channel, a constraint, a recipient),
        cut off before ``<|message|>``, rather than text written where a header belongs."""
        header = self._header[1:] if self._after_start else self._header  # after the role
        if not header:
            return True
        specials = self.encoding.is_special_token
        if specials(header[0]):
            return header[0] in self._header_starts
        lead = []
        for t in header:
            if specials(t):
                break
            lead.append(t)
        text = bytes(self.encoding._inner.decode_bytes(lead)).decode("utf-8", "replace").lstrip()
        return text.startswith("to=") or "to=".startswith(text)

    def _headerless(self) -> list[Event]:
        """The model wrote text where a header belongs: the text becomes the answer."""
        self._note("the model wrote text without a channel header: it was taken as the answer")
        header = self._header[1:] if self._after_start else self._header  # drop the role
        self._start_recovery()
        return [e for t in header for e in self._recover(t)]

    def _fail(self, problem: str, token: int) -> list[Event]:
        self._note(problem)
        partial = self._current_partial()
        if partial is not None:
            self._done.append(partial)
        events: list[Event] = []
        if self._call is not None:
            events += self._complete_call(self._call, truncated=True)
        self._start_recovery()
        return events + self._recover(token)

    def _start_recovery(self) -> None:

        self._recovering = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._done.append(_Msg("final", None, None, ""))

    def _recover(self, token: int) -> list[Event]:
        if token == self.special["<|start|>"]:
            # a new message begins: hand over to a fresh parser
            self._recovering = False
            self._parser = self._StreamableParser(self.encoding, None, strict=False)
            self._n_parsed = 0
            self._next_message(after_start=False)
            return self.add(token)
        if token in self._ends or self.encoding.is_special_token(token):
            return []
        text = self._utf8.decode(bytes(self.encoding._inner.decode_bytes([token])))
        if not text:
            return []
        self._done[-1].text += text
        return [FinalDelta(text)]
