"""SFT conversations in which the assistant calls the calculator, from word problems.

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
"""

from __future__ import annotations

from research import conversations
from research.tools import calculator as calculator_lib
from research.tools import registry



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


def calculator_word_problems(n: int, steps: int | tuple[int, int] = (1, 4), seed: int = 0,
                             exclude: frozenset[str] | set[str] = frozenset(),
                             with_system: bool = False) -> list[conversations.Conversation]:
  """`n` seeded calculator conversations (`conversations.word_problems` underneath).

  with_system: start each with a system message listing the calculator tool.
  """
  system = None
  if with_system:
    tools = {"calculator": registry.default_tools()["calculator"]}
    system = "You can call these tools:\n" + registry.describe(tools)
  return [calculator_conversation(p, system)
          for p in conversations.word_problems(n, steps, seed, exclude)]
