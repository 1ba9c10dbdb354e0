"""The harmony chat format, through openai-harmony: rendering prompts, splitting the output stream."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

Effort = Literal["low", "medium", "high"]


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
    from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    effort = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
    if reasoning_effort not in effort:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    sys_content = SystemContent.new().with_reasoning_effort(effort[reasoning_effort])
    sys_content = sys_content.with_conversation_start_date((today or date.today()).isoformat())
    messages = [Message.from_role_and_content(Role.SYSTEM, sys_content)]
    if system:
        messages.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(system)))
    messages.append(Message.from_role_and_content(Role.USER, user))
    return encoding.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


@dataclass
class Delta:
    """A piece of assistant text and the channel it belongs to (``analysis``, ``final``, ...)."""

    channel: str | None
    text: str


class ChannelSplitter:
    """Feeds generated tokens to harmony's streaming parser and yields text per channel."""

    def __init__(self, encoding: "HarmonyEncoding"):
        from openai_harmony import Role, StreamableParser

        self._parser = StreamableParser(encoding, Role.ASSISTANT, strict=False)
        self.error: str | None = None

    def add(self, token: int) -> Delta | None:
        if self.error is not None:
            return None
        try:
            self._parser.process(token)
        except Exception as e:  # noqa: BLE001 - the Rust parser raises its own error type
            self.error = f"harmony parser stopped at token {token}: {e}"
            return None
        text = self._parser.last_content_delta
        return Delta(self._parser.current_channel, text) if text else None
