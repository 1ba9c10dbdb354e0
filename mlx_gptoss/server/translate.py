"""Chat Completions and Responses, to and from harmony.

Requests become one harmony conversation (system message with the reasoning effort, developer
message with the instructions and function tools, then the turns). The model's events become
Chat Completions chunks or Responses stream events; a non-streaming reply is the same builder's
final object, so both forms always agree.

Raw chain of thought follows OpenAI's gpt-oss guide: reasoning goes out as ``reasoning`` (Chat
Completions, mirrored as ``reasoning_content``) or ``reasoning`` items with ``reasoning_text``
content (Responses), and is accepted back; the analysis before the last final answer is dropped
(harmony's rule), so it is kept exactly while the last assistant message was a tool call.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from openai_harmony import Author, Message, Role

from ..harmony import (
    CommentaryDelta,
    FinalDelta,
    ReasoningDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    developer_message,  # fmt: skip
    for_rendering,
    system_message,
)
from ..tokenizer import TextTooCostlyError, check_encode_cost
from ..tools import DuplicateToolError, Tool, unique_tools
from .schemas import APIError, ChatRequest, InputItem, ResponsesRequest

JSON_CONSTRAINT = "<|constrain|>json"  # the content type gpt-oss writes for function arguments


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _effort(effort: str | None) -> str:
    return {"minimal": "low", None: "medium"}.get(effort, effort)  # type: ignore[arg-type]


def _tool_choice(choice: Any, param: str) -> bool:
    """Whether the tools are shown to the model. harmony has no way to force a call, so
    "required" and a named function are refused rather than silently ignored."""
    if choice is None or choice == "auto":
        return True
    if choice == "none":
        return False
    raise APIError(400, "tool_choice: only \"auto\" and \"none\" are supported (gpt-oss cannot be forced to call "
                        "a tool; describe the tool to use in the instructions instead)", param=param)  # fmt: skip


def conversation(effort: str | None, instructions: list[str], tools: list[Tool], turns: list) -> list:
    """The whole harmony conversation: system, developer (instructions, tools), turns."""
    dev = developer_message("\n\n".join(t for t in instructions if t), tools)
    return [system_message(_effort(effort)), *([dev] if dev is not None else []), *for_rendering(turns)]


def request_tools(specs: list[dict], name_param: str) -> list[Tool]:
    """A request's function tools, checked by the Python API's rules (:func:`~mlx_gptoss.tools.unique_tools`);
    a name used twice is a 400 naming the second (``name_param`` formats its index, e.g. "tools[{}].name")."""
    try:
        return unique_tools(specs)
    except DuplicateToolError as e:
        where = name_param.format(e.index)
        raise APIError(400, f"{where}: {e}", param=where) from None


def check_cost(texts: list[tuple[str, str]]) -> None:
    """Refuse a request whose ``(param, text)`` pairs openai-harmony would take too long to tokenize
    (its BPE is quadratic in a run without a break, and holds the GIL: the whole server would stall):
    a 400 naming the field, in milliseconds."""
    try:
        check_encode_cost([t for _, t in texts], what="the request", name=lambda i: texts[i][0])
    except TextTooCostlyError as e:
        raise APIError(400, str(e), param=texts[e.index][0], code="text_too_costly") from None


def _assistant(text: str, channel: str):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def _call(name: str, arguments: str):
    return _assistant(arguments, "commentary").with_recipient(f"functions.{name}").with_content_type(JSON_CONSTRAINT)


def _result(name: str, output: str):
    msg = Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), output)
    return msg.with_recipient("assistant").with_channel("commentary")


def chat_to_harmony(req: ChatRequest) -> list:
    """A Chat Completions request as a harmony conversation."""
    instructions, turns, names = [], [], {}
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer"):
            instructions.append(m.text())
        elif m.role == "user":
            turns.append(Message.from_role_and_content(Role.USER, m.text()))
        elif m.role == "assistant":
            reasoning = m.reasoning or m.reasoning_content
            if reasoning:
                turns.append(_assistant(reasoning, "analysis"))
            if m.text():
                turns.append(_assistant(m.text(), "commentary" if m.tool_calls else "final"))
            for call in m.tool_calls or []:
                names[call.id] = call.function.name
                turns.append(_call(call.function.name, call.function.arguments))
        else:  # tool
            name = names.get(m.tool_call_id or "") or m.name
            if name is None:
                raise APIError(400, f"{where}.tool_call_id: {m.tool_call_id!r} answers no earlier assistant tool call",
                               param=f"{where}.tool_call_id")  # fmt: skip
            turns.append(_result(name, m.text()))
    tools = request_tools([t.function.model_dump() for t in req.tools or []], "tools[{}].function.name")
    shown = tools if _tool_choice(req.tool_choice, "tool_choice") else []
    return conversation(req.reasoning_effort, instructions, shown, turns)


def chat_texts(req: ChatRequest) -> list[tuple[str, str]]:
    """The text a Chat Completions request puts into the prompt, each with the field it came from."""
    out = []
    for i, m in enumerate(req.messages):
        out.append((f"messages[{i}].content", m.text()))
        if m.reasoning or m.reasoning_content:
            field = "reasoning" if m.reasoning else "reasoning_content"
            out.append((f"messages[{i}].{field}", getattr(m, field)))
        for j, call in enumerate(m.tool_calls or []):
            out.append((f"messages[{i}].tool_calls[{j}].function.arguments", call.function.arguments))
    for i, t in enumerate(req.tools or []):
        out.append((f"tools[{i}].function.description", t.function.description or ""))
        out.append((f"tools[{i}].function.parameters", json.dumps(t.function.parameters or {})))
    return out


def responses_items(req: ResponsesRequest) -> list[InputItem]:
    """``input`` as items (a string is one user message)."""
    if isinstance(req.input, str):
        return [InputItem(type="message", role="user", content=req.input)] if req.input else []
    return list(req.input)


def responses_to_harmony(req: ResponsesRequest, items: list[InputItem]) -> list:
    """A Responses request (its ``items``: the stored conversation, then ``input``) as harmony."""
    instructions, turns, names = [req.instructions or ""], [], {}
    for i, item in enumerate(items):
        if item.type == "message":
            if item.role in ("system", "developer"):
                instructions.append(item.text())
            elif item.role == "user":
                turns.append(Message.from_role_and_content(Role.USER, item.text()))
            else:  # a preamble when a call follows it, else an answer
                follows = items[i + 1].type if i + 1 < len(items) else None
                turns.append(_assistant(item.text(), "commentary" if follows == "function_call" else "final"))
        elif item.type == "reasoning":
            turns.append(_assistant(item.text(), "analysis"))
        elif item.type == "function_call":
            names[item.call_id] = item.name
            turns.append(_call(item.name, item.arguments or ""))
        else:
            if item.call_id not in names:
                raise APIError(400, f"input[{i}].call_id: {item.call_id!r} answers no function_call item before it",
                               param=f"input[{i}].call_id")  # fmt: skip
            turns.append(_result(names[item.call_id], item.text()))
    tools = request_tools([t.model_dump(include={"name", "description", "parameters"}) for t in req.tools or []],
                          "tools[{}].name")  # fmt: skip
    effort = req.reasoning.effort if req.reasoning else None
    return conversation(effort, instructions, tools if _tool_choice(req.tool_choice, "tool_choice") else [], turns)


def responses_texts(req: ResponsesRequest, items: list[InputItem]) -> list[tuple[str, str]]:
    """The text a Responses request (``items``: the stored conversation, then ``input``) puts into
    the prompt, each with the field it came from (stored items: ``previous_response_id``)."""
    out = [("instructions", req.instructions or "")]
    stored = len(items) - (len(req.input) if isinstance(req.input, list) else 1 if req.input else 0)
    for i, item in enumerate(items):
        field = {"function_call": "arguments", "function_call_output": "output"}.get(item.type, "content")
        if i < stored:
            where = "previous_response_id"
        else:
            where = f"input[{i - stored}].{field}" if isinstance(req.input, list) else "input"
        out.append((where, (item.arguments or "") if item.type == "function_call" else item.text()))
    for i, t in enumerate(req.tools or []):
        out.append((f"tools[{i}].description", t.description or ""))
        out.append((f"tools[{i}].parameters", json.dumps(t.parameters or {})))
    return out


# -- Chat Completions out -----------------------------------------------------------------------


class ChatBuilder:
    """Chat Completions chunks from harmony events; :meth:`completion` is the non-streaming reply."""

    def __init__(self, model: str):
        self.id, self.created, self.model = new_id("chatcmpl"), int(time.time()), model
        self.content, self.reasoning = "", ""
        self.reasoning_tokens = 0  # one per ReasoningDelta: the parser makes one per generated token of reasoning
        self.calls: list[dict] = []
        self._index: dict[str, int] = {}  # the engine's call id -> position in tool_calls

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

    def start(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def add(self, ev: Any) -> list[dict]:
        """The chunks one engine event makes."""
        if isinstance(ev, ReasoningDelta):
            self.reasoning += ev.text
            self.reasoning_tokens += 1
            return [self._chunk({"reasoning": ev.text, "reasoning_content": ev.text})]
        if isinstance(ev, (FinalDelta, CommentaryDelta)):
            self.content += ev.text
            return [self._chunk({"content": ev.text})]
        if isinstance(ev, ToolCallStarted):
            i = self._index[ev.call_id] = len(self.calls)
            self.calls.append({"id": new_id("call"), "type": "function", "function": {"name": ev.name, "arguments": ""}})
            return [self._chunk({"tool_calls": [{"index": i, **self.calls[i]}]})]
        if isinstance(ev, ToolCallDelta):
            i = self._index[ev.call_id]
            self.calls[i]["function"]["arguments"] += ev.text
            return [self._chunk({"tool_calls": [{"index": i, "function": {"arguments": ev.text}}]})]
        if isinstance(ev, ToolCallCompleted) and ev.call.id in self._index:
            rest = _unsent(self.calls[self._index[ev.call.id]]["function"]["arguments"], ev.call.raw_arguments)
            return self.add(ToolCallDelta(ev.call.id, rest)) if rest else []
        return []

    def finish_reason(self, reply) -> str:
        if self.calls and reply.finish_reason == "tool_calls":
            return "tool_calls"
        return "length" if reply.finish_reason == "length" else "stop"

    def usage(self, reply) -> dict:
        st = reply.stats
        return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generation_tokens,
                "total_tokens": st.prompt_tokens + st.generation_tokens,
                "prompt_tokens_details": {"cached_tokens": st.prompt_tokens - st.prefill_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}  # fmt: skip

    def end(self, reply, include_usage: bool) -> list[dict]:
        out = [self._chunk({}, self.finish_reason(reply))]
        if include_usage:
            out.append({**self._chunk({}), "choices": [], "usage": self.usage(reply)})
        return out

    def completion(self, reply) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or (None if self.calls else "")}
        # always there, null without reasoning: the SDK makes an attribute of an extra field only when it is sent
        msg["reasoning"] = msg["reasoning_content"] = self.reasoning or None
        if self.calls:
            msg["tool_calls"] = self.calls
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": msg, "finish_reason": self.finish_reason(reply), "logprobs": None}],
                "usage": self.usage(reply)}  # fmt: skip


# -- Responses out ------------------------------------------------------------------------------


class ResponseBuilder:
    """Responses stream events (numbered) from harmony events; :attr:`response` is the object."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.reasoning_tokens = 0  # as ChatBuilder's
        self.include_reasoning = "reasoning.encrypted_content" in (req.include or [])
        self.seq = 0
        self.open: dict | None = None  # the output item being written
        self._kind = self._channel = None
        self._calls: dict[str, dict] = {}
        self.response: dict[str, Any] = {
            "id": new_id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "output": [], "instructions": req.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "tool_choice": req.tool_choice if isinstance(req.tool_choice, str) else "auto",
            "parallel_tool_calls": False, "temperature": req.temperature, "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": _effort(req.reasoning.effort if req.reasoning else None), "summary": None},
            "store": req.store, "metadata": req.metadata or {}, "incomplete_details": None, "error": None,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": None,
        }  # fmt: skip

    def _event(self, type: str, **fields: Any) -> dict:
        ev = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _snapshot(self) -> dict:
        return json.loads(json.dumps(self.response))  # events carry the state as it was then

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]  # fmt: skip

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.response["output"]) - 1}

    def _begin(self, kind: str, item: dict) -> list[dict]:
        events = self._close()
        self.open, self._kind = item, kind
        self.response["output"].append(item)
        events.append(self._event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                                  item=json.loads(json.dumps(item))))  # fmt: skip
        if kind in ("message", "reasoning"):
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "message" \
                else {"type": "reasoning_text", "text": ""}  # fmt: skip
            item["content"].append(part)
            events.append(self._event("response.content_part.added", **self._where(), content_index=0, part=dict(part)))
        return events

    def _close(self, status: str = "completed") -> list[dict]:
        item, kind, events = self.open, self._kind, []
        if item is None:
            return events
        self.open = self._kind = None
        where = {"item_id": item["id"], "output_index": len(self.response["output"]) - 1}
        if kind in ("message", "reasoning"):
            part = item["content"][0]
            name = "response.output_text.done" if kind == "message" else "response.reasoning_text.done"
            extra = {"logprobs": []} if kind == "message" else {}
            events.append(self._event(name, **where, content_index=0, text=part["text"], **extra))
            events.append(self._event("response.content_part.done", **where, content_index=0, part=dict(part)))
            if kind == "reasoning" and self.include_reasoning:
                item["encrypted_content"] = part["text"]  # not encrypted: the raw reasoning, for clients that only echo this
        else:
            events.append(self._event("response.function_call_arguments.done", **where, arguments=item["arguments"],
                                      name=item["name"]))  # fmt: skip
        item["status"] = status  # "incomplete": cut off by max_output_tokens, as OpenAI marks it
        events.append(self._event("response.output_item.done", **where, item=json.loads(json.dumps(item))))
        return events

    def add(self, ev: Any) -> list[dict]:
        """The stream events one engine event makes."""
        events: list[dict] = []
        if isinstance(ev, ReasoningDelta):
            if self._kind != "reasoning":
                events += self._begin("reasoning", {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                                                    "encrypted_content": None, "status": "in_progress"})  # fmt: skip
            self.open["content"][0]["text"] += ev.text
            self.reasoning_tokens += 1
            events.append(self._event("response.reasoning_text.delta", **self._where(), content_index=0, delta=ev.text))
        elif isinstance(ev, (FinalDelta, CommentaryDelta)):
            kind = "message" if isinstance(ev, FinalDelta) else "preamble"
            if self._kind != "message" or self._channel != kind:  # a preamble and an answer are two messages
                events += self._begin("message", {"id": new_id("msg"), "type": "message", "role": "assistant",
                                                  "status": "in_progress", "content": []})  # fmt: skip
                self._channel = kind
            self.open["content"][0]["text"] += ev.text
            events.append(self._event("response.output_text.delta", **self._where(), content_index=0, delta=ev.text,
                                      logprobs=[]))  # fmt: skip
        elif isinstance(ev, ToolCallStarted):
            item = {"id": new_id("fc"), "type": "function_call", "call_id": new_id("call"), "name": ev.name,
                    "arguments": "", "status": "in_progress"}  # fmt: skip
            self._calls[ev.call_id] = item
            events += self._begin("function_call", item)
        elif isinstance(ev, ToolCallDelta):
            self._calls[ev.call_id]["arguments"] += ev.text
            events.append(self._event("response.function_call_arguments.delta", **self._where(), delta=ev.text))
        elif isinstance(ev, ToolCallCompleted):
            rest = _unsent(self._calls[ev.call.id]["arguments"], ev.call.raw_arguments) if ev.call.id in self._calls else ""
            if rest:
                events += self.add(ToolCallDelta(ev.call.id, rest))
            events += self._close()
        return events

    def finish(self, reply) -> list[dict]:
        events = self._close("incomplete" if reply.finish_reason == "length" else "completed")
        st = reply.stats
        self.response["usage"] = {
            "input_tokens": st.prompt_tokens, "input_tokens_details": {"cached_tokens": st.prompt_tokens - st.prefill_tokens},
            "output_tokens": st.generation_tokens, "total_tokens": st.prompt_tokens + st.generation_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }  # fmt: skip
        if reply.finish_reason == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.response["status"] = "completed"
        name = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        events.append(self._event(name, response=self._snapshot()))
        return events

    def failed(self, message: str) -> dict:
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        return self._event("response.failed", response=self._snapshot())


def _unsent(sent: str, complete: str) -> str:
    """What of a call's arguments the parser completed without streaming it (the tail)."""
    return complete[len(sent) :] if complete.startswith(sent) else ""


def sse(events: Iterable[dict], named: bool) -> str:
    """Server-sent events: Responses events carry ``event:`` names, Chat Completions chunks do not."""
    out = []
    for ev in events:
        head = f"event: {ev['type']}\n" if named else ""
        out.append(f"{head}data: {json.dumps(ev, ensure_ascii=False)}\n\n")
    return "".join(out)
