"""Tool SFT data (GSM8K annotations as calculator calls, search questions) and the tool
evaluation's metrics on constructed cases."""
import json
import math

import numpy as np
import pytest

from configs import sft as sft_config
from experiments import common
from experiments import sft
from research import chat
from research import tokenizer as tokenizer_lib
from research.tools import data as tool_data
from research.tools import evaluation as tool_eval
from research.tools import registry
from research.tools import search as search_lib
from tests.test_tokenizer import synthetic_corpus

NATALIA_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as "
             "many clips in May. How many clips did Natalia sell altogether in April and May?")
NATALIA_A = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
             "<<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_gsm8k_annotations_become_calculator_calls():
  messages, gold, calls = tool_data.gsm8k_tool_conversation(NATALIA_Q, NATALIA_A)
  assert (gold, calls) == ("72", 2)
  assert messages == [
      {"role": "user", "content": NATALIA_Q},
      {"role": "assistant", "content": "Natalia sold 48/2 = ", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "48/2"}}]},
      {"role": "tool", "content": "24"},
      {"role": "assistant", "content": "24 clips in May.\nNatalia sold 48+24 = ", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "48+24"}}]},
      {"role": "tool", "content": "72"},
      {"role": "assistant", "content": "72 clips altogether in April and May.\nThe answer is 72"},
  ]


def test_gsm8k_annotations_the_calculator_disputes_are_dropped():
  answer = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n\nShe claims 2+2 = <<2+2=5>>5.  "
            "\nAnd <<oops>> 0.2 x 50 = $<<0.2*50=10>>10.\n#### 1,000")
  messages, gold, calls = tool_data.gsm8k_tool_conversation("Q?", answer)
  assert (gold, calls) == ("1000", 2)
  assert messages[1:] == [
      {"role": "assistant", "content": "Weng earns 12/60 = $", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "12/60"}}]},
      {"role": "tool", "content": "0.2"},
      {"role": "assistant", "content": "0.2 per minute.\nShe claims 2+2 = 5.\nAnd  0.2 x 50 = $",
       "tool_calls": [{"name": "calculator", "arguments": {"expression": "0.2*50"}}]},
      {"role": "tool", "content": "10"},
      {"role": "assistant", "content": "10.\nThe answer is 1000"},
  ]
  with pytest.raises(ValueError, match="####"):
    tool_data.gsm8k_tool_conversation("Q?", "no gold here")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(synthetic_corpus(), vocab_size=430)


def test_tool_results_carry_no_loss(tok):
  messages, _, _ = tool_data.gsm8k_tool_conversation(NATALIA_Q, NATALIA_A)
  rendered = chat.render(tok, messages)
  ids, mask = rendered.ids.tolist(), rendered.loss_mask
  result_start = [i for i, t in enumerate(ids) if t == tokenizer_lib.CHAT_IDS["tool_result"]]
  assert len(result_start) == 2
  for start in result_start:
    end = ids.index(tokenizer_lib.CHAT_IDS["tool_result_end"], start)
    assert not mask[start:end + 1].any()  # header, result and close: context only
    assert mask[start - 2]  # the assistant's <|/tool_call|> ... <|end_of_turn|> before: trained
  assert chat.parse(tok, ids) == messages


def test_gsm8k_tool_examples_read_the_shared_copy(shared_data):
  examples = tool_data.gsm8k_tool_examples(shared_data / "gsm8k", "test")
  assert len(examples) > 1000
  n_calls = sum(m["role"] == "tool" for e in examples for m in e.conversation)
  assert n_calls > 2 * len(examples)  # GSM8K averages ~3.5 annotations per solution
  assert all(e.conversation[-1]["content"].endswith(f"The answer is {e.answer}")
             for e in examples)


DOCS = [("Apollo", "The first moon landing was in 1969. Astronauts walked on the moon and "
         "brought rocks back to Earth for study."),
        ("Bread", "Bake the bread at a high temperature. Bread needs flour, water and salt, "
         "and the dough must rest for an hour."),
        ("Trains", "The railway connects the cities. Trains run on time in the morning and "
         "late in the evening on weekdays.")]


def test_search_questions_are_answerable_from_the_result():
  index = search_lib.SearchIndex(DOCS, use_cache=False)
  convs = tool_data.search_questions(index, 12, seed=3)
  assert convs == tool_data.search_questions(index, 12, seed=3)  # seeded
  assert len({c[0]["content"] for c in convs}) == 12
  search = search_lib.make_search(index)
  for user, call, result, answer in convs:
    quote = user["content"].split('"')[1]
    assert call["tool_calls"] == [{"name": "search", "arguments": {"query": quote, "k": 1}}]
    assert result == {"role": "tool", "content": search(quote, k=1)}
    title = result["content"][len("[1] "):].split(":")[0]
    assert answer["content"] == f"It is from {title}."
    assert quote.split()[0] in index.passages[[t for t in index.titles].index(title)]
  with pytest.raises(ValueError, match="usable quotes"):
    tool_data.search_questions(search_lib.SearchIndex([("a", "too short")], use_cache=False), 1)


# ----------------------------------------------------------------------------
# Evaluation metrics.

TOOLS = registry.default_tools(search_lib.SearchIndex(DOCS, use_cache=False))


def _calls(texts):
  return [registry.run_call(t, TOOLS) for t in texts]


def test_call_metrics_on_constructed_calls():
  calc = lambda e: json.dumps({"name": "calculator", "arguments": {"expression": e}})
  calls = _calls([calc("2 + 3"), calc("4 * 5"), calc("1 / 0"),  # 3 valid, 1 tool error
                  "not json", '{"name": "rm", "arguments": {}}',  # invalid
                  json.dumps({"name": "calculator", "arguments": {"expr": "1"}})])  # schema
  calls.append(registry.CallResult(None, None, "error: tool-call limit reached (4 per turn); "
                                   "answer without tools", False))
  calls.append(registry.CallResult(None, None, "error: <|/tool_call|> without an opening "
                                   "<|tool_call|>", False))
  assert [tool_eval.call_status(c, TOOLS) for c in calls] == [
      "ok", "ok", "tool_error", "invalid", "invalid", "invalid", "capped", "invalid"]
  m = tool_eval.call_metrics(calls, TOOLS)
  assert (m["calls"], m["valid"], m["invalid"], m["tool_errors"], m["capped"]) == (8, 3, 4, 1, 1)
  assert m["validity_rate"] == pytest.approx(3 / 7)
  assert m["tool_errors_per_100"] == pytest.approx(100 / 8)
  assert m["by_tool"] == {"calculator": 3}
  lo, hi = m["validity_interval"]
  assert lo < 3 / 7 < hi
  empty = tool_eval.call_metrics([], TOOLS)
  assert empty["calls"] == 0 and math.isnan(empty["validity_rate"])


def test_the_answer_is_read_after_the_last_result(tok):
  block = [tokenizer_lib.CHAT_IDS["tool_result"]] + tok.encode_text("72")
  tokens = tok.encode_text("so 48 + 24 = ") + block + tok.encode_text("The answer is 70")
  sampled = np.array([True] * (len(tokens) - len(block) - len(tok.encode_text(
      "The answer is 70"))) + [False] * len(block) + [True] * len(tok.encode_text(
          "The answer is 70")))
  assert tool_eval.final_answer_text(tok, tokens, sampled) == "The answer is 70"
  assert tool_eval.final_answer_text(tok, tok.encode_text("7"), np.ones(1, bool)) == "7"


def test_report_lines_put_both_accuracies_side_by_side():
  summary = lambda c, n: dict(correct=c, total=n, accuracy=c / n, interval=(0.1, 0.9))
  without = {"word_problems_by_k": {1: summary(1, 4)}, "gsm8k": summary(0, 5)}
  with_tools = {"word_problems_by_k": {1: dict(summary(3, 4), calls_per_problem=1.5)},
                "gsm8k": dict(summary(1, 5), calls_per_problem=2.0),
                "calls": tool_eval.call_metrics(_calls(['{"name": "calculator", "arguments": '
                                                        '{"expression": "1+1"}}']), TOOLS),
                "search": dict(summary(2, 4), without=summary(0, 4), calls_per_problem=1.0),
                "calls_per_problem": 1.8, "example_calls": []}
  text = "\n".join(tool_eval.report_lines(without, with_tools))
  assert "| synthetic, k = 1 | 0.25 [0.10, 0.90] (1/4) | 0.75 [0.10, 0.90] (3/4) | 1.50 |" in text
  assert ("| GSM8K test (first 5) | 0.00 [0.10, 0.90] (0/5) | 0.20 [0.10, 0.90] (1/5) | "
          "2.00 |") in text
  assert ("| search questions (source named; held out, 4) | 0.00 [0.10, 0.90] (0/4) | "
          "0.50 [0.10, 0.90] (2/4) | 1.00 |") in text
  assert tool_eval.source_named("It is from Lincoln, 1862.", "Lincoln, 1862")
  assert not tool_eval.source_named("It is from Lincoln, 1863.", "Lincoln, 1862")
  assert "valid (parses, names a real tool, arguments pass its schema): 1/1 = 1.00" in text
  assert "tool errors (a valid call the tool failed): 0.0 per 100 calls" in text


def test_sft_loads_the_tool_sources(tmp_path, monkeypatch):
  monkeypatch.setattr(search_lib, "corpus_index",
                      lambda corpus: search_lib.SearchIndex(DOCS, use_cache=False))
  config = sft_config.get_config("tools")
  assert config.eval.tools and config.data.weights.calculator > 0
  config = sft_config.get_config("test")
  for name, value in dict(data__weights__calculator=1.0, data__weights__search=1.0,
                          data__weights__gsm8k_tools=1.0, data__weights__gsm8k=0.0,
                          data__weights__chatterbot=0.0, data__search_questions=10,
                          data__gsm8k_dir=str(tmp_path / "absent")).items():
    common.apply_override(config, name.replace("__", "."), str(value))
  with pytest.raises(common.UserError, match="gsm8k_dir"):
    sft.load_sources(config.to_dict())
  config.data.gsm8k_dir = ""
  train, held, problems = sft.load_sources(config.to_dict())
  assert {"calculator", "search", "word_problems"} <= set(train)
  assert train["calculator"][0][1]["tool_calls"][0]["name"] == "calculator"
  assert len(train["search"]) + len(held["search"]) == 10
  assert problems["word_problems"]


def test_search_index_is_cached_on_disk_by_fingerprint(tmp_path):
  first = search_lib.SearchIndex(DOCS, cache_dir=tmp_path)
  again = search_lib.SearchIndex(DOCS, cache_dir=tmp_path)
  assert (first.from_cache, again.from_cache) == (False, True)
  assert again.fingerprint == first.fingerprint
  for query in ("moon landing", "bread flour", "trains evening"):
    np.testing.assert_allclose(again.scores(query), first.scores(query), rtol=1e-6)
  assert len(list(tmp_path.iterdir())) == 1
  changed = search_lib.SearchIndex(DOCS[:2] + [("Trains", "Buses now.")], cache_dir=tmp_path)
  assert not changed.from_cache and changed.fingerprint != first.fingerprint
  assert len(list(tmp_path.iterdir())) == 2  # a changed corpus never reads a stale index


def test_corpus_documents_from_files(tmp_path):
  (tmp_path / "a.txt").write_text("Alpha text.")
  (tmp_path / "b.txt").write_text("Beta text.")
  assert search_lib.corpus_documents(str(tmp_path)) == [("a", "Alpha text."), ("b", "Beta text.")]
  assert search_lib.corpus_documents(str(tmp_path / "a.txt")) == [("a", "Alpha text.")]
  good = tmp_path / "c.jsonl"
  good.write_text('{"title": "T", "text": "body"}\n\n{"text": "untitled"}\n')
  assert search_lib.corpus_documents(str(good)) == [("T", "body"), ("c 3", "untitled")]
  bad = tmp_path / "d.jsonl"
  bad.write_text('{"title": "T", "text": "body"}\n{"title": "no text"}\n')
  with pytest.raises(ValueError, match=r"d.jsonl:2: expected an object with a string 'text'"):
    search_lib.corpus_documents(str(bad))
  with pytest.raises(ValueError, match="no such file"):
    search_lib.corpus_documents(str(tmp_path / "missing"))


def test_sft_names_a_bad_search_corpus(tmp_path):
  config = sft_config.get_config("test")
  config.data.weights.search = 1.0
  config.data.search_corpus = str(tmp_path / "missing.jsonl")
  with pytest.raises(common.UserError, match=r"^data.search_corpus=.*missing.jsonl: .*no such"):
    sft.load_sources(config.to_dict())
