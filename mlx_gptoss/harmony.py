"""The harmony chat format, through openai-harmony: rendering prompts, and turning the model's
token stream into typed events (reasoning, answer, tool calls) that never raise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding, Message

Effort = Literal["low", "medium", "high"]
EFFORTS = ("low", "medium", "high")


def system_message(reasoning_effort: Effort = "medium", *, identity: str | None = None, today: date | None = None) -> "Message":
    """Harmony's system message: reasoning effort, date and (optionally) the model identity line."""
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent

    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    content = content.with_conversation_start_date((today or date.today()).isoformat())
    if identity:
        content = content.with_model_identity(identity)
    return Message.from_role_and_content(Role.SYSTEM, content)


def render_prompt(
    encoding: "HarmonyEncoding",
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
    from openai_harmony import Conversation, DeveloperContent, Message, Role

    messages = [system_message(reasoning_effort, today=today)]
    if system:
        messages.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(system)))
    messages.append(Message.from_role_and_content(Role.USER, user))
    return encoding.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


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


Event = Union[ReasoningDelta, FinalDelta, CommentaryDelta, ToolCallStarted, ToolCallDelta, ToolCallCompleted]


@dataclass
class _Msg:
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str = ""


@dataclass
class HarmonyStream:
    """Turns generated tokens into :data:`Event` s with openai-harmony's streaming parser.

    Never raises on bad model output: when the parser rejects a token, the text goes on as answer
    text, the problem is recorded in :attr:`problems`, and parsing resumes at the next
    ``<|start|>``. :attr:`messages` are the assistant messages so far (for the conversation).
    """

    encoding: "HarmonyEncoding"
    call_ids: Any = None  # iterator of fresh call ids
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from openai_harmony import Role, StreamableParser

        enc = self.encoding
        self._StreamableParser, self._Role = StreamableParser, Role
        self._parser = StreamableParser(enc, Role.ASSISTANT, strict=False)
        # ids of the message-structure tokens, read from the encoding
        self.special = {name: enc.encode(name, allowed_special="all")[0] for name in ("<|start|>", "<|end|>", "<|call|>", "<|return|>")}
        self._ends = {self.special[k] for k in ("<|end|>", "<|call|>", "<|return|>")}
        self._done: list[_Msg] = []
        self._n_parsed = 0
        self._call: ToolCall | None = None
        self._recovering = False
        self._utf8 = None
        self._seq = 0

    # public ---------------------------------------------------------------------------------

    def add(self, token: int) -> list[Event]:
        """Feed one generated token; returns the events it completes."""
        if self._recovering:
            return self._recover(token)
        try:
            self._parser.process(token)
        except Exception as e:  # noqa: BLE001 - the Rust parser raises its own error type
            return self._fail(f"harmony parser rejected token {token}: {e}", token)
        events: list[Event] = []
        delta = self._parser.last_content_delta
        if delta:
            events += self._content(self._parser.current_channel, self._parser.current_recipient, delta)
        if token in self._ends:
            events += self._message_done()
        return events

    def finish(self) -> list[Event]:
        """End of generation: close a message left open (max_tokens, cancel, a stop string)."""
        events: list[Event] = []
        if not self._recovering:
            partial = self._current_partial()
            if partial is not None:
                self._done.append(partial)
        if self._call is not None:
            events += self._complete_call(self._call, truncated=True)
        return events

    @property
    def messages(self) -> list[_Msg]:
        """Assistant messages completed so far."""
        return list(self._done)

    # internals ------------------------------------------------------------------------------

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

    def _fail(self, problem: str, token: int) -> list[Event]:
        import codecs

        self._note(problem)
        partial = self._current_partial()
        if partial is not None:
            self._done.append(partial)
        events: list[Event] = []
        if self._call is not None:
            events += self._complete_call(self._call, truncated=True)
        self._recovering = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._done.append(_Msg("final", None, None, ""))
        return events + self._recover(token)

    def _recover(self, token: int) -> list[Event]:
        if token == self.special["<|start|>"]:
            # a new message begins: hand over to a fresh parser
            self._recovering = False
            self._parser = self._StreamableParser(self.encoding, None, strict=False)
            self._n_parsed = 0
            return self.add(token)
        if token in self._ends or self.encoding.is_special_token(token):
            return []
        text = self._utf8.decode(bytes(self.encoding._inner.decode_bytes([token])))
        if not text:
            return []
        self._done[-1].text += text
        return [FinalDelta(text)]
