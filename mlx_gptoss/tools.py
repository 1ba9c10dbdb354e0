"""Tools for chat sessions and the server: a plain Python function, or an explicit JSON schema.

A function's schema comes from its signature (type hints -> JSON types, defaults -> optional)
and its docstring (first paragraph -> description; an ``Args:`` section -> parameter
descriptions).

One set of rules, for the Python API and the server alike: a name fullmatches
``[A-Za-z_][A-Za-z0-9_]*`` (harmony writes it into ``to=functions.NAME``), ``parameters`` is a
JSON-schema object of type "object" (harmony renders it as a TypeScript type), and the names of a
set of tools are unique (:func:`unique_tools`).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch: "$" would let "f\n" through
NO_PARAMETERS = {"type": "object", "properties": {}}


def check_tool_name(name: Any) -> str:
    """``name`` if it can name a tool; ValueError (TypeError for a non-string) saying what can."""
    if not isinstance(name, str):
        raise TypeError(f"tool name {name!r} must be a string")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"tool name {name!r} must be letters, digits and underscores, not starting with a digit")
    return name


def check_parameters(schema: Any) -> dict:
    """A tool's ``parameters``: a JSON-schema object of type "object" (a copy; None or {} means no
    arguments). ValueError says what is wrong, without naming the tool (callers add that)."""
    if schema is None or (isinstance(schema, dict) and not schema):
        return dict(NO_PARAMETERS)
    if not isinstance(schema, Mapping):
        raise ValueError(f'must be a JSON-schema object, e.g. {{"type": "object", "properties": {{...}}}}; got {schema!r}')
    if schema.get("type", "object") != "object":
        raise ValueError(f'the schema\'s type must be "object" (a function takes named arguments), not {schema.get("type")!r}')
    props = schema.get("properties", {})
    if not isinstance(props, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in props.items()):
        raise ValueError('"properties" must map each argument name to a JSON schema (an object)')
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError('"required" must be a list of argument names')
    return dict(schema)


@dataclass
class Tool:
    """A function tool: name, description, JSON-schema parameters, and (optionally) the callable.

    Checked when made: ValueError/TypeError for a name or parameters no tool can have."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        _check(self)

    def __call__(self, **kwargs: Any) -> Any:
        if self.fn is None:
            raise TypeError(f"tool {self.name!r} was given as a schema only: there is nothing to call")
        return self.fn(**kwargs)


def _check(tool: Tool) -> None:
    check_tool_name(tool.name)
    if not isinstance(tool.description, str):
        raise TypeError(f"tool {tool.name!r}: the description must be a string, not {type(tool.description).__name__}")
    try:
        tool.parameters = check_parameters(tool.parameters)
    except ValueError as e:
        raise ValueError(f"tool {tool.name!r}: parameters {e}") from None


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


def _unnamed(fn: Any) -> str:
    """How to tell the user which callable has no usable name."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({getattr(fn.func, '__name__', type(fn.func).__name__)})"
    return f"a {type(fn).__name__} object"


def tool_from_function(fn: Callable[..., Any]) -> Tool:
    """The tool a Python function describes (name, docstring, type hints).

    A callable without a function's name (``functools.partial``, an object with ``__call__``)
    is refused with a TypeError: wrap it in a ``def``, or give ``Tool(name, description,
    parameters, fn)``."""
    name = getattr(fn, "__name__", None)
    if name is None or isinstance(fn, functools.partial):
        raise TypeError(f"tool {_unnamed(fn)} has no name of its own: wrap it in a def, or give "
                        f"Tool(name, description, parameters, fn=...)")  # fmt: skip
    check_tool_name(name)
    if inspect.isclass(fn):  # its type hints would be the class's attributes, not the arguments
        raise TypeError(f"tool {name!r} is a class: give a function (or Tool(name, description, parameters, fn=...))")
    description, param_docs = _doc_sections(getattr(fn, "__doc__", None) or "")
    try:
        signature = inspect.signature(fn)
    except (ValueError, TypeError) as e:  # some builtins have none
        raise TypeError(f"tool {name!r}: its signature cannot be read ({e}); give the tool an explicit schema") from None
    try:
        hints = {} if inspect.isbuiltin(fn) else typing.get_type_hints(fn)
    except (NameError, AttributeError, TypeError, SyntaxError) as e:  # a hint naming what does not exist, ...
        raise TypeError(f"tool {name!r}: its type hints cannot be resolved ({type(e).__name__}: {e}); "
                        f"define the types they name, or give the tool an explicit schema") from None  # fmt: skip
    props, required = {}, []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"tool {name!r}: parameter {p.name!r} is positional-only, but a tool is called with "
                            f"keyword arguments")  # fmt: skip
        schema = _json_type(hints.get(p.name, p.annotation), f"tool {name!r}({p.name})")
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
    (the OpenAI ``{"type": "function", "function": {...}}`` wrapping works too).

    Raises ValueError/TypeError naming the tool for anything no tool can be (see the module doc)."""
    if isinstance(spec, Tool):
        _check(spec)  # again: its fields may have changed since it was made
        return spec
    if isinstance(spec, Mapping):
        d = spec.get("function", spec) if spec.get("type") == "function" else spec
        if not isinstance(d, Mapping):
            raise TypeError(f"tool {dict(spec)!r}: 'function' must be an object with a name, description and parameters")
        if "name" not in d:
            raise ValueError(f"tool schema needs a 'name': {dict(spec)!r}")
        name = check_tool_name(d["name"])
        return Tool(name, d.get("description") or name, d.get("parameters"))
    if callable(spec):
        return tool_from_function(spec)
    raise TypeError(f"cannot make a tool of {spec!r}: give a function, a Tool, or a schema dict")


class DuplicateToolError(ValueError):
    """Two tools of one set share a name: ``name``, and the positions ``first`` and ``index``."""

    def __init__(self, message: str, *, name: str, first: int, index: int):
        super().__init__(message)
        self.name, self.first, self.index = name, first, index


def unique_tools(tools: Iterable[Tool | Callable[..., Any] | Mapping[str, Any]]) -> list[Tool]:
    """``tools`` as :class:`Tool` objects (each through :func:`as_tool`), in order; a name used
    twice raises :class:`DuplicateToolError` (a ValueError) naming it: the model could not tell
    which one it calls."""
    if isinstance(tools, (Mapping, str, Tool)) or callable(tools):
        raise TypeError(f"tools must be a list of tools, not one {type(tools).__name__}: wrap it in [...]")
    out: list[Tool] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(tools):
        tool = as_tool(spec)
        if tool.name in seen:
            raise DuplicateToolError(f"tool name {tool.name!r} is used twice (tools {seen[tool.name]} and {i}): "
                                     f"each tool needs a name of its own", name=tool.name, first=seen[tool.name], index=i)  # fmt: skip
        seen[tool.name] = i
        out.append(tool)
    return out
