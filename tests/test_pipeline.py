"""The whole pipeline at test size: every stage runs (evaluation included), a rerun skips
them, the report card names them all and is rebuilt from the files, a kill at a random
point followed by a restart ends with the same report numbers, and a non-default RL
method (DPO) runs from the SFT stage. Fast checks: the held-out word problems, the
overall ETA, the rl_method checks and the harness skip without ../shared."""
import json
import random
import shutil
import time

import pytest

from configs import pipeline as pipeline_config
from experiments import common
from experiments import loop as loop_lib
from experiments import pipeline
from experiments import pipeline_eval
from experiments import pipeline_report
from research import conversations as conv_lib
from tests.test_rlhf import write_corpus

slow = pytest.mark.slow

# Each Loop.run of the test preset, in order: (steps, checkpoint every, the file of its
# stage's summary and the path to its `loop` record there).
LOOPS = ((6, 2, 'pretrain/summary.json', ('loop',)),
         (6, 2, 'sft/eval.json', ('train', 'loop')),
         (4, 2, 'rlhf/reward_model/summary.json', ('loop',)),
         (2, 1, 'rlhf/summary.json', ('loop',)))


def config_for(corpus):
  config = pipeline_config.get_config('test')
  for name, value in (('pretrain.data.corpus', corpus), ('rlhf.data.corpus', corpus),
                      ('pretrain.train.checkpoint_every', 2), ('sft.train.checkpoint_every', 2),
                      ('rlhf.reward_model.train.checkpoint_every', 2),
                      ('rlhf.checkpoint_every', 1)):
    common.apply_override(config, name, str(value))
  return config


def numbers(card: dict) -> dict:
  """The card without wall times and the environment (what a rerun must reproduce): the
  limitation parts' `timing` and their report text (which prints those times) go too."""
  def strip(x):
    if isinstance(x, dict):
      return {k: strip(v) for k, v in x.items()
              if k not in ('minutes', 'cpu_minutes', 'environment', 'workdir', 'timing')
              and not (k == 'report' and isinstance(v, str))}
    if isinstance(x, list):
      return [strip(v) for v in x]
    return x
  return strip(card)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('pipeline_corpus'))


@pytest.fixture(scope='module')
def straight(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pipeline') / 'run'
  return workdir, pipeline.run(config_for(corpus), workdir)


@slow
def test_every_stage_runs_then_is_skipped_and_the_card_names_them(corpus, straight,
                                                                   monkeypatch):
  workdir, card = straight
  assert set(card['stages']) == {'pretrain', 'sft', 'rlhf', 'evaluate'}
  assert card['stages']['pretrain']['steps'] == 6 and card['stages']['sft']['steps'] == 6
  assert card['stages']['rlhf']['steps'] == 2
  sft_config = json.loads((workdir / 'sft' / 'config.json').read_text())
  assert sft_config['data']['tools_in_system'] and sft_config['data']['weights']['calculator'] > 0
  ev = card['stages']['evaluate']
  assert set(ev['word_problems']) == {'pretrain', 'sft', 'rl'}
  assert ev['models']['rl'].endswith('policy')  # PPO's policy, not the SFT model
  for scores in ev['word_problems'].values():
    assert set(scores['with_tools']) == set(scores['without']) == {'1', '2'}
    assert sum(r['total'] for r in scores['with_tools'].values()) == ev['problems']['total']
  assert ev['problems']['total'] == 2 * 3 - ev['problems']['dropped']
  harness = ev['harness']['sft']
  if pipeline_eval.shared_data_dir().is_dir():
    assert {r['task'] for r in harness['rows']} == {'piqa_local'}
  else:
    assert 'not found' in harness['skipped']
  assert all(ev['limitations']['results']['bias'][s]['sampled']['total'] > 0
             for s in ('pretrain', 'sft', 'rl'))
  assert card['cpu_minutes'].keys() == card['stages'].keys()
  text = (workdir / 'report.md').read_text()
  for needle in ('| pretrain |', '| sft |', '| reward model |', '| rl (gae) |', '| evaluate |',
                 'Word problems after SFT', '## Benchmarks across stages',
                 '| word problems k=2, calculator |', 'with the calculator vs without',
                 '## Limitations at a small size', '## Conversations with the calculator',
                 '## Environment', 'loss_curves.png'):
    assert needle in text, needle
  assert pipeline_report.headline_rows(card)[0] in text  # the printed headline is the report's
  assert (workdir / 'loss_curves.png').stat().st_size > 1000
  assert json.loads((workdir / 'report.json').read_text())['stages'].keys() == card['stages'].keys()

  # A rerun trains nothing: every stage is skipped, and the card is the same.
  def fail(*args, **kwargs):
    raise AssertionError('a finished stage was run again')
  for module, name in ((pipeline.pretrain, 'train'), (pipeline.sft, 'finetune'),
                       (pipeline.rlhf, 'run'), (pipeline.pipeline_eval, 'run')):
    monkeypatch.setattr(module, name, fail)
  assert numbers(pipeline.run(config_for(corpus), workdir)) == numbers(card)
  # The card is rebuilt from the files alone.
  (workdir / 'report.md').unlink()
  assert pipeline_report.main(['report', f'--workdir={workdir}']) == 0
  assert (workdir / 'report.md').read_text() == text


@slow
def test_kill_at_a_random_point_then_restart_gives_the_same_numbers(corpus, straight,
                                                                      tmp_path):
  _, card = straight
  rng = random.Random()
  run_index = rng.randrange(len(LOOPS))
  total, every, summary_file, keys = LOOPS[run_index]
  steps = rng.randint(every + 1, total)  # after that loop's first checkpoint: a real resume
  where = f'loop {run_index} after {steps} steps'
  workdir = tmp_path / 'killed'
  with loop_lib.simulate_kill(steps, skip_runs=run_index), \
      pytest.raises(loop_lib.SimulatedKill):
    pipeline.run(config_for(corpus), workdir)
  assert not (workdir / 'report.md').exists(), where
  again = pipeline.run(config_for(corpus), workdir)
  assert numbers(again) == numbers(card), where
  # The killed stage resumed from its last checkpoint before the kill (the kill comes
  # before step `steps`'s checkpoint) and took only the steps after it.
  record = json.loads((workdir / summary_file).read_text())
  for key in keys:
    record = record[key]
  latest = (steps - 1) // every * every
  assert record['resumed_from'] == latest, (where, record)
  assert record['steps_run'] == total - latest, (where, record)


@slow
def test_from_stage_moves_later_stages_aside_and_reruns_them(corpus, straight, tmp_path):
  source, card = straight
  workdir = tmp_path / 'copy'
  shutil.copytree(source, workdir)
  config = config_for(corpus)
  config.from_stage = 'rlhf'
  start = time.time()
  again = pipeline.run(config, workdir)
  elapsed = time.time() - start
  assert (workdir / 'previous' / 'rlhf-0' / 'summary.json').exists()  # kept, not deleted
  # The rerun stages' times restart: what was moved aside is not added to them.
  times = json.loads((workdir / pipeline.TIMES_FILE).read_text())
  assert times['sft'] == json.loads((source / pipeline.TIMES_FILE).read_text())['sft']
  assert times['rlhf'] + times['evaluate'] <= elapsed + 0.5
  assert numbers(again) == numbers(card)
  config.from_stage = 'nonsense'
  with pytest.raises(common.UserError, match='from_stage'):
    pipeline.run(config, workdir)


@slow
def test_dpo_by_config_runs_from_the_sft_stage_and_is_evaluated(corpus, straight, tmp_path):
  source, card = straight
  workdir = tmp_path / 'dpo'
  shutil.copytree(source, workdir)
  config = config_for(corpus)
  config.rl_method, config.from_stage = 'dpo', 'rlhf'
  dpo_card = pipeline.run(config, workdir)
  rl = dpo_card['stages']['rlhf']
  assert rl['method'] == 'dpo' and rl['steps'] == config.dpo.train.steps
  assert (workdir / 'rlhf' / pipeline.PAIRS_FILE).exists()
  assert rl['heldout']['n'] >= 1 and rl['end']['gold'] is not None
  # The evaluation reran on the DPO policy (the rlhf folder itself), the rest is the same.
  assert dpo_card['stages']['evaluate']['models']['rl'] == 'rlhf'
  assert numbers(dpo_card)['stages']['sft'] == numbers(card)['stages']['sft']
  text = (workdir / 'report.md').read_text()
  assert '| rl (dpo, sigmoid' in text and '| reward model |' not in text
  assert 'DPO: held-out implicit-reward accuracy' in pipeline_report.headline(dpo_card)


def test_rl_method_sets_the_estimator_and_rejects_unknown_ones():
  config = pipeline_config.get_config('test')
  config.rl_method = 'grpo'
  pipeline.check_config(config)
  assert config.rlhf.ppo.advantage == 'grpo' and config.rlhf.ppo.group_size == 4
  assert config.rlhf.ppo.batch_size % config.rlhf.ppo.group_size == 0
  config = pipeline_config.get_config('test')
  config.rl_method = 'reinforce'
  with pytest.raises(common.UserError, match='rl_method'):
    pipeline.check_config(config)
  config = pipeline_config.get_config('test')
  config.rlhf.ppo.advantage = 'rloo'  # says ppo but asks for another estimator
  with pytest.raises(common.UserError, match='rl_method=ppo'):
    pipeline.check_config(config)


def test_every_preset_builds_and_pod_only_changes_the_mesh():
  for preset in pipeline_config.PRESETS:
    config = pipeline_config.get_config(preset)
    assert set(config.budget_minutes) == set(pipeline.STAGES)
    assert config.sft.data.weights.calculator > 0 and config.sft.data.tools_in_system
  gpu, pod = (pipeline_config.get_config(p).to_dict() for p in ('gpu', 'pod'))
  stages = ('pretrain', 'sft', 'rlhf', 'dpo')  # every stage that trains on a mesh
  assert all(pod[stage]['mesh']['shape'] == (-1, 1, 1) for stage in stages)
  for config in (gpu, pod):
    config['preset'] = None
    for stage in stages:
      config[stage]['mesh']['shape'] = None
  assert gpu == pod


def test_overall_eta_rescales_the_budgets_by_the_finished_stages():
  config = pipeline_config.get_config('tiny')
  budget = {s: 60 * config.budget_minutes[s] for s in pipeline.STAGES}
  assert pipeline.overall_eta(config, {}, {}, 0) == pytest.approx(sum(budget.values()))
  # The first stage took twice its budget: the rest is expected to as well.
  eta = pipeline.overall_eta(config, {}, {'pretrain': 2 * budget['pretrain']}, 1)
  assert eta == pytest.approx(2 * (budget['sft'] + budget['rlhf'] + budget['evaluate']))
  assert pipeline.overall_eta(config, {}, {}, len(pipeline.STAGES)) == 0


def test_heldout_word_problems_never_hold_a_trained_question():
  sft_config = pipeline_config.get_config('tiny').sft.to_dict()
  wp = sft_config['data']['word_problems']
  ks = range(wp['min_steps'], wp['max_steps'] + 1)
  # The pipeline's sizes, then an SFT test set of 1 per k against 300 here: more problems
  # drawn from the SFT test seed than it held out reach its training questions.
  for sft_per_k, per_k, eval_ks in ((20, 60, (1, 2)), (1, 300, (1,))):
    sft_config['eval']['word_problems_per_k'] = sft_per_k
    problems, dropped = pipeline_eval.heldout_problems(sft_config, per_k, eval_ks)
    assert {p.k for p in problems} == set(eval_ks)
    assert len(problems) == per_k * len(eval_ks) - dropped
    for k in eval_ks:
      train, test = conv_lib.word_problem_splits(wp['num_train'] // len(ks), sft_per_k,
                                                 steps=(k, k), seed=sft_config['seed'] * 1000 + k)
      mine = {p.question for p in problems if p.k == k}
      assert not mine & {p.question for p in train}
      assert {p.question for p in test} <= mine  # the SFT stage's own test set is inside
  assert dropped > 0  # the second case reached trained questions, and dropped them


def test_harness_is_skipped_with_a_reason_without_shared_data(tmp_path, monkeypatch):
  monkeypatch.setenv('RESEARCH_SHARED_DATA', str(tmp_path / 'absent'))
  out = pipeline_eval.harness_scores({'sft': tmp_path}, {'tasks': ['piqa_local']},
                                     tmp_path / 'harness')['sft']
  assert 'absent not found' in out['skipped'] and 'rows' not in out
  scores = dict(with_tools={'1': dict(correct=1, total=2, accuracy=0.5, interval=[0.1, 0.9])},
                without={'1': dict(correct=0, total=2, accuracy=0.0, interval=[0.0, 0.7])},
                calls=dict(valid=1, calls=2))
  ev = dict(word_problems={'sft': scores}, harness={'sft': out})
  text = '\n'.join(pipeline_report.benchmark_table(ev))
  assert 'Harness tasks skipped: ' + out['skipped'] in text
  assert '| word problems k=1, calculator | 0.50 [0.10, 0.90] |' in text


def test_sft_tool_data_declares_the_calculator_and_plain_problems_do_not():
  from experiments import sft  # pylint: disable=g-import-not-at-top
  from research.tools import data as tools_data  # pylint: disable=g-import-not-at-top
  config = pipeline_config.get_config('test').sft.to_dict()
  config['data']['weights']['gsm8k_tools'] = 0.0  # (needs ../shared; same code path)
  train, held, _ = sft.load_sources(config)
  system = {'role': 'system', 'content': tools_data.calculator_system()}
  for convs in (train['calculator'], held['calculator']):
    assert all(c[0] == system and any(m.get('tool_calls') for m in c) for c in convs)
  for convs in (train['word_problems'], train['chatterbot']):
    assert all(c[0]['role'] == 'user' for c in convs)
  # The same problems in both styles: the system message is the only cue to call.
  assert {c[1]['content'] for c in train['calculator']} == \
      {c[0]['content'] for c in train['word_problems']}
  config['data']['tools_in_system'] = False  # configs/sft.py's default: no system message
  train, _, _ = sft.load_sources(config)
  assert all(c[0]['role'] == 'user' for c in train['calculator'])
