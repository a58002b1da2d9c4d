"""Tests for research/preferences.py: hh-rlhf parsing, JSONL pairs, the prompt-disjoint
split and the left-truncated, right-padded token arrays."""
import gzip
import json
import pathlib

import numpy as np
import pytest

from research import chat
from research import preferences
from research import tokenizer as tokenizer_lib

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
USER, ASST, EOT = (tokenizer_lib.CHAT_IDS[k] for k in ('user', 'assistant', 'end_of_turn'))

DIALOGUE = ('\n\nHuman: What is a good pen prank?\n\nAssistant: Are you looking for jokes?'
            '\n\nHuman: yep\n\n1. not a new turn\n\nAssistant: Draw on their arm. ')


class CharTokenizer:
  """One id per character (ids 200..): enough for chat.render, and easy to read back."""

  def encode_text(self, text):
    return [200 + ord(c) for c in text]


def hh_line(prompt_text, chosen, rejected):
  return json.dumps({'chosen': f'{prompt_text}\n\nAssistant: {chosen}',
                     'rejected': f'{prompt_text}\n\nAssistant: {rejected}'})


def test_hh_dialogue_parses_multi_turn_dialogues():
  assert preferences.hh_dialogue(DIALOGUE) == [
      {'role': 'user', 'content': 'What is a good pen prank?'},
      {'role': 'assistant', 'content': 'Are you looking for jokes?'},
      {'role': 'user', 'content': 'yep\n\n1. not a new turn'},
      {'role': 'assistant', 'content': 'Draw on their arm.'},
  ]
  # No leading blank line, and an empty final turn.
  assert preferences.hh_dialogue('Human: hi\n\nAssistant:') == [
      {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': ''}]
  for bad in ('just text', 'preamble\n\nHuman: hi'):
    with pytest.raises(ValueError):
      preferences.hh_dialogue(bad)


def test_hh_pair_prompt_is_the_shared_prefix_and_skips_are_counted(tmp_path):
  prompt = '\n\nHuman: Can you help?\n\nAssistant: Sure.\n\nHuman: How do I bake bread?'
  lines = [
      hh_line(prompt, 'Mix flour and water.', 'No.'),
      hh_line(prompt, 'Same answer.', 'Same answer.'),  # identical
      hh_line(prompt, 'Something.', ''),  # empty response
      json.dumps({'chosen': prompt + '\n\nAssistant: a', 'rejected': '\n\nHuman: other\n\n'
                  'Assistant: b'}),  # different prefixes
      json.dumps({'chosen': prompt, 'rejected': prompt}),  # ends on a user turn
      '',
  ]
  path = tmp_path / 'hh.jsonl.gz'
  path.write_bytes(gzip.compress('\n'.join(lines).encode()))
  pairs = preferences.hh_rlhf(path)
  assert pairs == [{'prompt': [{'role': 'user', 'content': 'Can you help?'},
                               {'role': 'assistant', 'content': 'Sure.'},
                               {'role': 'user', 'content': 'How do I bake bread?'}],
                    'chosen': 'Mix flour and water.', 'rejected': 'No.'}]
  assert pairs.skipped == {'identical': 1, 'empty_response': 1, 'different_prefix': 1,
                           'no_response': 1}
  # A line that is not a pair record is a one-line error with its line number.
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(lines[0] + '\n{"chosen": "x"}\n')
  with pytest.raises(preferences.PreferenceError, match=r'bad\.jsonl:2: expected'):
    preferences.hh_rlhf(bad)
  with pytest.raises(preferences.PreferenceError, match='cannot read'):
    preferences.hh_rlhf(tmp_path / 'absent.jsonl.gz')


def test_jsonl_pairs_errors_name_the_line_and_skip_mode(tmp_path):
  good = {'prompt': 'Say hi', 'chosen': 'Hi!', 'rejected': 'Go away.'}
  messages = {'prompt': [{'role': 'system', 'content': 'Be kind.'},
                         {'role': 'user', 'content': 'Say hi'}],
              'chosen': 'Hello.', 'rejected': 'No.', 'id': 7}
  bad_lines = {
      '{"prompt": "x", "chosen": "a"': 'malformed JSON',
      json.dumps({'prompt': 'x', 'chosen': 'a'}): "no field 'rejected'",
      json.dumps({'prompt': 'x', 'chosen': 'a', 'rejected': 'a'}): 'identical',
      json.dumps({'prompt': 'x', 'chosen': ' ', 'rejected': 'a'}): 'empty chosen',
      json.dumps({'prompt': 'x', 'chosen': 1, 'rejected': 'a'}): 'chosen is int',
      json.dumps({'prompt': [], 'chosen': 'b', 'rejected': 'a'}): 'empty list',
      json.dumps({'prompt': [{'role': 'wizard', 'content': 'x'}], 'chosen': 'b',
                  'rejected': 'a'}): 'unknown role',
      json.dumps(['x']): 'expected a JSON object',
  }
  for line, message in bad_lines.items():
    path = tmp_path / 'pairs.jsonl'
    path.write_text(json.dumps(good) + '\n\n' + line + '\n' + json.dumps(messages) + '\n')
    with pytest.raises(preferences.PreferenceError) as e:
      preferences.jsonl_pairs(path)
    assert str(e.value).startswith(f'{path}:3: ') and message in str(e.value), str(e.value)
    assert '\n' not in str(e.value)
    pairs, problems = preferences.jsonl_pairs(path, on_error='skip')
    assert len(pairs) == 2 and len(problems) == 1 and problems[0].startswith(f'{path}:3: ')
  assert pairs[0] == {'prompt': [{'role': 'user', 'content': 'Say hi'}], 'chosen': 'Hi!',
                      'rejected': 'Go away.'}
  assert pairs[1]['prompt'] == messages['prompt'] and 'id' not in pairs[1]
  with pytest.raises(ValueError, match='on_error'):
    preferences.jsonl_pairs(path, on_error='ignore')


def test_split_pairs_keeps_each_prompt_on_one_side_and_is_deterministic():
  pairs = [{'prompt': f'question {i % 40}', 'chosen': f'yes {i}', 'rejected': f'no {i}'}
           for i in range(200)]
  train, held = preferences.split_pairs(pairs, 0.25, seed=0)
  assert len(train) + len(held) == 200 and len(held) == 50  # 10 of 40 prompts, 5 pairs each
  assert not {p['prompt'] for p in train} & {p['prompt'] for p in held}
  assert preferences.split_pairs(pairs, 0.25, seed=0) == (train, held)
  assert preferences.split_pairs(pairs, 0.25, seed=1)[1] != held
  # A string prompt and its one-message list are the same prompt.
  same = [{'prompt': 'q', 'chosen': 'a', 'rejected': 'b'},
          {'prompt': [{'role': 'user', 'content': 'q'}], 'chosen': 'c', 'rejected': 'd'},
          {'prompt': 'other', 'chosen': 'a', 'rejected': 'b'}]
  train, held = preferences.split_pairs(same, 0.1, seed=0)
  assert len(held) in (1, 2) and len(train) == 3 - len(held)  # at least one held-out prompt
  assert preferences.split_pairs(same, 0.0, seed=0) == (same, [])


def test_tokenize_pairs_truncates_from_the_left_and_right_pads():
  tok = CharTokenizer()
  pairs = [{'prompt': 'abcdefgh', 'chosen': 'yes', 'rejected': 'no'},
           {'prompt': [{'role': 'user', 'content': 'q'}], 'chosen': 'xy', 'rejected': 'zz'},
           {'prompt': 'same start', 'chosen': 'A---tail', 'rejected': 'B---tail'}]
  out = preferences.tokenize_pairs(tok, pairs, max_len=8)
  full = chat.render(tok, [{'role': 'user', 'content': 'abcdefgh'},
                           {'role': 'assistant', 'content': 'yes'}]).ids
  assert len(full) == 15
  # Cut from the left: the last 8 tokens, ending with the reply's end_of_turn.
  np.testing.assert_array_equal(out['chosen_tokens'][0], full[-8:])
  assert out['chosen_tokens'][0, -1] == EOT and out['chosen_lengths'][0] == 8
  # Short sequences are right-padded with 0 and keep their header.
  want = [USER, 200 + ord('q'), EOT, ASST, 200 + ord('z'), 200 + ord('z'), EOT]
  np.testing.assert_array_equal(out['rejected_tokens'][1], want + [0])
  assert out['rejected_lengths'][1] == 7
  # The third pair is identical once cut to 8 tokens ("---tail" + EOT): dropped.
  assert out.counts == {'kept': 2, 'dropped': 1, 'truncated': 1}
  assert out['chosen_tokens'].shape == (2, 8) and out['chosen_tokens'].dtype == np.int32
  assert set(out) == set(preferences.ARRAY_KEYS)


def test_pairs_from_token_lists():
  out = preferences.pairs_from_token_lists([[5, 6, 7, 8], [9], [4, 4]], [[6, 7, 9], [], [4, 4]],
                                           max_len=3)
  np.testing.assert_array_equal(out['chosen_tokens'], [[6, 7, 8]])
  np.testing.assert_array_equal(out['rejected_tokens'], [[6, 7, 9]])
  np.testing.assert_array_equal(out['chosen_lengths'], [3])
  assert out.counts == {'kept': 1, 'dropped': 2, 'truncated': 1}
  empty = preferences.pairs_from_token_lists([], [], max_len=4)
  assert empty['chosen_tokens'].shape == (0, 4)
  with pytest.raises(ValueError):
    preferences.pairs_from_token_lists([[1]], [], max_len=4)


def test_hh_rlhf_real_file():
  path = SHARED_DATA / 'hh-rlhf' / 'harmless-base-test.jsonl.gz'
  if not path.exists():
    pytest.skip('../shared/data/hh-rlhf is absent')
  pairs = preferences.hh_rlhf(path)
  assert len(pairs) + sum(pairs.skipped.values()) == 2312
  assert len(pairs) > 2200
  for p in pairs[:200]:
    assert p['prompt'][-1]['role'] == 'user' and p['chosen'] and p['rejected']
    assert p['chosen'] != p['rejected']
  out = preferences.tokenize_pairs(CharTokenizer(), pairs[:50], max_len=128)
  assert (out['chosen_tokens'][np.arange(len(out['chosen_lengths'])),
                               out['chosen_lengths'] - 1] == EOT).all()
