"""Tools for chat sessions: a plain Python function, or an explicit JSON schema.

A function's schema comes from its signature (type hints -> JSON types, defaults -> optional)
and its docstring (first paragraph -> description; an ``Args:`` section -> parameter
descriptions).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Tool:
    """A function tool: name, description, JSON-schema parameters, and (optionally) the callable."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any] | None = None

    def __call__(self, **kwargs: Any) -> Any:
        if self.fn is None:
            raise TypeError(f"tool {self.name!r} was given as a schema only: there is nothing to call")
        return self.fn(**kwargs)


def _json_type(hint: Any, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is type(None):
        return {"type": "null"}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        schema = _json_type(inner[0], where) if len(inner) == 1 else {"anyOf": [_json_type(a, where) for a in inner]}
        return schema  # Optional[X]: optional-ness is expressed by "required"
    if hint in (list, tuple, set) or origin in (list, tuple, set, typing.Sequence):
        return {"type": "array", **({"items": _json_type(args[0], where)} if args else {})}
    if hint is dict or origin in (dict, typing.Mapping):
        return {"type": "object"}
    raise TypeError(f"{where}: type {hint!r} has no JSON-schema equivalent here; give the tool an explicit schema")


def _doc_sections(doc: str) -> tuple[str, dict[str, str]]:
    doc = inspect.cleandoc(doc or "")
    description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    m = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if m:
        current = None
        for line in m.group(1).splitlines():
            item = re.match(r"^\s+(\w+)(?:\s*\(.*?\))?\s*:\s*(.*)$", line)
            if item:
                current = item.group(1)
                params[current] = item.group(2).strip()
            elif current and line.strip():
                params[current] += " " + line.strip()
    return description, params


def tool_from_function(fn: Callable[..., Any]) -> Tool:
    """The tool a Python function describes (name, docstring, type hints)."""
    name = fn.__name__
    if not _NAME.match(name):
        raise ValueError(f"tool name {name!r} must be a Python identifier")
    description, param_docs = _doc_sections(fn.__doc__ or "")
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        schema = _json_type(hints.get(p.name, p.annotation), f"{name}({p.name})")
        if p.name in param_docs:
            schema["description"] = param_docs[p.name]
        if p.default is not inspect.Parameter.empty:
            if isinstance(p.default, (str, int, float, bool)) or p.default is None:
                schema["default"] = p.default
        else:
            required.append(p.name)
        props[p.name] = schema
    params = {"type": "object", "properties": props, "required": required}
    return Tool(name, description or name, params, fn)


def as_tool(spec: Tool | Callable[..., Any] | Mapping[str, Any]) -> Tool:
    """Accepts a :class:`Tool`, a function, or a schema dict ``{"name", "description", "parameters"}``
    (the OpenAI ``{"type": "function", "function": {...}}`` wrapping works too)."""
    if isinstance(spec, Tool):
        return spec
    if callable(spec):
        return tool_from_function(spec)
    if isinstance(spec, Mapping):
        d = spec.get("function", spec) if spec.get("type") == "function" else spec
        if "name" not in d:
            raise ValueError(f"tool schema needs a 'name': {dict(spec)!r}")
        if not _NAME.match(d["name"]):
            raise ValueError(f"tool name {d['name']!r} must be a Python identifier")
        return Tool(d["name"], d.get("description", d["name"]), dict(d.get("parameters") or {"type": "object", "properties": {}}))
    raise TypeError(f"cannot make a tool of {spec!r}")
