"""Conversation sources for supervised fine-tuning, all offline.

A conversation is a list of messages as in research/chat.py. Sources:

- `chatterbot()`: the 2,026 short English dialogues of `chatterbot-corpus`.
- `word_problems()`: seeded synthetic k-step word problems ("Ana has 3 apples.
  She buys 4 more. ...") with exact integer answers, rendered answer-first or
  steps-first by `word_problem_conversation`; `word_problem_splits` gives
  train and test sets that share no question.
- `gsm8k(path, split)`: grade-school math with the calculator annotations
  stripped, and the gold answers.
- `jsonl(path)`: `{"messages": [...]}` lines, every line validated.
- `mix(...)`: deterministic weighted mixture of sources.
- `final_number(text)`: the answer number of a model output, for exact match.

Bad input raises `ConversationError`, one line naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from research import chat
from research import tokenizer as tokenizer_lib

CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

Message = dict[str, Any]
Conversation = list[Message]


class ConversationError(ValueError):
  """Conversation data that cannot be read; the message is one line naming the file."""


def _one_line(text: str, limit: int = 200) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------
# chatterbot-corpus.


def chatterbot(path: str | pathlib.Path | None = None) -> list[Conversation]:
  """The chatterbot-corpus English dialogues, user and assistant alternating.

  Each YAML file's `conversations:` entries are lists of strings, the first a
  user turn. An entry is cut before its first item that is not a non-empty
  string (YAML reads "yes" as a bool), and a trailing user turn with no answer
  is dropped; entries left without an assistant turn are skipped.

  Args:
    path: folder of .yml files (default: the installed package's data/english).
  """
  if path is None:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
      raise ConversationError(
          f"chatterbot needs the chatterbot-corpus package: {CHATTERBOT_INSTALL}")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "english"
  import yaml  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  files = sorted(path.glob("*.yml"))
  if not files:
    raise ConversationError(f"{path}: no .yml files")
  conversations = []
  for f in files:
    try:
      doc = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
      raise ConversationError(f"{f}: cannot read ({_one_line(e)})") from None
    entries = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
      raise ConversationError(f"{f}: no 'conversations:' list")
    for entry in entries:
      if not isinstance(entry, list):
        continue
      turns = []
      for item in entry:
        if not isinstance(item, str) or not item.strip():
          break
        turns.append(item)
      turns = turns[:len(turns) // 2 * 2]  # end on an answer
      if turns:
        conversations.append([
            {"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns)
        ])
  return conversations


# ----------------------------------------------------------------------------
# Synthetic word problems.

# (name, subject pronoun, object pronoun)
_NAMES = (("Ana", "she", "her"), ("Ben", "he", "him"), ("Carla", "she", "her"),
          ("David", "he", "him"), ("Emma", "she", "her"), ("Farid", "he", "him"),
          ("Grace", "she", "her"), ("Hiro", "he", "him"), ("Ines", "she", "her"),
          ("Jamal", "he", "him"), ("Kofi", "he", "him"), ("Lena", "she", "her"),
          ("Mei", "she", "her"), ("Noah", "he", "him"), ("Olga", "she", "her"),
          ("Priya", "she", "her"), ("Omar", "he", "him"), ("Sofia", "she", "her"))
# (objects, container, containers, edible)
_OBJECTS = (("apples", "bag", "bags", True), ("oranges", "box", "boxes", True),
            ("pears", "basket", "baskets", True), ("cookies", "jar", "jars", True),
            ("grapes", "bowl", "bowls", True), ("plums", "bag", "bags", True),
            ("marbles", "jar", "jars", False), ("stickers", "pack", "packs", False),
            ("pencils", "box", "boxes", False), ("cards", "pack", "packs", False),
            ("shells", "bucket", "buckets", False), ("stamps", "album", "albums", False),
            ("coins", "purse", "purses", False), ("balloons", "bunch", "bunches", False),
            ("books", "stack", "stacks", False))
_MAX_TOTAL = 100
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
        "/": lambda a, b: a // b}


@dataclasses.dataclass(frozen=True)
class Problem:
  """A synthetic word problem: `steps` are "a op b = c" lines, k of them."""

  question: str
  steps: tuple[str, ...]
  answer: int
  k: int


def _step(a: int, op: str, b: int) -> tuple[str, int]:
  c = _OPS[op](a, b)
  return f"{a} {op} {b} = {c}", c


def _problem(rng: np.random.Generator, k: int) -> Problem:
  """One k-step problem: k calculation lines, one per arithmetic step."""
  name, she, her = _NAMES[rng.integers(len(_NAMES))]
  other = _NAMES[rng.integers(len(_NAMES))][0]
  while other == name:
    other = _NAMES[rng.integers(len(_NAMES))][0]
  obj, box, boxes, edible = _OBJECTS[rng.integers(len(_OBJECTS))]
  She = she.capitalize()
  sentences, steps = [], []
  if k >= 2 and rng.random() < 0.3:  # start with groups: one multiplication
    g, s = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    sentences.append(f"{name} has {g} {boxes} with {s} {obj} in each.")
    line, x = _step(g, "*", s)
    steps.append(line)
  else:
    x = int(rng.integers(2, 21))  # plural objects: at least 2
    sentences.append(f"{name} has {x} {obj}.")
  while len(steps) < k:
    left = k - len(steps)
    choices = ["add", "add"] if x < _MAX_TOTAL else []
    if x >= 1:
      choices += ["remove", "remove"]
    if 1 <= x <= 20:
      choices.append("times")
    if any(x % d == 0 and x >= d for d in (2, 3, 4, 5)):
      choices.append("split")
    if left >= 2 and x + 4 <= _MAX_TOTAL:
      choices.append("add_groups")
    kind = choices[rng.integers(len(choices))]
    if kind == "add":
      b = int(rng.integers(1, min(20, _MAX_TOTAL - x) + 1))
      text = [f"{She} buys {b} more.", f"{She} finds {b} more.",
              f"{other} gives {her} {b} more.", f"{She} picks up {b} more."][rng.integers(4)]
      line, x = _step(x, "+", b)
    elif kind == "remove":
      b = int(rng.integers(1, min(20, x) + 1))
      verbs = [f"gives {b} to {other}", f"loses {b}", f"sells {b}"]
      if edible:
        verbs.append(f"eats {b}")
      text = f"{She} {verbs[rng.integers(len(verbs))]}."
      line, x = _step(x, "-", b)
    elif kind == "times":
      m = int(rng.integers(2, 4))
      text = f"Then {she} ends up with {m} times as many {obj} as before."
      line, x = _step(x, "*", m)
    elif kind == "split":
      d = int(rng.choice([d for d in (2, 3, 4, 5) if x % d == 0 and x >= d]))
      text = f"{She} splits them evenly into {d} {boxes} and keeps 1 {box}."
      line, x = _step(x, "/", d)
    else:  # add_groups: two lines
      g, s = int(rng.integers(2, 5)), int(rng.integers(2, 6))
      if x + g * s > _MAX_TOTAL:
        continue
      text = f"{She} buys {g} {boxes} with {s} {obj} in each."
      line, p = _step(g, "*", s)
      steps.append(line)
      line, x = _step(x, "+", p)
    sentences.append(text)
    steps.append(line)
  sentences.append(f"How many {obj} does {name} have now?")
  return Problem(" ".join(sentences), tuple(steps), x, k)


def _steps_range(steps: int | tuple[int, int]) -> tuple[int, int]:
  lo, hi = (steps, steps) if isinstance(steps, int) else steps
  if not 1 <= lo <= hi:
    raise ValueError(f"steps must be k >= 1 or (lo, hi) with 1 <= lo <= hi, got {steps}")
  return lo, hi


def word_problems(
    n: int,
    steps: int | tuple[int, int] = (1, 4),
    seed: int = 0,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[Problem]:
  """`n` distinct seeded word problems, k uniform in `steps` (inclusive).

  Numbers stay small (operands 1-20, running totals 0-100), every division is
  exact and no total goes negative. Questions in `exclude` are skipped.
  """
  lo, hi = _steps_range(steps)
  rng = np.random.default_rng(seed)
  seen = set(exclude)
  out = []
  attempts = 0
  while len(out) < n:
    attempts += 1
    if attempts > 100 * n + 10_000:
      raise ValueError(f"word_problems: only {len(out)} distinct problems of {n} "
                       f"with steps={steps}")
    p = _problem(rng, int(rng.integers(lo, hi + 1)))
    if p.question not in seen:
      seen.add(p.question)
      out.append(p)
  return out


def word_problem_splits(
    n_train: int, n_test: int, steps: int | tuple[int, int] = (1, 4), seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
  """(train, test) with no question in common; test does not depend on n_train."""
  test = word_problems(n_test, steps, seed=hash_seed(seed, "test"))
  train = word_problems(n_train, steps, seed=hash_seed(seed, "train"),
                        exclude={p.question for p in test})
  return train, test


def word_problem_conversation(
    problem: Problem, format: str = "steps_first"  # pylint: disable=redefined-builtin
) -> Conversation:
  """[user: question, assistant: answer] in one of two formats.

  'answer_first': "The answer is 5. Because 3 + 4 = 7 and 7 - 2 = 5."
  'steps_first': one calculation per line, then "The answer is 5".
  """
  if format == "answer_first":
    steps = list(problem.steps)
    because = steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    answer = f"The answer is {problem.answer}. Because {because}."
  elif format == "steps_first":
    answer = "\n".join(problem.steps) + f"\nThe answer is {problem.answer}"
  else:
    raise ValueError(f"format {format!r}: expected 'answer_first' or 'steps_first'")
  return [{"role": "user", "content": problem.question},
          {"role": "assistant", "content": answer}]


_STEP_RE = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


def answer_of_steps(text: str) -> int:
  """Checks "a op b = c" calculations in `text` and returns the last result.

  Every calculation must be right (division exact), and each one after the
  first must use the previous result as an operand, except that a product may
  feed the next line (a "3 bags of 4" group). Raises ValueError otherwise.
  """
  found = _STEP_RE.findall(text)
  if not found:
    raise ValueError(f"no calculation in {text!r}")
  prev = None
  pending = None  # a product not yet used
  for a, op, b, c in found:
    a, b, c = int(a), int(b), int(c)
    if op == "/" and (b == 0 or a % b):
      raise ValueError(f"inexact division {a} / {b}")
    if _OPS[op](a, b) != c:
      raise ValueError(f"wrong calculation {a} {op} {b} = {c}")
    if prev is not None and prev not in (a, b) and pending is None:
      if op == "*":  # a group product, used by the next line
        pending = c
        continue
      raise ValueError(f"{a} {op} {b} does not use the previous result {prev}")
    if pending is not None:
      if {prev, pending} != {a, b}:
        raise ValueError(f"{a} {op} {b} does not combine {prev} and {pending}")
      pending = None
    prev = c
  if pending is not None:
    raise ValueError(f"product {pending} is never used")
  return prev


# ----------------------------------------------------------------------------
# GSM8K.


@dataclasses.dataclass(frozen=True)
class Example:
  """A conversation (user question, assistant solution) and its gold answer."""

  conversation: Conversation
  answer: str


_CALC_RE = re.compile(r"<<[^>]*>>")


def gsm8k(path: str | pathlib.Path | None = None, split: str = "train") -> list[Example]:
  """GSM8K problems: solution lines without `<<a*b=c>>`, then "The answer is N".

  Args:
    path: folder with train.jsonl and test.jsonl (default ../shared/data/gsm8k).
    split: 'train' or 'test'.

  Returns:
    Examples whose answer is the number after "#### ", normalised as
    `final_number` does (no thousands commas).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split {split!r}: expected 'train' or 'test'")
  path = pathlib.Path(path or SHARED_DATA / "gsm8k") / f"{split}.jsonl"
  examples = []
  for lineno, record in _jsonl_records(path):
    if isinstance(record, ConversationError):
      raise record
    if (not isinstance(record, dict) or not isinstance(record.get("question"), str)
        or not isinstance(record.get("answer"), str) or "#### " not in record["answer"]):
      raise ConversationError(f"{path}:{lineno}: expected {{'question', 'answer'}} with '#### N'")
    solution, _, gold = record["answer"].rpartition("#### ")
    gold = normalize_number(gold.strip())
    lines = [line.rstrip() for line in _CALC_RE.sub("", solution).strip().split("\n")]
    text = "\n".join(line for line in lines if line) + f"\nThe answer is {gold}"
    examples.append(Example(
        [{"role": "user", "content": record["question"].strip()},
         {"role": "assistant", "content": text.lstrip("\n")}], gold))
  return examples


# ----------------------------------------------------------------------------
# JSONL conversations.


def _jsonl_records(path: pathlib.Path):
  """(line number, record or ConversationError) per non-blank line."""
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ConversationError(f"{path}: cannot read ({e.strerror})") from None
  for lineno, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      yield lineno, ConversationError(f"{path}:{lineno}: not UTF-8 at byte {e.start}")
    except json.JSONDecodeError as e:
      yield lineno, ConversationError(
          f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
    else:  # the text policy of research/tokenizer.py: invalid Unicode is an error
      problem = tokenizer_lib.text_problem(record)
      yield lineno, ConversationError(f"{path}:{lineno}: {problem}") if problem else record


def check_conversation(record: Any) -> Conversation:
  """The messages of a `{"messages": [...]}` record, or ValueError saying what is wrong."""
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  if "messages" not in record:
    raise ValueError(f"no field 'messages' (fields: {', '.join(map(str, record)) or 'none'})")
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    raise ValueError("'messages' must be a non-empty list")
  for i, m in enumerate(messages):
    if isinstance(m, dict) and m.get("role") in chat.ROLES:
      content = m.get("content")
      if isinstance(content, str) and not content.strip() and not m.get("tool_calls"):
        raise ValueError(f"message {i} ({m['role']}): empty content")
    chat.check_message(i, m)
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError("no assistant turn")
  return [dict(m) for m in messages]


def jsonl(
    path: str | pathlib.Path, on_error: str = "raise"
) -> tuple[list[Conversation], list[str]]:
  """Conversations of a JSONL file of `{"messages": [...]}` lines (blank lines skipped).

  Every line is checked (valid UTF-8 JSON object, a non-empty `messages` list,
  known roles, string non-empty content, well-formed tool calls, no other keys,
  at least one assistant turn).

  Args:
    path: the file.
    on_error: 'raise': the first bad line raises ConversationError
      "path:LINE: what is wrong"; 'skip': bad lines are skipped and described.

  Returns:
    (conversations, problems): problems holds one "path:LINE: ..." string per
    skipped line (always empty with 'raise').
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error {on_error!r}: expected 'raise' or 'skip'")
  path = pathlib.Path(path)
  conversations, problems = [], []
  for lineno, record in _jsonl_records(path):
    error = record if isinstance(record, ConversationError) else None
    if error is None:
      try:
        conversations.append(check_conversation(record))
      except ValueError as e:
        error = ConversationError(f"{path}:{lineno}: {_one_line(e)}")
    if error is not None:
      if on_error == "raise":
        raise error
      problems.append(str(error))
  return conversations, problems


# ----------------------------------------------------------------------------
# Mixtures.


def hash_seed(seed: int, name: str) -> int:
  """A 63-bit seed derived from (seed, name), stable across runs and platforms."""
  digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def mix(
    sources: Mapping[str, Sequence[Conversation]],
    weights: Mapping[str, float],
    n: int,
    seed: int = 0,
) -> list[tuple[str, Conversation]]:
  """`n` (source name, conversation) pairs drawn in proportion to `weights`.

  Each source gets its share of `n` exactly (largest remainder), drawn without
  replacement when the source is large enough, else as whole passes over it
  plus a sample of the rest (with replacement across passes). The result is
  shuffled. Deterministic in `seed`; a source's draw does not depend on the
  other sources. Sources with weight 0 (or absent from `weights`) are unused.
  """
  unknown = set(weights) - set(sources)
  if unknown:
    raise ValueError(f"weights for unknown sources {sorted(unknown)}")
  names = [name for name in sources if weights.get(name, 0) > 0]
  if any(weights[name] < 0 for name in weights):
    raise ValueError(f"negative weight in {dict(weights)}")
  if not names:
    raise ValueError("mix: no source has a positive weight")
  for name in names:
    if not sources[name]:
      raise ValueError(f"mix: source {name!r} is empty")
  total = sum(weights[name] for name in names)
  exact = np.array([n * weights[name] / total for name in names])
  counts = np.floor(exact).astype(int)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:n - counts.sum()]] += 1
  out = []
  for name, count in zip(names, counts):
    items = sources[name]
    rng = np.random.default_rng(hash_seed(seed, name))
    passes, rest = divmod(int(count), len(items))
    index = np.concatenate([np.tile(np.arange(len(items)), passes),
                            rng.choice(len(items), rest, replace=False)]).astype(int)
    out += [(name, items[i]) for i in index]
  perm = np.random.default_rng(hash_seed(seed, "\0mix")).permutation(len(out))
  return [out[i] for i in perm]


# ----------------------------------------------------------------------------
# Answers.

_NUMBER = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_RE = re.compile(r"answer is\W{0,3}?(" + _NUMBER + ")", re.IGNORECASE)


def normalize_number(text: str) -> str:
  """A number's canonical text: "1,000" -> "1000", "7.0" -> "7", "2.50" -> "2.5"."""
  s = text.replace(",", "").strip()
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  return "0" if s == "-0" else s


def final_number(text: str) -> str | None:
  """The answer number of `text`, normalised: the last "answer is N", else the last number."""
  found = _ANSWER_RE.findall(text)
  if not found:
    found = _NUMBER_RE.findall(text)
  return normalize_number(found[-1]) if found else None
