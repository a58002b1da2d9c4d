"""SFT conversations in which the assistant calls tools: calculator word problems, GSM8K
solutions with calculator calls, and search questions over the search collection.

`calculator_conversation` turns a `conversations.Problem` (k "a op b = c" steps) into

  user       the question
  assistant  tool call {"name": "calculator", "arguments": {"expression": "a op b"}}
  tool       the calculator's own output for it ("c")
  ...        (one call and one result per step)
  assistant  the steps "a op b = c", one per line, then "The answer is N"

so a model fine-tuned on it learns to hand each step to the calculator and to read
the result back (`chat.render` masks the loss to the assistant's calls and answer; the
results are context). Results are computed by the calculator tool itself, so the data
shows exactly what the runtime will inject. Problem division is exact, and the
calculator prints an integral float without ".0" ("12 / 3" -> "4").

`gsm8k_tool_conversation` turns a GSM8K solution's `<<48/2=24>>` annotations into
calculator calls inside the assistant's answer: the text up to an annotation is an
assistant message with the call, the calculator's result is a tool message, and the
text after it (which starts by restating the result, "24 clips in May") continues in
the next assistant message. `search_questions` asks where a quoted phrase of the
collection comes from; the assistant searches for the phrase and names the source.
In every case `chat.render` puts the loss on the assistant's text and calls only: tool
results are context (loss mask False).
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from research import conversations
from research.tools import calculator as calculator_lib
from research.tools import registry
from research.tools import search as search_lib



def calculator_conversation(problem: conversations.Problem, system: str | None = None
                            ) -> conversations.Conversation:
  """[user, (assistant call, tool result) per step, assistant answer] for `problem`.

  Args:
    problem: a word problem (`conversations.word_problems`).
    system: optional system message first (e.g. "Tools:\\n" + registry.describe(tools)).

  Raises:
    ValueError: a step's line is not "a op b = c" or the calculator disagrees with it.
  """
  messages = [] if system is None else [{"role": "system", "content": system}]
  messages.append({"role": "user", "content": problem.question})
  for line in problem.steps:
    expression, _, expected = line.partition(" = ")
    result = calculator_lib.calculator(expression)
    if result != expected:
      raise ValueError(f"calculator gives {expression} = {result}, the problem says {expected}")
    messages.append({"role": "assistant", "content": "",
                     "tool_calls": [{"name": "calculator",
                                     "arguments": {"expression": expression}}]})
    messages.append({"role": "tool", "content": result})
  messages.append({"role": "assistant",
                   "content": "\n".join(problem.steps) + f"\nThe answer is {problem.answer}"})
  return messages


def calculator_system() -> str:
  """The system message that declares the calculator tool (its name, description and
  JSON schema, `registry.describe`): with it a model fine-tuned on both styles calls the
  calculator, without it the model works the steps out itself (the SFT data's
  `data.tools_in_system` and the pipeline's with/without-tools evaluation)."""
  tools = {"calculator": registry.default_tools()["calculator"]}
  return "You can call these tools:\n" + registry.describe(tools)


def with_system(conversation: conversations.Conversation, system: str | None
                ) -> conversations.Conversation:
  """`conversation` with a system message first (unchanged when `system` is None)."""
  return conversation if system is None else [{"role": "system", "content": system}
                                              ] + list(conversation)


def calculator_word_problems(n: int, steps: int | tuple[int, int] = (1, 4), seed: int = 0,
                             exclude: frozenset[str] | set[str] = frozenset(),
                             with_system: bool = False) -> list[conversations.Conversation]:
  """`n` seeded calculator conversations (`conversations.word_problems` underneath).

  with_system: start each with a system message listing the calculator tool.
  """
  system = calculator_system() if with_system else None
  return [calculator_conversation(p, system)
          for p in conversations.word_problems(n, steps, seed, exclude)]


_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")


def gsm8k_tool_conversation(question: str, answer: str) -> tuple[conversations.Conversation,
                                                                   str, int]:
  """A GSM8K record's (question, answer) -> (conversation with calculator calls, gold, calls).

  Each `<<expression=result>>` whose expression the calculator computes to `result`
  (to 1e-6 relative) becomes a call and its result; one it refuses or disagrees with is
  dropped from the text as plain `conversations.gsm8k` does. Blank lines and trailing
  spaces are removed; the last assistant message ends with "The answer is N".

  Returns:
    (messages, gold answer normalised as `conversations.normalize_number`, calls made).

  Raises:
    ValueError: `answer` has no "#### N" line.
  """
  if "#### " not in answer:
    raise ValueError("a GSM8K answer ends with '#### N'")
  solution, _, gold = answer.rpartition("#### ")
  gold = conversations.normalize_number(gold.strip())
  lines = [line.rstrip() for line in solution.strip().split("\n")]
  text = "\n".join(line for line in lines if line) + f"\nThe answer is {gold}"
  messages = [{"role": "user", "content": question.strip()}]
  pending, start, calls = "", 0, 0  # assistant text not yet in a message
  for m in _ANNOTATION_RE.finditer(text):
    pending += text[start:m.start()]
    start = m.end()
    expression, _, claimed = m.group(1).rpartition("=")
    try:
      result = calculator_lib.calculator(expression)
      agrees = abs(float(result) - float(claimed)) <= 1e-6 * max(1.0, abs(float(claimed)))
    except (calculator_lib.CalculatorError, ValueError):
      continue  # dropped, as conversations.gsm8k drops every annotation
    if not agrees:
      continue
    messages.append({"role": "assistant", "content": pending,
                     "tool_calls": [{"name": "calculator",
                                     "arguments": {"expression": expression}}]})
    messages.append({"role": "tool", "content": result})
    pending, calls = "", calls + 1
  messages.append({"role": "assistant", "content": pending + text[start:]})
  return messages, gold, calls


def gsm8k_tool_examples(path: str | pathlib.Path, split: str = "train"
                        ) -> list[conversations.Example]:
  """GSM8K records of `path/split.jsonl` as `gsm8k_tool_conversation` examples.

  Raises:
    conversations.ConversationError: unreadable file or a malformed line (file:line named).
  """
  path = pathlib.Path(path) / f"{split}.jsonl"
  out = []
  for lineno, record in conversations._jsonl_records(path):  # pylint: disable=protected-access
    if isinstance(record, conversations.ConversationError):
      raise record
    if (not isinstance(record, dict) or not isinstance(record.get("question"), str)
        or not isinstance(record.get("answer"), str) or "#### " not in record["answer"]):
      raise conversations.ConversationError(
          f"{path}:{lineno}: expected {{'question', 'answer'}} with '#### N'")
    messages, gold, _ = gsm8k_tool_conversation(record["question"], record["answer"])
    out.append(conversations.Example(messages, gold))
  return out


_QUOTE_WORDS = 6


def search_questions(index: search_lib.SearchIndex, n: int, seed: int = 0,
                     search=None) -> list[conversations.Conversation]:
  """`n` seeded "where does this quote come from" conversations over `index`.

    user       Which document says "six words from a passage"?
    assistant  call {"name": "search", "arguments": {"query": <the quote>, "k": 1}}
    tool       what `search` returns for it ("[1] Lincoln, 1862: ...")
    assistant  "It is from Lincoln, 1862."

  Only quotes whose top hit is their own passage's title are kept (the data never
  shows a search that misleads), so the answer is checkable from the result.

  Args:
    index: the search collection.
    n: conversations wanted.
    seed: draws passages and quote positions.
    search: the search tool function (default `search_lib.make_search(index)`, what
      `registry.default_tools` runs), so results are exactly what the runtime injects.

  Raises:
    ValueError: fewer than `n` usable quotes after 20·n draws.
  """
  search = search or search_lib.make_search(index)
  rng = np.random.default_rng(seed)
  out, seen = [], set()
  for _ in range(20 * n):
    if len(out) == n:
      break
    i = int(rng.integers(len(index)))
    ws = index.passages[i].split()
    if len(ws) < _QUOTE_WORDS + 2:
      continue
    j = int(rng.integers(len(ws) - _QUOTE_WORDS))
    quote = " ".join(w.strip("\"'") for w in ws[j:j + _QUOTE_WORDS])
    if quote in seen or not search_lib.words(quote) or len(quote) > search_lib.MAX_QUERY_CHARS:
      continue
    hits = index.search(quote, 1)
    if not hits or hits[0].title != index.titles[i]:
      continue
    seen.add(quote)
    out.append([
        {"role": "user", "content": f'Which document says "{quote}"?'},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "search", "arguments": {"query": quote, "k": 1}}]},
        {"role": "tool", "content": search(quote, k=1)},
        {"role": "assistant", "content": f"It is from {index.titles[i]}."}])
  if len(out) < n:
    raise ValueError(f"search_questions: only {len(out)} of {n} usable quotes")
  return out
