"""The RLHF methods study: matched budgets asserted, the unbiased best-of-n estimate, and
(slow) every arm end to end on a tiny model, a report naming every arm, rebuilt from
the files alone, and a rerun that runs nothing again."""
import itertools
import json
import math

import numpy as np
import pytest

from configs import compare_rlhf as study_config
from experiments import common
from experiments import compare_rlhf as study
from experiments import compare_rlhf_report as study_report
from research import rl_tasks
from tests.test_rlhf import pretrained  # pylint: disable=unused-import  (a fixture)


def _dict(config):
  return json.loads(json.dumps(config.to_dict()))


def test_budgets_are_matched_and_a_mismatch_is_refused():
  config = _dict(study_config.get_config('cpu'))
  budgets = study.arm_budgets(config)
  assert sorted(budgets) == sorted(study_config.ARMS)
  assert {b['responses'] for b in budgets.values()} == {8 * 32}
  assert budgets['grpo']['prompts'] == 8 * 32 // 4 and budgets['ppo']['prompts'] == 8 * 32
  assert budgets['dpo'] == dict(responses=256, prompts=128, per_prompt=2, prompt_set='train')
  assert budgets['best_of_n']['per_prompt'] == 256 // 32
  study.check_equal_budget(budgets)  # no error
  with pytest.raises(study.BudgetError, match='unequal'):
    study.check_equal_budget(dict(budgets, dpo=dict(budgets['dpo'], responses=510)))
  config['rlhf']['data']['eval_prompts'] = 60  # 256 samples cannot split evenly
  with pytest.raises(common.UserError, match='eval_prompts'):
    study.arm_budgets(config)
  config = _dict(study_config.get_config('cpu'))
  config['rl_arms']['grpo']['group_size'] = 5
  with pytest.raises(common.UserError, match='group_size'):
    study.arm_budgets(config)


def test_best_of_n_expected_is_the_mean_over_all_subsets():
  rng = np.random.default_rng(0)
  proxy, gold = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
  rows = rl_tasks.best_of_n_expected(proxy, gold, range(1, 7))
  for row in rows:
    n = row['n']
    want_p, want_g = [], []
    for i in range(3):
      subsets = list(itertools.combinations(range(6), n))
      best = [max(s, key=lambda j: proxy[i, j]) for s in subsets]
      want_p.append(np.mean([proxy[i, j] for j in best]))
      want_g.append(np.mean([gold[i, j] for j in best]))
    assert row['proxy'] == pytest.approx(np.mean(want_p))
    assert row['gold'] == pytest.approx(np.mean(want_g))
    assert row['kl'] == pytest.approx(math.log(n) - (n - 1) / n)
  assert rows[0]['proxy'] == pytest.approx(proxy.mean())  # n = 1: any sample
  assert rows[-1]['gold'] == pytest.approx(gold[np.arange(3), proxy.argmax(1)].mean())
  assert rl_tasks.best_of_n_expected(proxy, None, [2])[0]['gold'] is None
  with pytest.raises(ValueError, match='best-of-7'):
    rl_tasks.best_of_n_expected(proxy, gold, [7])


def micro_config(root):
  config = study_config.get_config('test')
  for key, value in {'rlhf.data.corpus': root / 'corpus', 'rlhf.data.min_sentence_words': 6,
                     'rlhf.data.min_words': 2, 'rlhf.data.max_words': 4}.items():
    common.apply_override(config, key, str(value))
  return config


@pytest.mark.slow
def test_every_arm_runs_the_report_names_them_and_a_rerun_skips(pretrained, tmp_path,
                                                                monkeypatch):
  init, workdir = pretrained / 'pretrain', tmp_path / 'study'
  config = micro_config(pretrained)
  results = study.run_study(config, workdir, init)
  arms = study_config.ARMS
  assert sorted(results) == sorted(arms)
  for arm in arms:
    assert len(results[arm]) == 2 and all(r is not None for r in results[arm]), arm
    for seed, run in zip((0, 1), results[arm]):
      assert run['seed'] == seed and (workdir / arm / f'seed{seed}' / study.RESULT_FILE).exists()
      assert run['budget']['responses'] == 4 * 8
      points = run['curve']
      assert len(points) >= 3 and all(math.isfinite(p['gold']) and math.isfinite(p['proxy'])
                                      for p in points), arm
      assert points[0]['kl_k1'] == pytest.approx(0.0, abs=1e-4)  # every curve starts at init
  # Same evaluation prompts and key: every arm of a seed starts at the same point.
  for seed in (0, 1):
    starts = {arm: results[arm][seed]['curve'][0] for arm in arms if arm != 'best_of_n'}
    assert len({round(p['gold'], 6) for p in starts.values()}) == 1, starts
  assert [p['x'] for p in results['dpo'][0]['curve']] == [0, 2, 4]
  assert [p['x'] for p in results['best_of_n'][0]['curve']] == [1, 2, 3, 4]
  # One proxy for all: trained by the first RL arm of the first seed.
  rm_dirs = {results[a][s]['reward_model']['workdir'] for a in study_config.RL_ARMS
             for s in (0, 1)}
  assert rm_dirs == {str(workdir / 'ppo' / 'seed0' / 'reward_model')}
  assert not (workdir / 'grpo' / 'seed1' / 'reward_model').exists()

  text = (workdir / 'report.md').read_text()
  for arm in arms:
    assert f'| {arm} |' in text, arm
  for needle in ('reward_vs_kl.png', 'd(α − βd)', 'Against the paper', 'sampled responses'):
    assert needle in text, needle
  assert (workdir / study_report.PLOT_FILE).stat().st_size > 1000
  fits = json.loads((workdir / study_report.FITS_FILE).read_text())
  assert sorted(fits) == sorted(arms)

  # The report is rebuilt from study.json and results.json alone, identically.
  (workdir / 'report.md').unlink()
  (workdir / study_report.PLOT_FILE).unlink()
  assert study_report.main(['compare_rlhf_report', f'--workdir={workdir}']) == 0
  assert (workdir / 'report.md').read_text() == text
  assert (workdir / study_report.PLOT_FILE).exists()

  # Rerunning skips every finished arm: nothing is trained or sampled again.
  def refuse(*args, **kwargs):
    raise AssertionError('a finished arm ran again')
  monkeypatch.setattr(study.rlhf_stage, 'run', refuse)
  monkeypatch.setattr(study.dpo_stage, 'train', refuse)
  monkeypatch.setattr(study, 'Task', refuse)
  again = study.run_study(config, workdir, init)
  assert again == results


def test_bad_configs_are_one_line_errors_before_anything_is_written(pretrained, tmp_path):
  init, workdir = pretrained / 'pretrain', tmp_path / 'study'
  with pytest.raises(common.UserError, match='init'):
    study.run_study(micro_config(pretrained), workdir, '')
  config = micro_config(pretrained)
  config.arms = ('ppo', 'sft')
  with pytest.raises(common.UserError, match="arm 'sft'"):
    study.run_study(config, workdir, init)
  config = micro_config(pretrained)
  config.arms = ('dpo', 'best_of_n')  # nothing would train the proxy
  with pytest.raises(common.UserError, match='reward_model_workdir'):
    study.run_study(config, workdir, init)
  config = micro_config(pretrained)
  config.rlhf.gold = 'none'
  with pytest.raises(common.UserError, match='gold'):
    study.run_study(config, workdir, init)
  assert not workdir.exists()


def _synthetic_study(tmp_path, rl_alpha, rl_beta, seeds=3):
  """study.json + results.json of a best-of-n arm and a PPO arm whose gold curves follow
  Gao et al.'s forms (bon: α 0.4, β 0.2, peak d* = 1; ppo: the given α, β)."""
  from research import overoptimization as overopt
  config = _dict(study_config.get_config('test'))
  config['arms'] = ['ppo', 'best_of_n']
  config['seeds'] = list(range(seeds))
  rng = np.random.default_rng(0)
  results = {}
  for arm, form, (a, b), d_max in (('best_of_n', 'bon', (0.4, 0.2), 2.0),
                                   ('ppo', 'rl', (rl_alpha, rl_beta), 4.0)):
    results[arm] = []
    for seed in range(seeds):
      d = np.linspace(0.0, d_max, 9)
      gold = 0.1 + overopt.predict(form, a, b, d) + rng.normal(0, 0.002, d.shape)
      curve = [dict(x=i, sqrt_kl=float(x), kl_k1=float(x * x), gold=float(g),
                    proxy=float(0.5 * x)) for i, (x, g) in enumerate(zip(d, gold))]
      results[arm].append(dict(arm=arm, seed=seed, curve=curve,
                               timing=dict(wall_seconds=60.0, cpu_seconds=30.0)))
  facts = dict(budgets={a: dict(responses=32, prompts=8, per_prompt=4, prompt_set='train')
                        for a in config['arms']},
               reward_model=dict(workdir='rm', heldout=dict(accuracy=0.6, interval=[0.5, 0.7],
                                                            n=50)))
  study_report.save_inputs(tmp_path, config, 'init', results, facts)
  return study_report.write(tmp_path)


def test_report_fits_and_judges_constructed_curves(tmp_path):
  text = _synthetic_study(tmp_path, rl_alpha=0.4, rl_beta=0.2)  # RL peak at d* = e
  fits = json.loads((tmp_path / study_report.FITS_FILE).read_text())
  assert fits['best_of_n']['alpha'] == pytest.approx(0.4, abs=0.01)
  assert fits['best_of_n']['d_peak'] == pytest.approx(1.0, abs=0.02)
  assert fits['ppo']['d_peak'] == pytest.approx(math.e, rel=0.02)
  assert fits['ppo']['unit'] == 'seeds'
  assert 'gold peaks then falls in 3 of 3 seeds' in text
  assert 'Shown for ppo.' in text
  assert '| best_of_n | bon | 0.4' in text
  # A gold curve that keeps rising: no measured peak, and RL's is not judged larger.
  text = _synthetic_study(tmp_path, rl_alpha=0.3, rl_beta=0.01)
  assert 'ppo: gold peaks then falls in 0 of 3 seeds' in text
  assert 'Not shown: no RL arm' in text
  # RL peaking before best-of-n (d* = e^−0.5), both inside the data: not shown either.
  text = _synthetic_study(tmp_path, rl_alpha=0.2, rl_beta=0.4)
  assert 'ppo: gold peaks then falls in 3 of 3 seeds' in text
  assert 'Not shown: no RL arm' in text
