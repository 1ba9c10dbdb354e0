"""Training data for LoRA: JSON lines -> harmony token ids with loss masks, rendered as inference
renders them (:class:`mlx_gptoss.chat.ChatSession`).

Each line is one of (detected per line):

1. a chat ``{"messages": [...], "tools"?: [...], "reasoning_effort"?: ...}`` in the OpenAI style
   of the gpt-oss chat template: a leading ``system``/``developer`` message becomes the developer
   instructions; assistant ``thinking``/``reasoning``/``reasoning_content`` is the analysis channel,
   ``content`` the final answer (or, next to ``tool_calls``, a commentary preamble); ``tool``
   messages answer calls by ``tool_call_id`` (or ``name``, or order). Several calls in one message
   become call, result, call, result... (harmony makes one call at a time);
2. openai-harmony conversation JSON, as :meth:`ChatSession.to_json` writes it (recognised by
   content given as a list of parts); its own system message (date, effort) is kept;
3. ``{"prompt": ..., "completion": ...}``: a user message and the final answer;
4. ``{"text": ...}``: raw text, tokenized as is (harmony special tokens written out become their
   tokens), every token but the first trained.

An assistant turn (its messages up to a final answer or a tool call) is trained on exactly the
tokens the model produces at inference: the conversation before it is rendered as ChatSession
renders its prompt (reasoning of answered turns dropped, then ``<|start|>assistant``), and the
turn's messages follow, ending with ``<|return|>`` (final) or ``<|call|>`` (tool call). Because
earlier reasoning is dropped from later contexts, each turn gets its own sequence, except when the
next turn's prompt extends the previous sequence token for token (a tool loop), where they share one.
Tool calls are written as harmony renders them: ``<|start|>assistant to=functions.NAME<|channel|>
commentary <|constrain|>json<|message|>...<|call|>`` (ChatSession's parser reads either placement).

``train_on="final"`` trains the tokens of each final-answer message the model writes (from its
``<|channel|>`` header, or its ``<|start|>`` when the turn has earlier messages, to ``<|return|>``);
``"assistant"`` trains everything the model writes. A sequence longer than ``max_seq_len`` is
skipped, or with ``overflow="truncate"`` cut at the end and kept when a trained token remains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from openai_harmony import Author, Conversation, HarmonyEncoding, Message, RenderConversationConfig, Role

from ..harmony import EFFORTS, TEMPLATE_BYTES, developer_message, for_rendering, system_message
from ..tokenizer import TextTooCostlyError, check_encode_cost
from ..tools import DuplicateToolError, as_tool, unique_tools

DEFAULT_DATE = date(2025, 6, 28)  # a fixed "Current date" for the system message: data must not change by the day
TRAIN_ON = ("final", "assistant")
OVERFLOW = ("skip", "truncate")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_REASONING_KEYS = ("thinking", "reasoning", "reasoning_content")
# the keys that make a line one format or another: a line holding keys of two is ambiguous
_FORMAT_KEYS = (("messages",), ("prompt", "completion"), ("text",))


class DataError(ValueError):
    """A malformed training line: ``FILE:LINE: field X: what is wrong``."""


@dataclass
class Example:
    """One training sequence: ``targets[i]`` is True when ``ids[i]`` is trained (predicted from
    ``ids[:i]``). ``turns`` are the ``(start, end)`` spans of the assistant turns' completions."""

    ids: list[int]
    targets: list[bool]
    line: int
    turns: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_trained(self) -> int:
        return sum(self.targets)


@dataclass(frozen=True)
class Skipped:
    """A sequence left out of training, and why."""

    line: int
    reason: str


@dataclass
class Dataset:
    """The examples of one JSON-lines file, and the sequences skipped."""

    path: Path
    examples: list[Example]
    skipped: list[Skipped]
    lines: int  # non-blank lines read
    train_on: str = "final"
    max_seq_len: int = 2048
    overflow: str = "skip"
    sha256: str | None = None  # of the file's bytes: a resumed run checks its data is the same

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of the examples (the tokens trained on, whatever file they came from)."""
        return fingerprint(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(e.n_trained for e in self.examples)

    def summary(self) -> str:
        """One line for the CLI: examples, tokens, trained tokens, what was skipped."""
        s = (f"{self.path}: {len(self.examples)} sequences from {self.lines} lines, {self.tokens:,} tokens "
             f"({self.trained_tokens:,} trained, train_on={self.train_on})")  # fmt: skip
        if self.skipped:
            shown = "; ".join(f"line {k.line}: {k.reason}" for k in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            s += f"; {len(self.skipped)} skipped ({shown}{more})"
        return s


def load_dataset(
    path: str | Path,
    encoding: HarmonyEncoding,
    *,
    train_on: str = "final",
    max_seq_len: int = 2048,
    overflow: str = "skip",
    reasoning_effort: str = "medium",
    today: date = DEFAULT_DATE,
) -> Dataset:
    """Read a JSON-lines file into training sequences (see the module docstring).

    Args:
        path: the ``.jsonl`` file; blank lines are ignored.
        encoding: the harmony encoding (``model.tokenizer.encoding``).
        train_on: "final" (final answers only) or "assistant" (everything the assistant writes).
        max_seq_len: the longest sequence kept.
        overflow: "skip" a longer sequence, or "truncate" it at the end.
        reasoning_effort, today: the system message of chats that do not set their own.

    Raises:
        DataError: a malformed line (``FILE:LINE: field X: ...``), an unreadable or empty file.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, not {max_seq_len}")
    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    raw_lines = content.splitlines()
    examples, skipped, lines = [], [], 0
    for n, raw in enumerate(raw_lines, 1):
        where = f"{path}:{n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
        if not text.strip():
            continue
        lines += 1
        try:
            record = json.loads(text)
            found = record_examples(record, encoding, train_on=train_on, reasoning_effort=reasoning_effort, today=today,
                                    line=n, where=where)  # fmt: skip
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:  # json.loads (and anything walking the record) recurses once per level
            raise DataError(f"{where}: nested too deeply (lists or objects inside each other beyond Python's limit)") from None
        if not found:
            skipped.append(Skipped(n, "no token to train: no assistant turn ending in a final answer or a tool call"))
        for ex in found:
            kept = _fit(ex, max_seq_len, overflow, train_on)
            if isinstance(kept, str):
                skipped.append(Skipped(n, kept))
            else:
                examples.append(kept)
    if lines == 0:
        raise DataError(f"{path}: the file is empty: expected one JSON object per line")
    return Dataset(path, examples, skipped, lines, train_on, max_seq_len, overflow, hashlib.sha256(content).hexdigest())


def fingerprint(examples: Any) -> str:
    """``"sha256:<hex>"`` of the examples' token ids and training masks, in order: what a run trains on.

    A resumed run compares it with its checkpoint's: an edited file, another ``train_on`` or
    ``max_seq_len`` give other tokens or masks, hence another fingerprint.
    """
    h = hashlib.sha256()
    for e in examples:
        ids = np.asarray(e.ids, dtype=np.int64)
        h.update(np.int64(len(ids)).tobytes())
        h.update(ids.tobytes())
        h.update(np.asarray(e.targets, dtype=np.bool_).tobytes())
    return "sha256:" + h.hexdigest()


def record_examples(
    record: Any,
    encoding: HarmonyEncoding,
    *,
    train_on: str = "final",
    reasoning_effort: str = "medium",
    today: date = DEFAULT_DATE,
    line: int = 0,
    where: str = "record",
) -> list[Example]:
    """The sequences of one parsed JSON line (before the length limit); DataError when malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    formats = [[k for k in keys if k in record] for keys in _FORMAT_KEYS]
    if sum(1 for f in formats if f) > 1:
        keys = ", ".join(sorted(k for f in formats for k in f))
        raise DataError(f"{where}: holds the keys of more than one format ({keys}): a line is messages, "
                        "prompt and completion, or text; keep one")  # fmt: skip
    _check_strings(record, where)
    if "messages" in record:
        messages = _conversation(record, where, reasoning_effort, today)
    elif "prompt" in record or "completion" in record:
        messages = _prompt_completion(record, where, reasoning_effort, today)
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: field text: must be a non-empty string")
        ids = encoding.encode(text, allowed_special="all")
        return [Example(ids, [False] + [True] * (len(ids) - 1), line, [(1, len(ids))])]
    else:
        raise DataError(f"{where}: field messages: missing (a line needs messages, prompt and completion, or text)")
    return _sequences(messages, encoding, train_on, line, where)


def _check_strings(record: dict, where: str) -> None:
    """Refuse, naming the field, a string of the line that cannot be rendered: a lone surrogate
    (``"\\ud800"``: JSON allows the escape, Unicode has no such character; openai-harmony would fail
    on it naming no field, or the tokenizer turn it into U+FFFD silently), or text too costly to
    tokenize (:func:`mlx_gptoss.tokenizer.check_encode_cost`: a long run of one character takes the
    BPE a time quadratic in its length)."""
    names, texts = [], []
    stack: list[tuple[str, Any]] = [("", record)]  # no recursion: a line may nest deep
    while stack:
        field, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{field}.{k}" if field else k, v) for k, v in reversed(value.items()))
            found = [(f"{field or 'the line'} (a key)", k) for k in value]
        elif isinstance(value, list):
            stack.extend((f"{field}[{i}]", v) for i, v in reversed(list(enumerate(value))))
            continue
        else:
            found = [(field, value)] if isinstance(value, str) else []
        for name, text in found:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: field {name}: holds a lone surrogate \\u{ord(text[e.start]):04x} at character "
                                f"{e.start + 1}, which is not a Unicode character (an escape cut in half?)") from None  # fmt: skip
            names.append(name)
            texts.append(text)
    try:  # the strings of one line are rendered into one sequence: their cost adds up
        check_encode_cost(texts, what=where, name=lambda i: f"field {names[i]}", context=TEMPLATE_BYTES)
    except TextTooCostlyError as e:
        raise DataError(str(e)) from None


# -- formats -> harmony messages ---------------------------------------------------------------


def _conversation(record: dict, where: str, effort: str, today: date) -> list[Message]:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field messages: must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field messages[{i}]: must be an object, found {type(m).__name__}")
    if any(isinstance(m.get("content"), list) for m in msgs):
        return _harmony(record, where, effort, today)
    return _chat(record, where, effort, today)


def _harmony(record: dict, where: str, effort: str, today: date) -> list[Message]:

    harmony_only = {"channel", "recipient", "content_type"}
    parts = [p for m in record["messages"] if isinstance(m.get("content"), list) for p in m["content"]]
    marked = any(harmony_only & m.keys() for m in record["messages"]) or any(
        isinstance(p, dict) and p.get("type") in ("system_content", "developer_content") for p in parts)  # fmt: skip
    if not marked:
        i = next(i for i, m in enumerate(record["messages"]) if isinstance(m.get("content"), list))
        raise DataError(f"{where}: field messages[{i}].content: must be a string (content as a list of parts is "
                        "read only in openai-harmony conversation JSON, as ChatSession.to_json writes it)")  # fmt: skip
    for i, m in enumerate(record["messages"]):
        if m.get("role") not in _ROLES:
            raise DataError(
                f"{where}: field messages[{i}].role: unknown role {m.get('role')!r} (expected one of {', '.join(_ROLES)})"
            )
        for key in sorted(harmony_only & m.keys()):
            if m[key] is not None and not isinstance(m[key], str):
                raise DataError(f"{where}: field messages[{i}].{key}: must be a string, found a {type(m[key]).__name__}")
    try:
        messages = Conversation.from_json(json.dumps({"messages": record["messages"]})).messages
    except Exception as e:  # noqa: BLE001 - pydantic and the Rust side raise their own error types
        why = "; ".join(x.strip() for x in str(e).splitlines()[:3])
        raise DataError(f"{where}: field messages: not a valid openai-harmony conversation: {why}") from None
    if not any(m.author.role == Role.SYSTEM for m in messages):
        messages.insert(0, system_message(_effort(record, where, effort), today=today))
    return messages


def _prompt_completion(record: dict, where: str, effort: str, today: date) -> list[Message]:

    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: field {key}: must be a string" + ("" if key in record else ", and is missing"))
    return [
        system_message(_effort(record, where, effort), today=today),
        Message.from_role_and_content(Role.USER, record["prompt"]),
        Message.from_role_and_content(Role.ASSISTANT, record["completion"]).with_channel("final"),
    ]


def _effort(record: dict, where: str, default: str) -> str:
    effort = record.get("reasoning_effort", default)
    if isinstance(effort, str) and effort.lower() in EFFORTS:
        return effort.lower()
    raise DataError(f"{where}: field reasoning_effort: must be low, medium or high, not {effort!r}")


def _chat(record: dict, where: str, effort: str, today: date) -> list[Message]:
    """The OpenAI-style chat as the harmony messages ChatSession would hold for it."""
    tools = _tools(record, where)
    instructions: list[str] = []
    out: list[Message] = []
    group: list[tuple[str | None, str, Message, str]] = []  # pending calls: (id, name, message, field)
    results: dict[int, Message] = {}

    def flush(more: bool) -> None:
        # one call at a time: call, its result, next call, its result...
        for k, (_, _, call, f) in enumerate(group):
            if k:
                out.append(call)
            if k in results:
                out.append(results[k])
            elif k < len(group) - 1 or more:
                raise DataError(f"{where}: field {f}: no tool message answers this call")
        group.clear()
        results.clear()

    for i, m in enumerate(record["messages"]):
        f = f"messages[{i}]"
        role = m.get("role")
        if role not in _ROLES:
            raise DataError(f"{where}: field {f}.role: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        if role != "tool" and group:
            flush(more=True)
        if role in ("system", "developer"):
            if out:
                raise DataError(f"{where}: field {f}.role: a {role} message must come before the conversation")
            instructions.append(_text(m, f, where))
        elif role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m, f, where)))
        elif role == "assistant":
            calls = _tool_calls(m, f, where)
            content = _text(m, f, where, optional=True)
            if not content and not calls:
                raise DataError(f"{where}: field {f}.content: an assistant message needs content or tool_calls")
            reasoning = _reasoning(m, f, where)
            if reasoning:
                out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
            if not calls:
                out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
                continue
            if content:  # text next to a call is a preamble to the user: harmony's commentary channel
                out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("commentary"))
            group.extend(calls)
            out.append(group[0][2])
        else:
            k = _answered_call(m, f, where, group, results)
            recipient = group[k][2].recipient
            msg = Message.from_author_and_content(Author.new(Role.TOOL, recipient), _text(m, f, where))
            results[k] = msg.with_recipient("assistant").with_channel("commentary")
    flush(more=False)
    dev = developer_message("\n\n".join(instructions) or None, tools.values())
    return [system_message(_effort(record, where, effort), today=today), *([dev] if dev is not None else []), *out]


def _tools(record: dict, where: str) -> dict:
    specs = record.get("tools") or []
    if not isinstance(specs, list):
        raise DataError(f"{where}: field tools: must be a list of function schemas")
    tools = []
    for i, spec in enumerate(specs):
        fn = spec.get("function", spec) if isinstance(spec, dict) else None
        if isinstance(fn, dict) and not isinstance(fn.get("parameters") or {}, dict):
            raise DataError(f"{where}: field tools[{i}].parameters: must be a JSON schema object")
        try:
            tools.append(as_tool(spec))
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: field tools[{i}]: {e}") from None
    try:
        unique_tools(tools)  # the sessions' and the server's rule: no name twice
    except DuplicateToolError as e:
        raise DataError(f"{where}: field tools[{e.index}]: {e}") from None
    return {t.name: t for t in tools}


def _text(m: dict, f: str, where: str, optional: bool = False) -> str:
    content = m.get("content")
    if content is None and optional:
        return ""
    if not isinstance(content, str):
        found = "missing" if "content" not in m else f"a {type(content).__name__}"
        raise DataError(f"{where}: field {f}.content: must be a string, found {found}")
    return content


def _reasoning(m: dict, f: str, where: str) -> str:
    for key in _REASONING_KEYS:
        value = m.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field {f}.{key}: must be a string, found a {type(value).__name__}")
        return value
    return ""


def _tool_calls(m: dict, f: str, where: str) -> list[tuple[str | None, str, Message, str]]:

    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise DataError(f"{where}: field {f}.tool_calls: must be a list")
    out = []
    for k, tc in enumerate(calls):
        g = f"{f}.tool_calls[{k}]"
        if not isinstance(tc, dict):
            raise DataError(f"{where}: field {g}: must be an object")
        fn = tc.get("function", tc)
        if not isinstance(fn, dict):
            raise DataError(f"{where}: field {g}.function: must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: field {g}.function.name: {'missing' if name is None else 'must be a non-empty string'}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: field {g}.function.arguments: not valid JSON: {e.msg} (column {e.colno})") from None
        elif isinstance(args, (dict, list)):
            args = json.dumps(args, ensure_ascii=False)
        else:
            raise DataError(f"{where}: field {g}.function.arguments: must be a JSON string or object")
        recipient = name if "." in name else f"functions.{name}"  # as ChatSession.stream_tool_result
        msg = (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
               .with_recipient(recipient).with_content_type("<|constrain|>json"))  # fmt: skip
        out.append((tc.get("id"), name, msg, g))
    return out


def _answered_call(m: dict, f: str, where: str, group: list, results: dict) -> int:
    """Which pending call a tool message answers: by tool_call_id, else by name, else in order."""
    open_ = [k for k in range(len(group)) if k not in results]
    if not open_:
        raise DataError(f"{where}: field {f}.role: a tool message without a preceding tool call")
    call_id, name = m.get("tool_call_id"), m.get("name")
    if call_id is not None:
        match = [k for k in open_ if group[k][0] == call_id]
        if not match:
            raise DataError(f"{where}: field {f}.tool_call_id: no unanswered tool call has id {call_id!r}")
        return match[0]
    if name is not None:
        match = [k for k in open_ if name in (group[k][1], group[k][2].recipient)]
        if not match:
            raise DataError(f"{where}: field {f}.name: no unanswered tool call is named {name!r}")
        return match[0]
    return open_[0]


# -- harmony messages -> sequences ---------------------------------------------------------------


def _turns(messages: list[Message]) -> list[tuple[int, int]]:
    """``messages[lo:hi]`` spans of the assistant turns, each ending at a final answer or a call.
    A run that ends otherwise (a reply cut off) is context only."""
    turns, lo = [], None
    for i, m in enumerate(messages):
        if m.author.role != Role.ASSISTANT:
            lo = None
            continue
        lo = i if lo is None else lo
        if m.channel == "final" or m.recipient:
            turns.append((lo, i + 1))
            lo = None
    return turns


def _sequences(messages: list[Message], enc: HarmonyEncoding, train_on: str, line: int, where: str) -> list[Example]:

    keep = RenderConversationConfig(auto_drop_analysis=False)  # the turn's own reasoning stays
    end, ret, call = (enc.encode(t, allowed_special="all")[0] for t in ("<|end|>", "<|return|>", "<|call|>"))
    out: list[Example] = []
    for lo, hi in _turns(messages):
        context, turn = for_rendering(messages[:lo]), messages[lo:hi]
        # the prompt exactly as ChatSession renders it before generating this turn
        prompt = enc.render_conversation_for_completion(Conversation.from_messages(context), Role.ASSISTANT)
        full = enc.render_conversation(Conversation.from_messages(context + turn), keep)
        parts = [enc.render(m) for m in turn]
        tail = [t for p in parts for t in p]
        if full[: len(prompt)] != prompt or full[len(full) - len(tail) :] != tail or len(full) - len(tail) >= len(prompt):
            raise RuntimeError(f"{where}: internal error: the turn's rendering does not extend its prompt (please report)")
        last = turn[-1]
        if full[-1] != (end if last.channel == "final" and not last.recipient else call):
            raise RuntimeError(f"{where}: internal error: unexpected last token {full[-1]} of a turn (please report)")
        if full[-1] == end:
            full[-1] = ret  # what inference generates (history renders <|end|>)
        if train_on == "assistant":
            first = len(prompt)
        else:  # the final message's tokens the model writes, or none for a tool call
            first = max(len(prompt), len(full) - len(parts[-1])) if full[-1] == ret else len(full)
        targets = [False] * (first - len(prompt)) + [True] * (len(full) - first)
        prev = out[-1] if out else None
        if prev is not None and len(prev.ids) <= len(prompt) and prompt[: len(prev.ids)] == prev.ids:
            # the new context extends the previous sequence: one sequence for both turns
            prev.targets += [False] * (len(prompt) - len(prev.ids)) + targets
            prev.ids = full
            prev.turns.append((len(prompt), len(full)))
        else:
            out.append(Example(full, [False] * len(prompt) + targets, line, [(len(prompt), len(full))]))
    return out


def _fit(ex: Example, max_len: int, overflow: str, train_on: str) -> Example | str:
    """The example within ``max_len`` tokens, or why it is skipped."""
    if not any(ex.targets):
        why = ": no assistant final answer" if train_on == "final" else ": no assistant turn"
        return f"no token to train (train_on={train_on}){why}"
    if len(ex.ids) <= max_len:
        return ex
    if overflow == "skip":
        return f"{len(ex.ids)} tokens, longer than max_seq_len={max_len}"
    cut = Example(ex.ids[:max_len], ex.targets[:max_len], ex.line, [(s, min(e, max_len)) for s, e in ex.turns if s < max_len])
    if not any(cut.targets):
        return f"{len(ex.ids)} tokens: cut to max_seq_len={max_len}, no trained token is left"
    return cut
