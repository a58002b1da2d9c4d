"""The calculator tool: arithmetic parsed with `ast`, never evaluated by Python.

Grammar (anything else is refused with a reason): numbers (int or float literals,
no complex, no strings), + - * / // % **, parentheses, unary + and -, the names
`pi` and `e`, and calls of a few named functions with positional arguments only
(`FUNCTIONS`). The tree is walked by our own evaluator; `eval` is never called.

Bounds, so a call cannot eat the host's time or memory: the expression is at most
`MAX_CHARS` characters and `MAX_NODES` syntax nodes; every integer operand and result
has at most `MAX_DIGITS` decimal digits (checked before a power is computed, from the
operand sizes); an exponent is at most `MAX_EXPONENT` in size; floats must stay finite.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Union

MAX_CHARS = 200
MAX_NODES = 100
MAX_DIGITS = 100
MAX_EXPONENT = 1000
_MAX_INT = 10 ** MAX_DIGITS

Number = Union[int, float]


class CalculatorError(ValueError):
  """An expression the calculator refuses or cannot compute; the message says why."""


def _checked(x: Number) -> Number:
  if isinstance(x, int) and abs(x) >= _MAX_INT:
    raise CalculatorError(f"number too large (more than {MAX_DIGITS} digits)")
  if isinstance(x, float) and not math.isfinite(x):
    raise CalculatorError("result is not finite")
  return x


def _power(base: Number, exponent: Number) -> Number:
  if abs(exponent) > MAX_EXPONENT:
    raise CalculatorError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
  if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
    # |base| ** exponent has about exponent * log10|base| digits: bound it before computing.
    if abs(base) > 1 and exponent * math.log10(abs(base)) >= MAX_DIGITS:
      raise CalculatorError(f"{base} ** {exponent} has more than {MAX_DIGITS} digits")
    return base ** exponent
  try:
    result = float(base) ** float(exponent)
  except OverflowError:
    raise CalculatorError("result is too large") from None
  except ZeroDivisionError:
    raise CalculatorError("zero to a negative power") from None
  if isinstance(result, complex):
    raise CalculatorError("fractional power of a negative number")
  return result


def _divide(a: Number, b: Number) -> Number:
  if b == 0:
    raise CalculatorError("division by zero")
  return a / b


def _floordiv(a: Number, b: Number) -> Number:
  if b == 0:
    raise CalculatorError("division by zero")
  return a // b


def _mod(a: Number, b: Number) -> Number:
  if b == 0:
    raise CalculatorError("modulo by zero")
  return a % b


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: _divide, ast.FloorDiv: _floordiv, ast.Mod: _mod, ast.Pow: _power}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _real_function(fn, domain=None):
  def call(*args):
    if domain is not None and not domain(*args):
      raise CalculatorError(f"{fn.__name__} is undefined at {', '.join(map(str, args))}")
    return fn(*map(float, args))
  return call


def _round(x: Number, digits: Number = 0) -> Number:
  if not isinstance(digits, int) or not -MAX_DIGITS <= digits <= MAX_DIGITS:
    raise CalculatorError("round's digits must be an integer in [-100, 100]")
  return round(x, digits) if digits else round(x)


# name -> (function, min args, max args)
FUNCTIONS = {
    "sqrt": (_real_function(math.sqrt, lambda x: x >= 0), 1, 1),
    "log": (_real_function(math.log, lambda x: x > 0), 1, 1),
    "log10": (_real_function(math.log10, lambda x: x > 0), 1, 1),
    "log2": (_real_function(math.log2, lambda x: x > 0), 1, 1),
    "exp": (_real_function(math.exp, lambda x: x <= 700), 1, 1),
    "sin": (_real_function(math.sin), 1, 1),
    "cos": (_real_function(math.cos), 1, 1),
    "tan": (_real_function(math.tan), 1, 1),
    "abs": (abs, 1, 1),
    "floor": (lambda x: math.floor(x), 1, 1),
    "ceil": (lambda x: math.ceil(x), 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 1, 10),
    "max": (max, 1, 10),
}


def _eval(node: ast.AST) -> Number:
  if isinstance(node, ast.Expression):
    return _eval(node.body)
  if isinstance(node, ast.Constant):
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
      raise CalculatorError(f"only numbers are allowed, not {type(node.value).__name__} "
                            f"{node.value!r:.20}")
    return _checked(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    a, b = _eval(node.left), _eval(node.right)
    try:
      return _checked(_BINARY[type(node.op)](a, b))
    except OverflowError:
      raise CalculatorError("result is too large") from None
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_eval(node.operand))
  if isinstance(node, ast.Name):
    if node.id in _CONSTANTS:
      return _CONSTANTS[node.id]
    raise CalculatorError(f"unknown name {node.id!r} (constants: {', '.join(_CONSTANTS)})")
  if isinstance(node, ast.Call):
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in FUNCTIONS:
      raise CalculatorError(f"unknown function (allowed: {', '.join(FUNCTIONS)})")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
      raise CalculatorError(f"{name}: positional number arguments only")
    fn, lo, hi = FUNCTIONS[name]
    if not lo <= len(node.args) <= hi:
      raise CalculatorError(f"{name} takes {lo}" + (f" to {hi}" if hi > lo else "")
                            + f" argument{'s' if hi > 1 else ''}, got {len(node.args)}")
    args = [_eval(a) for a in node.args]
    try:
      return _checked(fn(*args))
    except (OverflowError, ValueError) as e:
      if isinstance(e, CalculatorError):
        raise
      raise CalculatorError(f"{name}: {e}") from None
  if isinstance(node, ast.BinOp):
    what = f"operator {type(node.op).__name__}"
  else:
    what = type(node).__name__
  raise CalculatorError(f"{what} is not allowed (numbers, + - * / // % **, parentheses "
                        f"and {', '.join(FUNCTIONS)} only)")


def evaluate(expression: str) -> Number:
  """The value of an arithmetic `expression` (see the module docstring for the grammar).

  Args:
    expression: text such as "3 * (4 + 5) / 2" or "sqrt(2) ** 2".

  Returns:
    an int (integer arithmetic stays exact) or a finite float.

  Raises:
    CalculatorError: the expression is too long, does not parse, uses anything outside
      the grammar, or a bound is exceeded (division by zero, huge numbers, ...).
  """
  if not isinstance(expression, str):
    raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
  if len(expression) > MAX_CHARS:
    raise CalculatorError(f"expression longer than {MAX_CHARS} characters ({len(expression)})")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as e:
    raise CalculatorError(f"cannot parse the expression ({e.msg})") from None
  except (ValueError, MemoryError, RecursionError):
    raise CalculatorError("cannot parse the expression") from None
  if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
    raise CalculatorError(f"expression has more than {MAX_NODES} parts")
  return _eval(tree)


def format_number(x: Number) -> str:
  """An int exactly; a float to 12 significant digits ("2.5", "2" for 2.0, "1e+20")."""
  if isinstance(x, int):
    return str(x)
  return f"{x:.12g}"


def calculator(expression: str) -> str:
  """The calculator tool: `format_number(evaluate(expression))`; raises CalculatorError."""
  return format_number(evaluate(expression))


SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "maxLength": MAX_CHARS,
                                  "description": "arithmetic, e.g. '(3 + 4) * 2'"}},
    "required": ["expression"],
    "additionalProperties": False,
}
