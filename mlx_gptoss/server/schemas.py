"""Typed requests of the two OpenAI APIs the server speaks, and OpenAI-style errors.

Fields clients commonly send that change nothing here (``user``, ``metadata``, ``store`` on
Chat Completions, ...) are accepted and ignored; fields that would change the answer in a way
this server cannot honour (``n`` > 1, ``logprobs``, image input, non-function tools) are
refused with a 400 that says so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..tools import check_parameters, check_tool_name

Effort = Literal["minimal", "low", "medium", "high"]  # "minimal" (sent by some clients) runs as "low"


class APIError(Exception):
    """An error the client caused (or may retry), answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields


def _check_name(name: str | None) -> str | None:
    return None if name is None else check_tool_name(name)  # the Python API's rules: what one accepts, so does the other


def _text_format(fmt: Any, field: str) -> None:
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise ValueError(f"{field}: only plain text output is supported (structured output {kind!r} is not: "
                         f"nothing here constrains the model to a schema)")  # fmt: skip


# -- Chat Completions ---------------------------------------------------------------------------


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    _name = field_validator("name")(_check_name)
    _params = field_validator("parameters", mode="before")(check_parameters)


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDef


class ContentPart(_Model):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in ("text", "input_text", "output_text") or self.text is None:
            raise ValueError(f"only text content is supported (a part of type {self.type!r} was sent)")
        return self


class ToolCallFunction(_Model):
    name: str
    arguments: str = ""


class ChatToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # gpt-oss raw chain of thought, sent back by the client
    reasoning_content: str | None = None  # the same, as some clients name it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(_Model):
    include_usage: bool = False


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: dict | None = None  # Chat Completions: {"name": ...}
    name: str | None = None  # Responses: the name at the top level


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ChatRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    reasoning_effort: Effort | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # the range mx.random.seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        _text_format(self.response_format, "response_format")
        if self.n != 1:
            raise ValueError("n: only one choice per request is supported (n=1)")
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 stop strings")
        return self


# -- Responses ----------------------------------------------------------------------------------


class ResponseTool(_Model):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    _name = field_validator("name")(_check_name)
    _params = field_validator("parameters", mode="before")(check_parameters)

    @model_validator(mode="after")
    def _function(self) -> ResponseTool:
        if self.type != "function":
            raise ValueError(f"only function tools are supported (a tool of type {self.type!r} was sent)")
        if self.name is None:
            raise ValueError("a function tool needs a name")
        return self


class ReasoningText(_Model):
    type: str = "reasoning_text"
    text: str


class InputItem(_Model):
    """One item of ``input``: a message, a function call, its output, or a reasoning item."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | list[ReasoningText] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    summary: list[ReasoningText] | None = None
    encrypted_content: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> InputItem:
        need = {
            "message": ("role",),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
        }
        missing = [f for f in need.get(self.type, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self

    def text(self) -> str:
        """A message's text, a reasoning item's reasoning (content, else encrypted_content, else
        summary), a function call output's output."""
        if self.type == "reasoning":
            if self.content:
                return "".join(getattr(p, "text", "") or "" for p in self.content)  # type: ignore[union-attr]
            if self.encrypted_content:
                return self.encrypted_content  # this server's "encrypted" content is the plain reasoning
            return "".join(p.text for p in self.summary or [])
        value = self.output if self.type == "function_call_output" else self.content
        if isinstance(value, list):
            return "".join(getattr(p, "text", "") or "" for p in value)
        return value or ""


class ReasoningOptions(_Model):
    effort: Effort | None = None
    summary: str | None = None  # accepted; no summaries are written (the raw reasoning is returned)


class ResponsesRequest(_Model):
    model: str
    input: str | list[InputItem] = ""
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: ToolChoice | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    store: bool = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    stream: bool = False
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    text: dict | None = None
    background: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        _text_format((self.text or {}).get("format"), "text.format")
        if self.background:
            raise ValueError("background: not supported by this server (stream instead)")
        return self

    @field_validator("include")
    @classmethod
    def _known_include(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in ("reasoning.encrypted_content", "message.output_text.logprobs"):
                raise ValueError(f"{name!r} cannot be included by this server")
            if name == "message.output_text.logprobs":
                raise ValueError("logprobs are not supported by this server")
        return v
