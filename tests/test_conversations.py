"""Tests for research/conversations.py: sources, validation, mixing, answer extraction."""
import collections
import importlib.util
import json
import pathlib
import re

import pytest

from research import conversations as conv

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

# ----------------------------------------------------------------------------
# Word problems.


def solve_question(question):
  """Reads a generated question sentence by sentence, independently of its steps."""
  sentences = re.findall(r"[^.?]+[.?]", question)
  first, *events, last = [s.strip() for s in sentences]
  assert last.startswith("How many ") and last.endswith(" have now?")
  m = re.fullmatch(r"\w+ has (\d+) \w+ with (\d+) \w+ in each\.", first)
  x = int(m[1]) * int(m[2]) if m else int(re.fullmatch(r"\w+ has (\d+) \w+\.", first)[1])
  for s in events:
    if m := re.fullmatch(r"\w+ buys (\d+) \w+ with (\d+) \w+ in each\.", s):
      x += int(m[1]) * int(m[2])
    elif m := re.fullmatch(r"(?:\w+ (?:buys|finds|picks up)|\w+ gives \w+) (\d+) more\.", s):
      x += int(m[1])
    elif m := re.fullmatch(r"\w+ (?:gives (\d+) to \w+|loses (\d+)|sells (\d+)|eats (\d+))\.", s):
      x -= int(next(g for g in m.groups() if g))
    elif m := re.fullmatch(r"Then \w+ ends up with (\d+) times as many \w+ as before\.", s):
      x *= int(m[1])
    elif m := re.fullmatch(r"\w+ splits them evenly into (\d+) \w+ and keeps 1 \w+\.", s):
      assert x % int(m[1]) == 0
      x //= int(m[1])
    else:
      raise AssertionError(f"unknown sentence {s!r}")
    assert x >= 0
  return x


def test_word_problem_answers_recomputed_independently():
  problems = conv.word_problems(400, steps=(1, 4), seed=3)
  assert len({p.question for p in problems}) == 400
  assert collections.Counter(p.k for p in problems).keys() == {1, 2, 3, 4}
  for p in problems:
    assert solve_question(p.question) == p.answer, p
    assert len(p.steps) == p.k
    assert conv.answer_of_steps("\n".join(p.steps)) == p.answer, p
    assert 0 <= p.answer <= 100
    assert all(1 <= int(n) <= 20 for n in re.findall(r"\d+", p.question))
  assert len({p.question.split()[0] for p in problems}) > 10  # varied names
  assert len({p.question.split("?")[0].split()[-5] for p in problems}) > 10  # and objects


def test_answer_of_steps_rejects_wrong_chains():
  assert conv.answer_of_steps("3 + 4 = 7\n7 - 2 = 5") == 5
  assert conv.answer_of_steps("2 * 3 = 6\n4 * 5 = 20\n6 + 20 = 26") == 26
  for bad in ("3 + 4 = 8", "3 + 4 = 7\n6 - 2 = 4", "7 / 2 = 3", "2 * 3 = 6\n4 * 5 = 20",
              "no steps here"):
    with pytest.raises(ValueError):
      conv.answer_of_steps(bad)


def test_word_problem_formats():
  for p in conv.word_problems(50, steps=(1, 3), seed=1):
    user, first = conv.word_problem_conversation(p, "answer_first")
    assert user == {"role": "user", "content": p.question}
    assert first["role"] == "assistant"
    assert first["content"].startswith(f"The answer is {p.answer}. Because ")
    assert conv.answer_of_steps(first["content"]) == p.answer
    _, steps = conv.word_problem_conversation(p, "steps_first")
    *lines, last = steps["content"].split("\n")
    assert last == f"The answer is {p.answer}" and tuple(lines) == p.steps
    assert (conv.final_number(first["content"]) == conv.final_number(steps["content"])
            == str(p.answer))
  with pytest.raises(ValueError):
    conv.word_problem_conversation(p, "essay")


def test_word_problem_splits_share_no_problem():
  train, test = conv.word_problem_splits(3000, 300, steps=(1, 2), seed=0)
  assert len(train) == 3000 and len(test) == 300
  assert not {p.question for p in train} & {p.question for p in test}
  assert len({p.question for p in train}) == 3000
  # The test set does not depend on the train size; the seed matters.
  assert conv.word_problem_splits(10, 300, steps=(1, 2), seed=0)[1] == test
  assert conv.word_problem_splits(10, 300, steps=(1, 2), seed=1)[1] != test
  assert conv.word_problems(20, seed=5) == conv.word_problems(20, seed=5)


# ----------------------------------------------------------------------------
# JSONL.

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def msgs(*roles_contents):
  return {"messages": [{"role": r, "content": c} for r, c in roles_contents]}


@pytest.mark.parametrize("line, what", [
    ('{"messages": [', "malformed JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"text": "hi"}', "no field 'messages'"),
    ('{"messages": []}', "non-empty list"),
    (json.dumps(msgs(("bot", "hi"), ("assistant", "x"))), "unknown role 'bot'"),
    (json.dumps(msgs(("user", "hi"), ("assistant", "  "))), "message 1 (assistant): empty content"),
    (json.dumps(msgs(("user", "hi"), ("user", "again"))), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": 5}, GOOD["messages"][1]]}),
     "message 0: content is int, not a string"),
    (json.dumps({"messages": [{"role": "user"}, GOOD["messages"][1]]}),
     "content is NoneType"),
    (json.dumps({"messages": ["hi", GOOD["messages"][1]]}), "message 0: expected a dict"),
    (json.dumps({"messages": [GOOD["messages"][0], {"role": "assistant", "content": "x",
                                                   "tool_calls": [{"name": "f"}]}]}),
     "tool call"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, what):
  path = tmp_path / "chats.jsonl"
  path.write_text("\n".join([json.dumps(GOOD), "", line, json.dumps(GOOD)]) + "\n")
  with pytest.raises(conv.ConversationError) as e:
    conv.jsonl(path)
  message = str(e.value)
  assert message.startswith(f"{path}:3: ") and what in message, message
  assert "\n" not in message
  good, problems = conv.jsonl(path, on_error="skip")
  assert good == [GOOD["messages"]] * 2
  assert problems == [message]


def test_jsonl_skip_mode_and_bad_bytes(tmp_path):
  path = tmp_path / "mixed.jsonl"
  tool_chat = {"messages": [
      {"role": "user", "content": "2+3?"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"name": "calc", "arguments": {"e": "2+3"}}]},
      {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]}
  path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), b"\xff\xfe", b"{oops",
                               json.dumps(tool_chat).encode(), b'{"messages": 3}']))
  good, problems = conv.jsonl(path, on_error="skip")
  assert good == [GOOD["messages"], tool_chat["messages"]]
  assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
  assert "not UTF-8" in problems[0]
  with pytest.raises(conv.ConversationError, match=r":2: not UTF-8"):
    conv.jsonl(path)
  with pytest.raises(conv.ConversationError, match="cannot read"):
    conv.jsonl(tmp_path / "absent.jsonl")
  with pytest.raises(ValueError, match="on_error"):
    conv.jsonl(path, on_error="ignore")


# ----------------------------------------------------------------------------
# chatterbot, GSM8K.


def check_alternating(c):
  assert len(c) >= 2 and len(c) % 2 == 0
  assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2)
  assert all(isinstance(m["content"], str) and m["content"].strip() for m in c)


def test_chatterbot():
  if importlib.util.find_spec("chatterbot_corpus") is None:
    pytest.skip("chatterbot-corpus is not installed")
  convs = conv.chatterbot()
  assert len(convs) > 2000
  for c in convs:
    check_alternating(c)
  assert sum(len(c) > 2 for c in convs) > 20  # multi-turn dialogues


def test_chatterbot_cuts_at_non_strings(tmp_path, monkeypatch):
  (tmp_path / "a.yml").write_text(
      "conversations:\n"
      "- - Hello\n  - Hi\n  - How are you?\n"  # trailing question dropped
      "- - Is it on?\n  - Sure\n  - ok\n  - 12\n  - later\n"  # cut before 12
      "- - Ready?\n  - yes\n  - ok\n"  # YAML reads yes as a bool: nothing left
      "- - lonely\n"
      "- not a list\n")
  user = lambda t: {"role": "user", "content": t}
  bot = lambda t: {"role": "assistant", "content": t}
  assert conv.chatterbot(tmp_path) == [[user("Hello"), bot("Hi")],
                                       [user("Is it on?"), bot("Sure")]]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(conv.ConversationError,
                     match="pip install --no-deps chatterbot-corpus==1.3.3"):
    conv.chatterbot()
  with pytest.raises(conv.ConversationError, match="no .yml files"):
    conv.chatterbot(tmp_path / "empty")


def check_gsm8k(examples, raw_lines):
  assert len(examples) == len(raw_lines)
  for ex, raw in zip(examples, raw_lines):
    record = json.loads(raw)
    user, assistant = ex.conversation
    assert user == {"role": "user", "content": record["question"].strip()}
    assert assistant["role"] == "assistant"
    assert "<<" not in assistant["content"] and ">>" not in assistant["content"]
    assert "####" not in assistant["content"]
    gold = record["answer"].split("#### ")[-1].strip().replace(",", "")
    assert ex.answer == gold
    assert assistant["content"].endswith(f"\nThe answer is {gold}")
    assert conv.final_number(assistant["content"]) == gold


def test_gsm8k_format(tmp_path):
  lines = [
      json.dumps({"question": "Natalia sold 48 clips in April and half as many in May. Total?",
                  "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                            "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"}),
      json.dumps({"question": "Big?",
                  "answer": "It is 1000 * 2 = <<1000*2=2000>>2000.\n#### 2,000"}),
  ]
  (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
  examples = conv.gsm8k(tmp_path, "test")
  check_gsm8k(examples, lines)
  assert examples[0].conversation[1]["content"] == (
      "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\nThe answer is 72")
  assert examples[1].answer == "2000"
  (tmp_path / "train.jsonl").write_text(
      lines[0] + "\n" + '{"question": "q", "answer": "no marker"}\n')
  with pytest.raises(conv.ConversationError, match=r"train.jsonl:2: "):
    conv.gsm8k(tmp_path, "train")


def test_gsm8k_shared_data():
  path = SHARED_DATA / "gsm8k"
  if not path.is_dir():
    pytest.skip("../shared/data/gsm8k is absent")
  raw = [line for line in (path / "test.jsonl").read_text().split("\n") if line.strip()]
  check_gsm8k(conv.gsm8k(path, "test"), raw)
  assert len(conv.gsm8k(split="test")) == len(raw) == 1319  # the default path


# ----------------------------------------------------------------------------
# final_number.


@pytest.mark.parametrize("text, number", [
    ("The answer is 7", "7"),
    ("3 + 4 = 7\n7 - 2 = 5\nThe answer is 5", "5"),
    ("The answer is 5. Because 3 + 4 = 7 and 7 - 2 = 5.", "5"),
    ("The answer is 12, since 10 + 2 = 12 and then 1 more.", "12"),
    ("the Answer is: $1,000.", "1000"),
    ("The answer is 18.0", "18"),
    ("The answer is 2.50 dollars", "2.5"),
    ("The answer is -3", "-3"),
    ("She has 3 apples, then 10 more, so 13", "13"),
    ("It costs 1,234,567 in total", "1234567"),
    ("pages 3-5", "5"),
    ("The answer is 7. Wait, the answer is 8.", "8"),
    ("Year 2020 ended.", "2020"),
    ("No digits at all.", None),
    ("", None),
])
def test_final_number(text, number):
  assert conv.final_number(text) == number


# ----------------------------------------------------------------------------
# mix.


def test_mix_is_deterministic_and_proportional():
  sources = {"big": [[{"role": "user", "content": f"b{i}"}] for i in range(1000)],
             "small": [[{"role": "user", "content": f"s{i}"}] for i in range(7)],
             "unused": [[{"role": "user", "content": "u"}]]}
  weights = {"big": 0.75, "small": 0.25, "unused": 0.0}
  out = conv.mix(sources, weights, 400, seed=0)
  assert out == conv.mix(sources, weights, 400, seed=0)
  assert out != conv.mix(sources, weights, 400, seed=1)
  assert len(out) == 400
  counts = collections.Counter(name for name, _ in out)
  assert counts == {"big": 300, "small": 100}
  # The big source without replacement; the small one with (every item ~100/7 times).
  big = [c[0]["content"] for name, c in out if name == "big"]
  assert len(set(big)) == 300
  small = collections.Counter(c[0]["content"] for name, c in out if name == "small")
  assert set(small) == {f"s{i}" for i in range(7)} and set(small.values()) <= {14, 15}
  # Interleaved, not blocked by source.
  assert {name for name, _ in out[:40]} == {"big", "small"}
  # Odd sizes round by largest remainder and keep the total.
  odd = conv.mix(sources, {"big": 1, "small": 1}, 5, seed=0)
  assert sorted(collections.Counter(n for n, _ in odd).values()) == [2, 3]
  with pytest.raises(ValueError, match="unknown"):
    conv.mix(sources, {"nope": 1.0}, 10)
  with pytest.raises(ValueError, match="empty"):
    conv.mix({"e": []}, {"e": 1.0}, 10)
