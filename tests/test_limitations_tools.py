"""The limitations study's tool parts on constructed cases with known answers, and the
report rebuilt from a results file; the whole study at its test size (slow)."""
import json

import numpy as np
import pytest

from research import limitations as lim
from research import limitations_tools as lt
from research.tools import python_sandbox
from research.tools import search as search_lib


def _index(people):
  return search_lib.SearchIndex(lt.fact_documents(people), use_cache=False)


def test_world_search_finds_the_person_or_nothing():
  people = lim.make_world(60, 0)
  known, unknown = people[:30], people[30:]
  search = lt.world_search(_index(known))
  for p in known:
    result = search(p.name)
    assert result == f'{p.name}: born {p.birth_year} in {p.city}; {p.profession}.'
  # Unknown people share first or last names with known ones (BM25 scores them > 0),
  # yet the exact-name filter finds nothing.
  last_names = {p.name.split()[1] for p in known}
  sharing = [p for p in unknown if p.name.split()[1] in last_names]
  assert sharing, 'the world should have namesakes for this test'
  for p in unknown:
    assert search(p.name) == lt.NO_RESULTS
  assert search(known[0].name.upper()) == search(known[0].name)


def test_search_conversation_answers_from_the_result():
  people = lim.make_world(10, 1)
  search = lt.world_search(_index(people[:5]))
  found = lt.search_conversation(people[0], 'city', search(people[0].name))
  missing = lt.search_conversation(people[7], 'city', search(people[7].name))
  assert found[1]['tool_calls'] == [{'name': 'search', 'arguments': {'query': people[0].name}}]
  assert found[-1]['content'] == f'{people[0].city}.'
  assert missing[2]['content'] == lt.NO_RESULTS and missing[-1]['content'] == f'{lim.IDK}.'


def test_letters_and_decimals_have_known_answers():
  assert lt.count_letter('strawberry', 'r') == 3 and lt.count_letter('strawberry', 'z') == 0
  assert lt.larger('9.11', '9.9') == '9.9' and lt.larger('9.9', '9.11') == '9.9'
  assert lt.larger('3.45', '3.4') == '3.45' and lt.larger('9.95', '10.2') == '10.2'
  assert lt.larger_by_digits('9.11', '9.9') == '9.11' != lt.larger('9.11', '9.9')
  assert lt.larger_by_digits('9.95', '10.2') == '10.2'
  pairs = lt.decimal_pairs(200, seed=0)
  assert pairs == lt.decimal_pairs(200, seed=0) and len(set(pairs)) == 200
  # The trap: the two-decimal numeral ("11") is the smaller number in a fair share.
  trap = np.mean([lt.larger(a, b) == min((a, b), key=len) for a, b in pairs])
  assert 0.3 < trap < 0.7
  held = frozenset(pairs[:50])
  assert not held & set(lt.decimal_pairs(100, seed=1, exclude=held))
  assert lt.final_answer(' 9.9.') == '9.9' and lt.final_answer('3.') == '3'
  assert lt.final_answer('3') == '3' and lt.final_answer(' ') is None
  items = lt.letter_items(['banana', 'cherry'], 30, seed=0)
  counts = [lt.count_letter(w, c) for w, c in items]
  assert 0 in counts and max(counts) == 3  # 'a' in banana


def test_vocabulary_words_are_whole_lower_case_words():
  words = lt.vocabulary_words(['The Congress shall shall shall meet, Union union',
                               'nation nation people'], 3)
  assert words == ['shall', 'nation', 'union']  # 'ongress' (from Congress) is no word
  with pytest.raises(ValueError, match='only'):
    lt.vocabulary_words(['short'], 5)


def test_the_python_tool_prints_the_gold_answer():
  for task, item in (('count', ('strawberry', 'r')), ('compare', ('9.11', '9.9')),
                     ('compare', ('4.2', '4.17'))):
    conv = lt.tokenizer_conversation(task, item, with_tool=True)
    code = conv[1]['tool_calls'][0]['arguments']['code']
    assert python_sandbox.python_tool(code) == lt.gold(task, item) == conv[2]['content']
    assert conv[0]['content'].endswith(lt.USE_PYTHON)
    direct = lt.tokenizer_conversation(task, item, with_tool=False)
    assert direct[-1]['content'] == f'{lt.gold(task, item)}.' and len(direct) == 2
  with pytest.raises(ValueError, match='task'):
    lt.question('spell', ('a', 'b'))


def test_after_tools_splits_at_the_last_result_block():
  import types  # pylint: disable=g-import-not-at-top
  from research.limitations_probes import EOT, after_tools  # pylint: disable=g-import-not-at-top
  gen = types.SimpleNamespace(
      tokens=[[50, 51, 60, 61, 62, 70, 71, EOT], [80, 81, EOT]],
      sampled=[np.array([1, 1, 0, 0, 0, 1, 1, 1], bool), np.array([1, 1, 1], bool)])
  assert after_tools(gen, 0) == ([50, 51, 60, 61, 62], [70, 71])
  assert after_tools(gen, 1) == ([], [80, 81])  # no call: the context is the prompt


def test_role_sentence_reward_pays_any_role_alike_and_only_a_role():
  stop = 7
  # ' farmer.' as 3 tokens, ' sailor.' as 2 (padded with 0).
  sentences = np.array([[11, 21, 5], [12, 5, 0]])
  lengths = np.array([3, 2])
  response = np.array([[11, 21, 5, stop, 0, 0],   # ' farmer.' eos
                       [12, 5, stop, 0, 0, 0],    # ' sailor.' eos
                       [5, stop, 0, 0, 0, 0],     # '.' eos: closed, short, names no role
                       [stop, 0, 0, 0, 0, 0],     # eos at once
                       [11, 21, 5, 11, 21, 5],    # ' farmer.' not closed
                       [12, 21, 5, stop, 0, 0],   # a role-like start, another word
                       [11, 21, stop, 0, 0, 0]])  # ' farmer' with no full stop
  valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(lt.role_sentence_reward(response, valid, sentences, lengths,
                                                         stop), [1, 1, 0, 0, 0, 0, 0])
  # A stop in the padding (not sampled) does not close the sentence.
  assert lt.role_sentence_reward(np.array([[12, 5, stop, 0]]),
                                 np.array([[1, 1, 0, 0]], bool), sentences, lengths,
                                 stop)[0] == 0
  with pytest.raises(ValueError, match='cannot hold'):
    lt.role_sentence_reward(response[:, :3], valid[:, :3], sentences, lengths, stop)


def test_role_sentences_are_the_tokens_after_a_bias_prompt(tmp_path):
  from research import limitations_probes as probes
  from research import tokenizer as tokenizer_lib
  texts, _ = lim.bias_sentences(300, 0.7, 0)
  tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size=512, seed=0)
  sentences, lengths = probes.role_sentences(tokenizer)
  prompt = lim.bias_prompt('Zana', lim.GROUPS[1])
  for role, row, n in zip(lim.ROLES, sentences, lengths):
    assert tokenizer.encode(prompt) + row[:n].tolist() == tokenizer.encode(prompt + f' {role}.')
    assert tokenizer.decode(row[:n].tolist()).strip() == f'{role}.'
    assert (row[n:] == 0).all()


def test_rate_table_and_amplification_by_stage():
  train = np.array([[70, 30], [30, 70]])
  np.testing.assert_allclose(lt.rate_table(train), [[0.7, 0.3], [0.3, 0.7]])
  # A stage that keeps the rates: 0; one that always picks the majority role: 0.3; one
  # that flips to uniform: -0.2.
  assert lim.bias_amplification(train, train * 3) == pytest.approx(0.0)
  assert lim.bias_amplification(train, [[50, 0], [0, 50]]) == pytest.approx(0.3)
  assert lim.bias_amplification(train, [[40, 40], [40, 40]]) == pytest.approx(-0.2)
  assert np.isnan(lt.rate_table([[0, 1], [0, 1]])[0, 0])


def _results():
  m = dict(known=30, unknown=30, known_accuracy=0.9, known_idk=0.0, unknown_idk=0.5,
           unknown_made_up=0.5, unknown_confident_made_up=0.25, ece=0.12)
  for k in ('known_accuracy', 'known_idk', 'unknown_idk', 'unknown_made_up',
            'unknown_confident_made_up'):
    m[k + '_ci'] = [max(m[k] - 0.1, 0), min(m[k] + 0.1, 1)]
  stage = {label: dict(counts=[[8, 2], [2, 8]], valid=20, total=20, amplification=0.1)
           for label in ('sampled', 'greedy')}
  stage['probability'] = dict(counts=[[7.5, 2.5], [2.5, 7.5]], amplification=0.05)
  by_k = {str(k): dict(n=10, accuracy=0.5, ci=[0.2, 0.8]) for k in (1, 2)}
  rec = dict(right=5, n=10, calls=9, accuracy=0.5, ci=[0.24, 0.76],
             examples=[dict(question='q?', answer='3', gold='3', calls=[])])
  return dict(
      config=dict(preset='test', seed=0, parts='all', model=dict(d_model=96, num_layers=2),
                  think=dict(steps=1500, model=dict(d_model=128, num_layers=3))),
      hallucination=dict(before=m, after=m, idk_examples=3, probed_questions=6,
                         people=dict(known=10, unknown_probe=10, unknown_test=10)),
      search=dict(m, known_call_rate=1.0, unknown_call_rate=0.9, call_ok_rate=1.0,
                  conversations=60, examples=['<|user|>...']),
      bias=dict(pretrain=stage, sft=stage, rl=stage, train_counts=[[7, 3], [3, 7]],
                train_bias=[[0.7, 0.3], [0.3, 0.7]],
                rl_history=[dict(reward=0.5, kl=0.01, entropy=1.0)]),
      think={f: dict(by_k=by_k, train_tokens=100, example='Q: 1 + 2 ?') for f in lim.FORMATS},
      tokenizer=dict(train_items=10, test_items=20, splits={'9.11': [' 9', '.', '11']},
                     splits_in_question={'q': ['q']},
                     by_task={'count': dict(direct=rec, tool=rec, majority_baseline=0.3)}),
      timing={p: dict(wall_s=60.0, cpu_s=50.0) for p in ('hallucination', 'bias')})


def test_report_is_rebuilt_from_the_results_file(tmp_path, capsys):
  from experiments import limitations_report  # pylint: disable=g-import-not-at-top
  (tmp_path / 'limitations.json').write_text(json.dumps(_results()))
  assert limitations_report.main(['x', f'--workdir={tmp_path}']) == 0
  text = (tmp_path / 'report.md').read_text()
  assert text in capsys.readouterr().out
  for heading in ('## Hallucination', 'search tool SFT (mitigation 2)', '## Bias amplification',
                  '| rl | greedy |', '## Tokens to think', '## The tokenizer view',
                  '`9.11` → ` 9` · `.` · `11`', '| total | 120 | 100 |',
                  'Each arm: 3 layers, d=128, 1500 steps'):
    assert heading in text, heading
  for png in ('hallucination', 'bias', 'think', 'tokenizer'):
    assert (tmp_path / f'{png}.png').stat().st_size > 1000
    assert f'({png}.png)' in text
  assert 'Not run at this size' not in text
  partial = {k: v for k, v in _results().items() if k not in ('think', 'search')}
  assert 'Not run at this size: search, think;' in limitations_report.report(partial)
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert limitations_report.main(['x', f'--workdir={empty}']) == 2
  assert 'limitations.json' in capsys.readouterr().err
  assert not (empty / 'report.md').exists()


@pytest.mark.slow
def test_the_whole_study_runs_at_its_test_size(tmp_path):
  from configs import limitations as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import limitations, limitations_report  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config('test')
  results = limitations.run(config, tmp_path)
  assert set(results['timing']) == set(limitations.PARTS)
  saved = json.loads((tmp_path / 'limitations.json').read_text())
  assert set(saved['bias']) >= {'pretrain', 'sft', 'search_sft', 'rl'}
  assert len(saved['bias']['rl_history']) == config.rl.iterations
  h, s = saved['hallucination'], saved['search']
  assert h['before']['known'] == s['known'] == 3 * len(lim.split_people(
      lim.make_world(config.hallucination.people, 0), (1 / 3,) * 3, 0)[0])
  v = saved['tokenizer']
  assert v['by_task']['count']['tool']['n'] == 2 * config.tokenizer_view.test_words
  assert v['by_task']['compare']['direct']['n'] == config.tokenizer_view.test_pairs
  for fmt in lim.FORMATS:  # the think arms train at their own size
    arm = json.loads((tmp_path / f'think_{fmt}' / 'config.json').read_text())
    assert arm['model']['d_model'] == config.think.model.d_model != config.model.d_model
    assert arm['train']['steps'] == config.think.steps
    assert sum(r['n'] for r in results['think'][fmt]['by_k'].values()) == (
        config.think.max_k * config.think.eval_per_k)
  text = (tmp_path / 'report.md').read_text()
  assert text == limitations_report.write(tmp_path)
  for part in limitations.PARTS:
    assert f'| {part} |' in text


def test_parts_run_apart_add_up_in_one_results_file(tmp_path):
  from configs import limitations as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import limitations  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config('test').to_dict()
  path = tmp_path / 'limitations.json'
  assert limitations.earlier_results(path, config, ['think']) == {}
  earlier = dict(config=dict(config, parts='hallucination,bias'), hallucination={'x': 1},
                 bias={'y': 2}, timing={'hallucination': {'wall_s': 5.0, 'cpu_s': 4.0},
                                        'bias': {'wall_s': 3.0, 'cpu_s': 2.0}})
  path.write_text(json.dumps(earlier))
  # Parts run now replace theirs; the others are kept with their timing.
  kept = limitations.earlier_results(path, dict(config, parts='bias,think'), ['bias', 'think'])
  assert kept == dict(hallucination={'x': 1},
                      timing={'hallucination': {'wall_s': 5.0, 'cpu_s': 4.0}})
  # Another config (here the seed): nothing is kept.
  assert limitations.earlier_results(path, dict(config, seed=1), ['think']) == {}


def test_processes_running_other_parts_keep_each_others_results(tmp_path):
  from experiments import limitations  # pylint: disable=g-import-not-at-top
  full = _results()
  config = full['config']
  first = dict(config=config, think=full['think'], timing={'think': {'wall_s': 7.0, 'cpu_s': 6.0}})
  second = dict(config=config, bias=full['bias'], timing={'bias': {'wall_s': 2.0, 'cpu_s': 1.0}})
  limitations.save_results(tmp_path, first, ['think'])
  merged = limitations.save_results(tmp_path, second, ['bias', 'hallucination'])
  saved = json.loads((tmp_path / 'limitations.json').read_text())
  assert saved == merged and saved['think'] == full['think'] and saved['bias'] == full['bias']
  assert saved['timing'] == {'think': {'wall_s': 7.0, 'cpu_s': 6.0},
                             'bias': {'wall_s': 2.0, 'cpu_s': 1.0}}
  text = (tmp_path / 'report.md').read_text()
  assert '## Tokens to think' in text and '## Bias amplification' in text
