"""A small JSON-schema validator for tool arguments (the subset the tools use).

Supported keywords: type (object, string, integer, number, boolean, array, null,
or a list of them), properties, required, additionalProperties (bool), enum,
minLength / maxLength, minimum / maximum, items, maxItems, description and title
(ignored). `check_schema` refuses any other keyword, so a schema never relies on
a rule that is silently not enforced. JSON semantics: `true` is not an integer,
`1.0` is a number but not an integer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "enum", "minLength",
             "maxLength", "minimum", "maximum", "items", "maxItems", "description", "title"}


class SchemaError(ValueError):
  """Arguments that do not match a tool's schema; the message names the field."""


def check_schema(schema: Mapping[str, Any], path: str = "arguments") -> None:
  """Raises ValueError if `schema` uses a keyword or type this validator lacks."""
  if not isinstance(schema, Mapping):
    raise ValueError(f"{path}: a schema is a dict, got {type(schema).__name__}")
  unknown = set(schema) - _KEYWORDS
  if unknown:
    raise ValueError(f"{path}: unsupported schema keywords {sorted(unknown)}")
  types = schema.get("type", [])
  for t in [types] if isinstance(types, str) else types:
    if t not in _TYPES:
      raise ValueError(f"{path}: unknown type {t!r}")
  for name, sub in schema.get("properties", {}).items():
    check_schema(sub, f"{path}.{name}")
  if "items" in schema:
    check_schema(schema["items"], f"{path}[]")


def _is_type(value: Any, t: str) -> bool:
  if t == "object":
    return isinstance(value, dict)
  if t == "string":
    return isinstance(value, str)
  if t == "integer":
    return isinstance(value, int) and not isinstance(value, bool)
  if t == "number":
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
  if t == "boolean":
    return isinstance(value, bool)
  if t == "array":
    return isinstance(value, list)
  return value is None  # null


def validate(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> None:
  """Raises SchemaError (naming the first offending field) unless `value` matches.

  Args:
    value: decoded JSON (dict, list, str, int, float, bool, None).
    schema: a schema accepted by `check_schema`.
    path: the name of `value` in error messages.
  """
  types = schema.get("type")
  if types is not None:
    types = [types] if isinstance(types, str) else list(types)
    if not any(_is_type(value, t) for t in types):
      raise SchemaError(f"{path}: expected {' or '.join(types)}, got {_json_type(value)}")
  if "enum" in schema and value not in schema["enum"]:
    raise SchemaError(f"{path}: {_short(value)} is not one of {schema['enum']}")
  if isinstance(value, str):
    if len(value) > schema.get("maxLength", math.inf):
      raise SchemaError(f"{path}: longer than {schema['maxLength']} characters ({len(value)})")
    if len(value) < schema.get("minLength", 0):
      raise SchemaError(f"{path}: shorter than {schema['minLength']} characters")
  if _is_type(value, "number"):
    if value < schema.get("minimum", -math.inf):
      raise SchemaError(f"{path}: {value} is below the minimum {schema['minimum']}")
    if value > schema.get("maximum", math.inf):
      raise SchemaError(f"{path}: {value} is above the maximum {schema['maximum']}")
  if isinstance(value, list):
    if len(value) > schema.get("maxItems", math.inf):
      raise SchemaError(f"{path}: more than {schema['maxItems']} items")
    if "items" in schema:
      for i, item in enumerate(value):
        validate(item, schema["items"], f"{path}[{i}]")
  if isinstance(value, dict):
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
      if name not in value:
        raise SchemaError(f"{path}: missing required field {name!r}")
    if schema.get("additionalProperties", True) is False:
      extra = sorted(set(value) - set(properties))
      if extra:
        raise SchemaError(f"{path}: unexpected fields {extra}")
    for name, sub in properties.items():
      if name in value:
        validate(value[name], sub, f"{path}.{name}")


def _json_type(value: Any) -> str:
  for t in ("boolean", "integer", "number", "string", "array", "object", "null"):
    if _is_type(value, t):
      return t
  return type(value).__name__


def _short(value: Any, limit: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."
