"""Tool-use evaluation for the SFT stage: accuracy with tools, call validity, tool errors.

  with_tools_accuracy  greedy replies decoded by `runtime.generate_with_tools` (the tools
                       really run), exact match of the final number, and every call made
  call_metrics         of a list of `registry.CallResult`s: how many calls were valid
                       (parsed, named a real tool, arguments passed its schema) and how
                       many valid calls the tool itself failed, per 100 calls
  evaluate_tools       both, on the synthetic word problems (by number of steps k) and
                       on GSM8K test
  report_lines         the report.md section, side by side with the no-tools accuracy

"Without tools" is the stage's usual evaluation (`sampling.complete`: a call the model
writes is never answered); "with tools" decodes the same prompts with the tools live.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np

from research import chat
from research import conversations as conv_lib
from research import evaluation
from research import sampling
from research.tools import registry
from research.tools import runtime
from research.tools import schema as schema_lib

# Results the runtime writes itself for a call it does not run (cap, no opening tag).
_RUNTIME_REFUSALS = ("error: tool-call limit reached", "error: <|/tool_call|> without")


def call_status(call: registry.CallResult, tools: Mapping[str, registry.Tool]) -> str:
  """'ok', 'tool_error' (valid call, the tool failed), 'invalid' or 'capped'.

  invalid: the JSON did not parse into {"name", "arguments"}, the name is not a tool,
  the arguments fail the tool's schema, or `<|/tool_call|>` came without an opening.
  capped: a well-formed call refused because the row reached `max_calls`.
  """
  if call.name is None:
    return "capped" if call.result.startswith(_RUNTIME_REFUSALS[0]) else "invalid"
  if call.name not in tools or call.arguments is None:
    return "invalid"
  try:
    schema_lib.validate(call.arguments, tools[call.name].schema)
  except schema_lib.SchemaError:
    return "invalid"
  return "ok" if call.ok else "tool_error"


def call_metrics(calls: Sequence[registry.CallResult],
                 tools: Mapping[str, registry.Tool]) -> dict:
  """Counts and rates over `calls` (capped calls excluded from both rates).

  Returns:
    dict(calls, valid, invalid, tool_errors, capped, validity_rate (valid / (valid +
    invalid), NaN with none), validity_interval (95 % Wilson), tool_errors_per_100
    (valid calls the tool failed, per 100 calls of any kind; NaN with none),
    by_tool {name: valid calls}).
  """
  status = [call_status(c, tools) for c in calls]
  counts = collections.Counter(status)
  valid = counts["ok"] + counts["tool_error"]
  judged = valid + counts["invalid"]
  by_tool = collections.Counter(c.name for c, s in zip(calls, status) if s in ("ok", "tool_error"))
  return dict(calls=len(calls), valid=valid, invalid=counts["invalid"],
              tool_errors=counts["tool_error"], capped=counts["capped"],
              validity_rate=valid / judged if judged else float("nan"),
              validity_interval=evaluation.wilson_interval(valid, judged),
              tool_errors_per_100=(100.0 * counts["tool_error"] / len(calls) if calls
                                   else float("nan")),
              by_tool=dict(sorted(by_tool.items())))


def final_answer_text(tokenizer, tokens: Sequence[int], sampled: np.ndarray) -> str:
  """The text the model wrote after its last tool result (or all of it without one).

  The answer is read from the model's own tokens after the last injected block, so a
  number inside a tool result never counts as the model's answer.
  """
  injected = np.flatnonzero(~np.asarray(sampled, bool))
  start = int(injected[-1]) + 1 if len(injected) else 0
  eot = chat.EOT
  return tokenizer.decode([t for t in tokens[start:] if t != eot])


def number_matches(text: str, gold: str) -> bool:
  """The answer's `final_number` is `gold` (exact match of the normalised number)."""
  return conv_lib.final_number(text) == str(gold)


def source_named(text: str, gold: str) -> bool:
  """The answer names the source `gold` ("Lincoln, 1862") verbatim."""
  return str(gold) in text


def with_tools_accuracy(params, cfg, tokenizer, items, tools: Mapping[str, registry.Tool], *,
                        max_new_tokens: int, batch_size: int, max_calls: int = 6,
                        score=number_matches
                        ) -> tuple[list[bool], list[list[registry.CallResult]]]:
  """Greedy replies with live tools to (question conversation, gold answer) items.

  Args:
    items: (messages ending with the user's question, gold answer string) pairs.
    tools: name -> Tool, as at chat time.
    max_new_tokens: sampled tokens per reply (injected results not counted).
    batch_size: rows decoded together.
    max_calls: calls per reply.
    score: score(answer text after the last tool result, gold) -> bool.

  Returns:
    (score per item, the calls of each item).
  """
  prompts = [chat.render(tokenizer, conv, add_generation_prompt=True).ids.tolist()
             for conv, _ in items]
  correct, calls = [], []
  for lo in range(0, len(prompts), batch_size):
    out = runtime.generate_with_tools(params, cfg, tokenizer, prompts[lo:lo + batch_size],
                                      tools, max_new_tokens=max_new_tokens,
                                      max_calls=max_calls)
    for r, (_, gold) in enumerate(items[lo:lo + batch_size]):
      text = final_answer_text(tokenizer, out.tokens[r], out.sampled[r])
      correct.append(bool(score(text, gold)))
      calls.append(out.calls[r])
  return correct, calls


def _summary(correct: Sequence[bool]) -> dict:
  return evaluation.accuracy_summary(correct)  # accuracy None on 0 items


def evaluate_tools(params, cfg, tokenizer, problems: dict, tools: Mapping[str, registry.Tool],
                   *, max_new_tokens: int, batch_size: int) -> dict:
  """With-tools accuracy and call metrics on the stage's evaluation problems.

  Args:
    problems: as `experiments/sft.load_sources` returns: 'word_problems' (a list of
      `conversations.Problem`), 'gsm8k' (a list of `conversations.Example`), 'search'
      (held-out `data.search_questions` conversations; the answer must name the source).

  Returns:
    dict(word_problems_by_k={k: accuracy summary}, gsm8k=summary, search=summary with
    `without` (plain decoding) inside, calls=call_metrics of every call,
    calls_per_problem=mean calls per reply), keys present as data allows.
  """
  out, every = {}, []
  n_replies = 0
  if problems.get("word_problems"):
    test = problems["word_problems"]
    items = [([{"role": "user", "content": p.question}], p.answer) for p in test]
    correct, calls = with_tools_accuracy(params, cfg, tokenizer, items, tools,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    by_k = collections.defaultdict(list)
    calls_k = collections.defaultdict(list)
    for p, c, cs in zip(test, correct, calls):
      by_k[p.k].append(c)
      calls_k[p.k].append(len(cs))
    out["word_problems_by_k"] = {int(k): dict(_summary(v), calls_per_problem=float(
        np.mean(calls_k[k]))) for k, v in sorted(by_k.items())}
    every += [c for cs in calls for c in cs]
    n_replies += len(items)
  if problems.get("gsm8k"):
    items = [(e.conversation[:1], e.answer) for e in problems["gsm8k"]]
    correct, calls = with_tools_accuracy(params, cfg, tokenizer, items, tools,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    out["gsm8k"] = dict(_summary(correct), calls_per_problem=float(np.mean(
        [len(cs) for cs in calls])))
    every += [c for cs in calls for c in cs]
    n_replies += len(items)
  if problems.get("search"):  # held-out search conversations: the source is the gold
    items = [(conv[:1], conv[-1]["content"][len("It is from "):-1])  # "It is from T."
             for conv in problems["search"]]
    correct, calls = with_tools_accuracy(params, cfg, tokenizer, items, tools,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         score=source_named)
    prompts = [chat.render(tokenizer, c, add_generation_prompt=True).ids for c, _ in items]
    replies = sampling.complete(params, cfg, prompts, max_new_tokens=max_new_tokens,
                                eos_id=chat.EOT, batch_size=batch_size)
    plain = [source_named(tokenizer.decode(r), gold) for r, (_, gold) in zip(replies, items)]
    out["search"] = dict(_summary(correct), without=_summary(plain), calls_per_problem=float(
        np.mean([len(cs) for cs in calls])))
    every += [c for cs in calls for c in cs]
    n_replies += len(items)
  out["calls"] = call_metrics(every, tools)
  out["calls_per_problem"] = len(every) / n_replies if n_replies else float("nan")
  out["example_calls"] = [dict(name=c.name, arguments=c.arguments, result=c.result[:120])
                          for c in every[:5]]
  return out


def _cell(r: dict | None) -> str:
  if not r or r["accuracy"] is None:
    return "–"
  lo, hi = r["interval"]
  return f'{r["accuracy"]:.2f} [{lo:.2f}, {hi:.2f}] ({r["correct"]}/{r["total"]})'


def report_lines(without: dict, with_tools: dict) -> list[str]:
  """Markdown lines: accuracy without / with tools by k and on GSM8K, call metrics.

  Args:
    without: the stage's eval dict (`word_problems_by_k`, `gsm8k`, as `experiments/sft`
      writes them).
    with_tools: `evaluate_tools`' dict.
  """
  lines = ['', '## Tool use: accuracy without and with tools (greedy)', '',
           'Exact match of the final number; 95 % Wilson intervals. "Without": plain '
           'decoding (a call the model writes is never answered). "With": the calculator, '
           'search and python tools run live and their results are injected '
           '(research/tools/runtime.py).', '',
           '| problems | without tools | with tools | calls per problem |', '|---|---|---|---|']
  for k, r in with_tools.get('word_problems_by_k', {}).items():
    base = without.get('word_problems_by_k', {}).get(k) or without.get(
        'word_problems_by_k', {}).get(str(k))
    lines.append(f'| synthetic, k = {k} | {_cell(base)} | {_cell(r)} | '
                 f'{r["calls_per_problem"]:.2f} |')
  if 'gsm8k' in with_tools:
    g = with_tools['gsm8k']
    lines.append(f'| GSM8K test (first {g["total"]}) | {_cell(without.get("gsm8k"))} | '
                 f'{_cell(g)} | {g["calls_per_problem"]:.2f} |')
  if 'search' in with_tools:
    s = with_tools['search']
    lines.append(f'| search questions (source named; held out, {s["total"]}) | '
                 f'{_cell(s["without"])} | {_cell(s)} | {s["calls_per_problem"]:.2f} |')
  m = with_tools['calls']
  lo, hi = m['validity_interval']
  lines += ['', f'Calls: {m["calls"]} in all ({with_tools["calls_per_problem"]:.2f} per '
            f'problem); valid (parses, names a real tool, arguments pass its schema): '
            f'{m["valid"]}/{m["valid"] + m["invalid"]} = {m["validity_rate"]:.2f} '
            f'[{lo:.2f}, {hi:.2f}]; tool errors (a valid call the tool failed): '
            f'{m["tool_errors_per_100"]:.1f} per 100 calls; refused over the per-reply cap: '
            f'{m["capped"]}; valid calls by tool: '
            f'{m["by_tool"] or "none"}.']
  for c in with_tools.get('example_calls', [])[:3]:
    result = " ".join(str(c["result"]).split())[:80].replace("`", "'")
    lines.append(f'- `{c["name"]}({c["arguments"]})` -> `{result}`')
  return lines
