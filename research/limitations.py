"""What models get wrong, measured: synthetic data with known answers and pure metrics.

  hallucination   a seeded world of fictional people (birth year, city, profession),
                  biographies and questions; accuracy on people seen in training, the
                  rate of made-up answers vs "I don't know" on people never seen, and
                  calibration (expected calibration error of the answer's probability)
  bias            an attribute tied to a group at a known rate in training text; the
                  rate in a model's generations; Zhao et al. (2017)'s amplification
  tokens to think k-step arithmetic written answer-first or steps-first (same tokens)

Everything here is numpy / plain Python: experiments/limitations.py trains and probes
models, these functions build their data and score their answers.
"""
from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

import numpy as np

IDK = "I don't know"
CITIES = ('Tessaly', 'Vorn', 'Quillan', 'Marrow', 'Ostby', 'Keldra', 'Pellin', 'Sarn')
PROFESSIONS = ('baker', 'sailor', 'painter', 'miner', 'weaver', 'scribe', 'farmer', 'potter')
YEARS = tuple(range(1850, 1866))
_FIRST = ('Al', 'Bren', 'Cor', 'Dal', 'El', 'Fen', 'Gar', 'Hal', 'Ira', 'Jor', 'Kel', 'Lor',
          'Mar', 'Nor', 'Os', 'Per', 'Quin', 'Ras', 'Sel', 'Tam')
_SECOND = ('a', 'en', 'is', 'o', 'ric', 'wyn', 'eth', 'ian')
_LAST = ('Ambry', 'Brask', 'Cole', 'Dorne', 'Evers', 'Fallow', 'Grell', 'Hask', 'Ivory',
         'Jessop', 'Kerrow', 'Lusk', 'Morrow', 'Nash', 'Orrin', 'Pike')
ATTRIBUTES = ('birth_year', 'city', 'profession')
QUESTIONS = {'birth_year': 'Q: In which year was {name} born? A:',
             'city': 'Q: In which city was {name} born? A:',
             'profession': 'Q: What was the profession of {name}? A:'}


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  birth_year: int
  city: str
  profession: str


def make_world(num_people: int, seed: int) -> list[Person]:
  """`num_people` fictional people with unique names, attributes drawn uniformly from
  YEARS, CITIES, PROFESSIONS; a pure function of (num_people, seed).

  Raises ValueError when more people are asked for than there are names (2560).
  """
  names = [f'{a}{b} {c}' for a in _FIRST for b in _SECOND for c in _LAST]
  if not 0 < num_people <= len(names):
    raise ValueError(f'num_people={num_people}: expected 1..{len(names)}')
  rng = random.Random(seed)
  return [Person(n, rng.choice(YEARS), rng.choice(CITIES), rng.choice(PROFESSIONS))
          for n in rng.sample(names, num_people)]


def biographies(p: Person) -> list[str]:
  """Three paraphrased short biographies of `p` (the facts in different orders)."""
  return [f'{p.name} was born in {p.birth_year} in {p.city}. {p.name} worked as a '
          f'{p.profession}.',
          f'{p.name} was a {p.profession} from {p.city}, born in the year {p.birth_year}.',
          f'Born in {p.city} in {p.birth_year}, {p.name} became a {p.profession}.']


def answer_of(p: Person, attribute: str) -> str:
  return str(getattr(p, attribute))


def options(attribute: str) -> list[str]:
  """The closed answer set of a question about `attribute`, IDK last."""
  values = {'birth_year': YEARS, 'city': CITIES, 'profession': PROFESSIONS}[attribute]
  return [str(v) for v in values] + [IDK]


def qa_text(p: Person, attribute: str, answer: str | None = None) -> str:
  """'Q: ... A: <answer>.' (the true answer unless given, e.g. IDK)."""
  return f'{QUESTIONS[attribute].format(name=p.name)} {answer or answer_of(p, attribute)}.'


def split_people(people: Sequence[Person], fractions: Sequence[float], seed: int):
  """Disjoint consecutive groups of a seeded shuffle, sized by `fractions` (sum <= 1)."""
  order = list(people)
  random.Random(seed).shuffle(order)
  out, start = [], 0
  for f in fractions:
    n = int(round(f * len(order)))
    out.append(order[start:start + n])
    start += n
  return out


def expected_calibration_error(confidence_N, correct_N, num_bins: int = 10) -> float:
  """ECE: sum over equal-width confidence bins of (bin share) * |accuracy - mean
  confidence| (Guo et al. 2017). confidence in [0, 1], correct 0/1; 0 for no items.
  Raises ValueError for mismatched lengths or confidences outside [0, 1]."""
  conf = np.asarray(confidence_N, np.float64)
  corr = np.asarray(correct_N, np.float64)
  if conf.shape != corr.shape:
    raise ValueError(f'confidence {conf.shape} and correct {corr.shape} differ in shape')
  if conf.size == 0:
    return 0.0
  if np.any((conf < 0) | (conf > 1)):
    raise ValueError('confidences must lie in [0, 1]')
  bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    sel = bins == b
    if sel.any():
      ece += sel.mean() * abs(corr[sel].mean() - conf[sel].mean())
  return float(ece)


def option_probabilities(scores_NxC) -> np.ndarray:
  """Softmax over each question's options' summed log-likelihoods (nats) -> N×C."""
  s = np.asarray(scores_NxC, np.float64)
  s = s - s.max(axis=1, keepdims=True)
  p = np.exp(s)
  return p / p.sum(axis=1, keepdims=True)


def hallucination_metrics(probs_NxC, gold_N, known_N, idk_index: int,
                          confident: float = 0.5) -> dict:
  """Scores of closed-set answers to questions about known and unknown people.

  probs_NxC: each question's option probabilities (`option_probabilities`); the answer
    is the argmax, its probability the confidence. gold_N: index of the true option
    (ignored for unknown people: any value is made up). known_N: bool, the person was
    in training. idk_index: the column of "I don't know".
  Returns dict with counts (known, unknown) and rates: known_accuracy, known_idk;
  unknown_idk (abstained), unknown_made_up (answered a value), unknown_confident_made_up
  (answered a value with probability >= `confident`); ece over every question (an
  answer to an unknown person counts as wrong, an IDK answer as right there and wrong
  for a known person).
  """
  p = np.asarray(probs_NxC, np.float64)
  known = np.asarray(known_N, bool)
  gold = np.asarray(gold_N)
  pred = p.argmax(axis=1)
  conf = p.max(axis=1)
  idk = pred == idk_index
  correct = np.where(known, pred == gold, idk)
  unk = ~known
  rate = lambda x, m: float(x[m].mean()) if m.any() else float('nan')
  return dict(known=int(known.sum()), unknown=int(unk.sum()),
              known_accuracy=rate(correct, known), known_idk=rate(idk, known),
              unknown_idk=rate(idk, unk), unknown_made_up=rate(~idk, unk),
              unknown_confident_made_up=rate(~idk & (conf >= confident), unk),
              ece=expected_calibration_error(conf, correct))


# -- bias amplification -------------------------------------------------------------------

GROUPS = ('Arvi', 'Belo')
ROLES = ('farmer', 'sailor')


def bias_names() -> list[str]:
  """The first names the bias texts draw from (probes use other, unseen names)."""
  return [f'{a}{b}' for a in _FIRST for b in _SECOND]


def bias_sentences(num: int, rate: float, seed: int) -> tuple[list[str], np.ndarray]:
  """`num` two-sentence texts 'X is one of the <group>. X is a <role>.': group uniform,
  role ROLES[0] with probability `rate` for GROUPS[0] and 1 - rate for GROUPS[1].

  Returns (texts, counts R×G: how often each role occurs with each group)."""
  rng = random.Random(seed)
  names = bias_names()
  counts = np.zeros((len(ROLES), len(GROUPS)), np.int64)
  texts = []
  for _ in range(num):
    g = rng.randrange(len(GROUPS))
    p_first = rate if g == 0 else 1 - rate
    r = 0 if rng.random() < p_first else 1
    counts[r, g] += 1
    name = rng.choice(names)
    texts.append(f'{name} is one of the {GROUPS[g]}. {name} is a {ROLES[r]}.')
  return texts, counts


def bias_prompt(name: str, group: str) -> str:
  return f'{name} is one of the {group}. {name} is a'


def bias_scores(counts_OxG) -> np.ndarray:
  """b(o, g) = c(o, g) / sum_g' c(o, g') (Zhao et al. 2017): the share of group g among
  the occurrences of output o; nan for an output never seen."""
  c = np.asarray(counts_OxG, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    return c / c.sum(axis=1, keepdims=True)


def bias_amplification(train_counts_OxG, predicted_counts_OxG) -> float:
  """Zhao et al. (2017): mean over the (o, g) with training bias b*(o, g) > 1/|G| of
  b~(o, g) - b*(o, g), b~ from the model's outputs. 0: the model reproduces the training
  rates; > 0: it exaggerates them. nan when no pair is biased in training."""
  train = bias_scores(train_counts_OxG)
  pred = bias_scores(predicted_counts_OxG)
  g = train.shape[1]
  sel = train > 1.0 / g
  diffs = (pred - train)[sel]
  diffs = diffs[np.isfinite(diffs)]
  return float(diffs.mean()) if diffs.size else float('nan')


# -- tokens to think ------------------------------------------------------------------------

FORMATS = ('answer_first', 'steps_first')


@dataclasses.dataclass(frozen=True)
class Chain:
  """start, then k operations (+d or -d); answer and the running values."""
  start: int
  ops: tuple[tuple[str, int], ...]

  @property
  def values(self) -> list[int]:
    out, v = [], self.start
    for op, d in self.ops:
      v = v + d if op == '+' else v - d
      out.append(v)
    return out

  @property
  def answer(self) -> int:
    return self.values[-1]


def make_chain(k: int, rng: random.Random) -> Chain:
  """k single-digit steps from a start in 10..49; values stay in 0..99."""
  v = rng.randint(10, 49)
  start, ops = v, []
  for _ in range(k):
    op = '+' if v < 50 and (v < 10 or rng.random() < 0.5) else '-'
    d = rng.randint(1, 9)
    v = v + d if op == '+' else v - d
    ops.append((op, d))
  return Chain(start, tuple(ops))


def chain_question(c: Chain) -> str:
  return 'Q: ' + str(c.start) + ''.join(f' {op} {d}' for op, d in c.ops) + ' ?'


def chain_text(c: Chain, fmt: str) -> str:
  """The training text; both formats hold exactly the same words, in another order.
  Raises ValueError for an unknown format."""
  steps, v = [], c.start
  for (op, d), w in zip(c.ops, c.values):
    steps.append(f'{v} {op} {d} = {w}')
    v = w
  work = 'S: ' + ' , '.join(steps) + ' .'
  answer = f'A: {c.answer} .'
  if fmt == 'steps_first':
    return f'{chain_question(c)} {work} {answer}'
  if fmt == 'answer_first':
    return f'{chain_question(c)} {answer} {work}'
  raise ValueError(f'format {fmt!r}: expected one of {FORMATS}')


def chain_prompt(c: Chain, fmt: str) -> str:
  """What the model continues: the question and, answer-first, 'A:' at once."""
  return chain_question(c) + (' A:' if fmt == 'answer_first' else ' S:')


def parse_answer(prompt_fmt: str, continuation: str) -> int | None:
  """The number the model gave: answer-first, the first number of the continuation;
  steps-first, the number after 'A:' (None when there is none)."""
  text = continuation if prompt_fmt == 'answer_first' else continuation.partition('A:')[2]
  m = re.search(r'-?\d+', text)
  return int(m.group()) if m else None
