"""Preference pairs for reward modelling: sources, a prompt-disjoint split, token arrays.

A pair is `{"prompt": messages, "chosen": str, "rejected": str}`: a conversation (chat
messages as in research/chat.py, ending where the assistant is to answer) and two
assistant replies to it, the first preferred. Sources:

- `hh_rlhf(path)`: Anthropic's hh-rlhf JSONL(.gz) of `{"chosen", "rejected"}` full
  dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ..." turns) that share everything but
  their last assistant turn.
- `jsonl_pairs(path)`: `{"prompt": str or messages, "chosen": str, "rejected": str}`
  lines, every line validated.

`split_pairs` holds out whole prompts (seeded hash, so no prompt is on both sides);
`tokenize_pairs` renders each prompt + reply with the chat template and gives the
right-padded arrays `research.reward_model.make_reward_train_step` trains on;
`pairs_from_token_lists` does the same for pairs already tokenised.

Bad input raises `PreferenceError`, one line "path:LINE: what is wrong".
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from research import chat
from research import tokenizer as tokenizer_lib

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
HH_RLHF = SHARED_DATA / 'hh-rlhf' / 'harmless-base-test.jsonl.gz'
ARRAY_KEYS = ('chosen_tokens', 'chosen_lengths', 'rejected_tokens', 'rejected_lengths')

Message = dict[str, Any]
Pair = dict[str, Any]


class PreferenceError(ValueError):
  """Preference data that cannot be read; the message is one line naming the file (and line)."""


def _one_line(text: Any, limit: int = 200) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


class Pairs(list):
  """A list of pairs that also says what was skipped: `skipped` maps reason -> count."""

  def __init__(self, items=(), skipped: Mapping[str, int] | None = None):
    super().__init__(items)
    self.skipped = dict(skipped or {})


class TokenizedPairs(dict):
  """The arrays of `ARRAY_KEYS` (a plain dict of them) plus `counts` {kept, dropped, truncated}."""

  def __init__(self, arrays: Mapping[str, np.ndarray], counts: Mapping[str, int]):
    super().__init__(arrays)
    self.counts = dict(counts)


# ----------------------------------------------------------------------------
# hh-rlhf.

_TURN_RE = re.compile(r'(?:^|\n\n)(Human|Assistant):[ \t]?')
_HH_ROLES = {'Human': 'user', 'Assistant': 'assistant'}


def hh_dialogue(text: str) -> list[Message]:
  """The chat messages of an hh-rlhf dialogue ("\\n\\nHuman: a\\n\\nAssistant: b" ...).

  "Human" turns become user messages and "Assistant" turns assistant messages, with
  surrounding whitespace stripped (a turn may be empty: "Assistant:" at the end).
  Raises ValueError when the text has no turn or text before its first turn.
  """
  if not isinstance(text, str):
    raise ValueError(f'expected a dialogue string, got {type(text).__name__}')
  marks = list(_TURN_RE.finditer(text))
  if not marks:
    raise ValueError('no "Human:" or "Assistant:" turn')
  if text[:marks[0].start()].strip():
    raise ValueError(f'text before the first turn: {_one_line(text[:marks[0].start()], 60)!r}')
  messages = []
  for m, nxt in zip(marks, marks[1:] + [None]):
    end = nxt.start() if nxt is not None else len(text)
    messages.append({'role': _HH_ROLES[m.group(1)], 'content': text[m.end():end].strip()})
  return messages


def _open_lines(path: pathlib.Path):
  """(line number, raw bytes) of a JSONL file, gzip read transparently."""
  try:
    data = path.read_bytes()
    if data[:2] == b'\x1f\x8b':
      data = gzip.decompress(data)
  except OSError as e:
    raise PreferenceError(f'{path}: cannot read ({e.strerror or e})') from None
  except (EOFError, gzip.BadGzipFile) as e:
    raise PreferenceError(f'{path}: not a readable gzip file ({_one_line(e)})') from None
  return enumerate(data.split(b'\n'), start=1)


def _records(path: pathlib.Path):
  """(line number, record or PreferenceError) per non-blank line."""
  for lineno, raw in _open_lines(path):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError as e:
      yield lineno, PreferenceError(f'{path}:{lineno}: not UTF-8 at byte {e.start}')
    except json.JSONDecodeError as e:
      yield lineno, PreferenceError(f'{path}:{lineno}: malformed JSON ({e.msg} at column '
                                    f'{e.colno})')
    else:  # the text policy of research/tokenizer.py: invalid Unicode is an error
      problem = tokenizer_lib.text_problem(record)
      yield lineno, PreferenceError(f'{path}:{lineno}: {problem}') if problem else record


def hh_pair(chosen: str, rejected: str) -> tuple[Pair | None, str | None]:
  """(pair, None) from two hh-rlhf dialogues, or (None, reason it is skipped).

  The prompt is the shared dialogue before the last assistant turn; the responses are
  the two last assistant turns. Reasons: 'unparsable', 'no_response' (a dialogue does
  not end with an assistant turn), 'different_prefix', 'empty_response', 'identical'.
  """
  try:
    c, r = hh_dialogue(chosen), hh_dialogue(rejected)
  except ValueError:
    return None, 'unparsable'
  if c[-1]['role'] != 'assistant' or r[-1]['role'] != 'assistant' or len(c) < 2:
    return None, 'no_response'
  if c[:-1] != r[:-1]:
    return None, 'different_prefix'
  if not c[-1]['content'] or not r[-1]['content']:
    return None, 'empty_response'
  if c[-1]['content'] == r[-1]['content']:
    return None, 'identical'
  return dict(prompt=c[:-1], chosen=c[-1]['content'], rejected=r[-1]['content']), None


def hh_rlhf(path: str | pathlib.Path | None = None) -> Pairs:
  """Pairs of an hh-rlhf file (default ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz).

  Pairs that `hh_pair` rejects are skipped and counted in the result's `skipped`
  ({reason: count}); a line that is not a JSON object with string "chosen" and
  "rejected" raises PreferenceError "path:LINE: ...".
  """
  path = pathlib.Path(path) if path else HH_RLHF
  pairs, skipped = [], collections.Counter()
  for lineno, record in _records(path):
    if isinstance(record, PreferenceError):
      raise record
    if (not isinstance(record, dict) or not isinstance(record.get('chosen'), str)
        or not isinstance(record.get('rejected'), str)):
      raise PreferenceError(f'{path}:{lineno}: expected {{"chosen": str, "rejected": str}}')
    pair, reason = hh_pair(record['chosen'], record['rejected'])
    if pair is None:
      skipped[reason] += 1
    else:
      pairs.append(pair)
  return Pairs(pairs, skipped)


# ----------------------------------------------------------------------------
# JSONL pairs.


def check_pair(record: Any) -> Pair:
  """The pair of a `{"prompt", "chosen", "rejected"}` record, or ValueError saying why not.

  prompt: a non-empty string (one user message) or a non-empty list of chat messages;
  chosen, rejected: different non-empty strings. Other fields are ignored.
  """
  if not isinstance(record, dict):
    raise ValueError(f'expected a JSON object, got {type(record).__name__}')
  missing = [k for k in ('prompt', 'chosen', 'rejected') if k not in record]
  if missing:
    raise ValueError(f'no field {", ".join(map(repr, missing))} '
                     f'(fields: {", ".join(map(str, record)) or "none"})')
  prompt = record['prompt']
  if isinstance(prompt, str):
    if not prompt.strip():
      raise ValueError('empty prompt')
    messages = [{'role': 'user', 'content': prompt}]
  elif isinstance(prompt, list):
    if not prompt:
      raise ValueError('prompt is an empty list')
    for i, m in enumerate(prompt):
      chat.check_message(i, m)
    messages = [dict(m) for m in prompt]
  else:
    raise ValueError(f'prompt is {type(prompt).__name__}: expected a string or a list of '
                     'messages')
  for key in ('chosen', 'rejected'):
    if not isinstance(record[key], str):
      raise ValueError(f'{key} is {type(record[key]).__name__}, not a string')
    if not record[key].strip():
      raise ValueError(f'empty {key}')
  if record['chosen'] == record['rejected']:
    raise ValueError('chosen and rejected are identical')
  return dict(prompt=messages, chosen=record['chosen'], rejected=record['rejected'])


def jsonl_pairs(path: str | pathlib.Path, on_error: str = 'raise') -> tuple[list[Pair], list[str]]:
  """Pairs of a JSONL(.gz) file of `{"prompt", "chosen", "rejected"}` lines (see check_pair).

  Args:
    path: the file; blank lines are skipped.
    on_error: 'raise': the first bad line raises PreferenceError "path:LINE: what is
      wrong"; 'skip': bad lines are skipped and described.

  Returns:
    (pairs, problems): one "path:LINE: ..." string per skipped line (empty with 'raise').
  """
  if on_error not in ('raise', 'skip'):
    raise ValueError(f'on_error {on_error!r}: expected "raise" or "skip"')
  path = pathlib.Path(path)
  pairs, problems = [], []
  for lineno, record in _records(path):
    error = record if isinstance(record, PreferenceError) else None
    if error is None:
      try:
        pairs.append(check_pair(record))
      except ValueError as e:
        error = PreferenceError(f'{path}:{lineno}: {_one_line(e)}')
    if error is not None:
      if on_error == 'raise':
        raise error
      problems.append(str(error))
  return pairs, problems


# ----------------------------------------------------------------------------
# Split and tokenise.


def prompt_key(prompt: Sequence[Mapping[str, Any]] | str) -> str:
  """The canonical JSON of a prompt (a string prompt is its one user message)."""
  if isinstance(prompt, str):
    prompt = [{'role': 'user', 'content': prompt}]
  return json.dumps(list(prompt), sort_keys=True, ensure_ascii=False)


def split_pairs(pairs: Sequence[Pair], fraction: float, seed: int = 0
                ) -> tuple[list[Pair], list[Pair]]:
  """(train, held-out) pairs: whole prompts are held out, chosen by a seeded hash.

  The distinct prompts are ordered by sha256(seed, prompt) and the first
  round(fraction * number of prompts) are held out (at least one, and at least one
  prompt left for training, when there are two or more prompts and fraction > 0), so
  every pair of a prompt lands on the same side. Input order is kept on each side.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'held-out fraction must be in [0, 1), got {fraction}')
  keys = [prompt_key(p['prompt']) for p in pairs]
  distinct = sorted(set(keys), key=lambda k: hashlib.sha256(f'{seed}\0{k}'.encode()).digest())
  n_held = round(fraction * len(distinct))
  if fraction > 0 and len(distinct) > 1:
    n_held = min(max(n_held, 1), len(distinct) - 1)
  held = set(distinct[:n_held])
  return ([p for p, k in zip(pairs, keys) if k not in held],
          [p for p, k in zip(pairs, keys) if k in held])


def pairs_from_token_lists(chosen_lists: Sequence[Sequence[int]],
                           rejected_lists: Sequence[Sequence[int]],
                           max_len: int) -> TokenizedPairs:
  """Token sequences -> `TokenizedPairs` (the arrays of `tokenize_pairs`).

  Each sequence is cut from the LEFT to its last `max_len` tokens (its score is read at
  its last token, which is always kept) and right-padded with 0 to width `max_len`;
  lengths are the real token counts. Pairs whose two sides are identical after the cut
  (or empty) are dropped. counts: {kept, dropped, truncated (kept pairs with a side cut)}.
  """
  if max_len < 1:
    raise ValueError(f'max_len must be positive, got {max_len}')
  if len(chosen_lists) != len(rejected_lists):
    raise ValueError(f'{len(chosen_lists)} chosen sequences but {len(rejected_lists)} rejected')
  kept, truncated = [], 0
  for c, r in zip(chosen_lists, rejected_lists):
    c, r = np.asarray(c, np.int64).reshape(-1), np.asarray(r, np.int64).reshape(-1)
    cut = len(c) > max_len or len(r) > max_len
    c, r = c[len(c) - min(len(c), max_len):], r[len(r) - min(len(r), max_len):]
    if len(c) and len(r) and not np.array_equal(c, r):
      kept.append((c, r))
      truncated += cut
  n = len(kept)
  arrays = {}
  for side, k in (('chosen', 0), ('rejected', 1)):
    tokens = np.zeros((n, max_len), np.int32)
    lengths = np.zeros((n,), np.int32)
    for i, pair in enumerate(kept):
      seq = pair[k]
      tokens[i, :len(seq)] = seq
      lengths[i] = len(seq)
    arrays[f'{side}_tokens'], arrays[f'{side}_lengths'] = tokens, lengths
  return TokenizedPairs(arrays, dict(kept=n, dropped=len(chosen_lists) - n,
                                     truncated=truncated))


def render_pair(tokenizer: tokenizer_lib.Tokenizer, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
  """(chosen ids, rejected ids): chat.render(prompt + [assistant reply]) of each side."""
  prompt = [{'role': 'user', 'content': pair['prompt']}] if isinstance(pair['prompt'], str) \
      else list(pair['prompt'])
  return tuple(chat.render(tokenizer, prompt + [{'role': 'assistant', 'content': pair[k]}]).ids
               for k in ('chosen', 'rejected'))


def tokenize_pairs(tokenizer: tokenizer_lib.Tokenizer, pairs: Sequence[Pair],
                   max_len: int) -> TokenizedPairs:
  """Pairs -> {chosen_tokens [N, max_len] int32, chosen_lengths [N], rejected_tokens,
  rejected_lengths}, right-padded with 0, plus `.counts` {kept, dropped}.

  Each side is the chat rendering of prompt + [assistant reply] (ending with the
  reply's end_of_turn, where the reward model reads its score), cut from the left
  to `max_len` tokens; pairs identical after the cut are dropped.
  """
  rendered = [render_pair(tokenizer, p) for p in pairs]
  return pairs_from_token_lists([c for c, _ in rendered], [r for _, r in rendered], max_len)


def num_pairs(arrays: Mapping[str, np.ndarray] | None) -> int:
  return 0 if arrays is None else int(np.shape(arrays['chosen_lengths'])[0])


def load_configured_pairs(dc: Mapping[str, Any], seed: int) -> tuple[list, list, dict, list]:
  """The preference pairs a stage's `data` config names, split by prompt.

  dc: `source` ('hh_rlhf' | 'jsonl'), `path` ('' = the shared hh-rlhf file for
  hh_rlhf), `on_error` (jsonl), `max_pairs` (0 = all), `heldout_fraction`.
  Returns (train pairs, held-out pairs, stats, skipped-line messages). Raises
  PreferenceError naming the key or file for a missing file, an unknown source or no
  usable pairs.
  """
  source, problems = dc['source'], []
  if source == 'hh_rlhf':
    path = pathlib.Path(dc['path']) if dc['path'] else HH_RLHF
    if not path.exists():
      raise PreferenceError(f'{path}: no such file (hh-rlhf pairs; set --config.data.path)')
    pairs = hh_rlhf(path)
    skipped = dict(pairs.skipped)
  elif source == 'jsonl':
    if not dc['path']:
      raise PreferenceError('data.source=jsonl needs --config.data.path=FILE.jsonl')
    path = pathlib.Path(dc['path'])
    if not path.exists():
      raise PreferenceError(f'{path}: no such file (data.path)')
    pairs, problems = jsonl_pairs(path, on_error=dc['on_error'])
    skipped = {'malformed': len(problems)}
  else:
    raise PreferenceError(f'data.source={source!r}: expected "hh_rlhf" or "jsonl"')
  stats = dict(source=source, skipped=skipped, path=str(path), read=len(pairs))
  if dc['max_pairs']:
    pairs = pairs[:dc['max_pairs']]
  if not pairs:
    raise PreferenceError(f'{path}: no usable preference pairs')
  train, held = split_pairs(pairs, dc['heldout_fraction'], seed)
  return list(train), list(held), stats, problems
