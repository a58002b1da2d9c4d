"""The reward-model stage end to end on a tiny model: learns a separable preference from
JSONL pairs, loads back as a stage with the same scores, resumes, trains on given arrays,
and its CLI errors are one line."""
import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from configs import reward_model as rm_config
from experiments import common
from experiments import loop as loop_lib
from experiments import reward_model as rm_experiment
from experiments import reward_model_report
from research import checkpoint as checkpoint_lib
from research import model as model_lib
from research import data as data_lib
from research import preferences
from research import reward_model
from tests.test_pretrain import WORDS, tiny_pretrain_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set(config, **values):
  for name, value in values.items():
    common.apply_override(config, name.replace('__', '.'), str(value))
  return config


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  return tiny_pretrain_workdir(tmp_path_factory.mktemp('rm'), seq_len=64, d_model=32,
                               num_layers=1, steps=2)


def write_pairs(path: pathlib.Path, n: int, seed=0) -> pathlib.Path:
  """Separable pairs: every chosen reply ends "good good", every rejected one "bad bad"."""
  rng = random.Random(seed)
  words = lambda k: ' '.join(rng.choice(WORDS) for _ in range(k))
  with open(path, 'w') as f:
    for i in range(n):
      prompt = f'{words(rng.randint(2, 6))} {i}?'
      f.write(json.dumps(dict(prompt=prompt, chosen=f'{words(rng.randint(1, 4))} good good',
                              rejected=f'{words(rng.randint(1, 4))} bad bad')) + '\n')
  return path


def rm_config_for(path, steps=40):
  return _set(rm_config.get_config('test'), data__path=path, train__steps=steps,
              data__seq_len=48, data__batch_size=16, optimizer__learning_rate=3e-3,
              optimizer__warmup_steps=4, data__heldout_fraction=0.25, train__log_every=5,
              train__checkpoint_every=20)


@pytest.mark.slow
def test_reward_model_learns_separable_pairs_loads_back_and_resumes(pretrained, tmp_path):
  data = write_pairs(tmp_path / 'pairs.jsonl', 200)
  config = rm_config_for(data)
  summary = rm_experiment.train(config, tmp_path / 'rm', pretrained)
  h = summary['heldout']
  assert summary['steps'] == 40 and not summary['interrupted']
  assert h['n'] == 50 and summary['data']['train'] == 150
  assert h['accuracy'] > 0.9, summary
  assert h['interval'][0] < h['accuracy'] < h['interval'][1] or h['accuracy'] == 1.0
  assert summary['train_accuracy'] > 0.9
  assert summary['heldout_before']['n'] == 50
  written = json.loads((tmp_path / 'rm' / 'summary.json').read_text())
  assert written['offset'] == pytest.approx(summary['offset'])
  text = (tmp_path / 'rm' / 'report.md').read_text()
  assert 'Wilson' in text
  (tmp_path / 'rm' / 'report.md').unlink()  # rebuilt from the run's files alone
  assert reward_model_report.main(['report', f'--workdir={tmp_path / "rm"}']) == 0
  assert (tmp_path / 'rm' / 'report.md').read_text() == text
  rows = [json.loads(l) for l in (tmp_path / 'rm' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'train/loss' in r] == [1, 5, 10, 15, 20, 25, 30, 35, 40]

  # The workdir is a stage: params with a scalar head, config, tokenizer, offset.
  params, cfg, tokenizer, offset = checkpoint_lib.load_reward_model(tmp_path / 'rm')
  assert cfg.scalar_head and params['scalar_head'].shape == (cfg.d_model, 1)
  assert offset == pytest.approx(summary['offset'])
  _, saved, _ = checkpoint_lib.load_stage(tmp_path / 'rm')
  assert saved['model']['scalar_head'] and saved['init'] == str(pretrained)
  # Same held-out scores from the loaded params (the same prompt-disjoint split).
  resolved = rm_experiment.resolve_config(config)
  _, held, _, _ = preferences.load_configured_pairs(resolved['data'], resolved['seed'])
  arrays = preferences.tokenize_pairs(tokenizer, held, 48)
  score_fn = rm_experiment.make_score_fn(model_lib.Transformer(cfg))
  c, r = reward_model.score_pairs(score_fn, params, arrays, 32)
  again = reward_model.pair_metrics(c, r)
  assert again['accuracy'] == h['accuracy']
  assert again['margin'] == pytest.approx(h['margin'], rel=1e-4, abs=1e-5)

  # A second call resumes the finished run: no training, the same figures.
  resumed = rm_experiment.train(config, tmp_path / 'rm', pretrained)
  assert resumed['steps'] == 40
  assert resumed['heldout']['margin'] == pytest.approx(h['margin'], rel=1e-4, abs=1e-5)
  assert resumed['offset'] == pytest.approx(summary['offset'], rel=1e-4, abs=1e-5)
  rows_after = (tmp_path / 'rm' / 'metrics.jsonl').read_text().splitlines()
  assert not [l for l in rows_after[len(rows):] if 'train/loss' in l]

  # Killed after step 25 (checkpoint at 20, rows of 21-25 written), then resumed: it
  # restores step 20 with its batch position, takes steps 21-40 only, and ends with the
  # uninterrupted run's losses, held-out scores and offset.
  with loop_lib.simulate_kill(25), pytest.raises(loop_lib.SimulatedKill):
    rm_experiment.train(config, tmp_path / 'killed', pretrained)
  assert checkpoint_lib.Checkpointer(tmp_path / 'killed').latest_step() == 20
  assert max(r['step'] for r in loop_lib.read_metrics(tmp_path / 'killed')) == 25
  again = rm_experiment.train(config, tmp_path / 'killed', pretrained)
  assert (again['loop']['resumed_from'], again['loop']['steps_run']) == (20, 20)
  train_losses = lambda w: [(r['step'], r['train/loss']) for r in loop_lib.read_metrics(w)
                            if 'train/loss' in r]
  got, expected = train_losses(tmp_path / 'killed'), train_losses(tmp_path / 'rm')
  assert [s for s, _ in got] == [1, 5, 10, 15, 20, 21, 25, 30, 35, 40]  # 21: a call's first
  assert {s: l for s, l in got if s != 21} == dict(expected)
  assert again['heldout']['margin'] == h['margin'] and again['offset'] == summary['offset']

  # A different model config is refused, not overwritten.
  with pytest.raises(checkpoint_lib.CheckpointError, match='different model'):
    rm_experiment.train(_set(rm_config_for(data), data__seq_len=40), tmp_path / 'rm', pretrained)

  # Given arrays (what the RLHF stage passes) train the same way; a run stopped early saves,
  # and the next call finishes it from where it stopped.
  tok = checkpoint_lib.load_tokenizer(pretrained)
  lists = lambda side: [tok.encode(f'x {i} {side}') for i in range(48)]
  given = preferences.pairs_from_token_lists(lists('good good'), lists('bad bad'), 48)
  split = ({k: v[:40] for k, v in given.items()}, {k: v[40:] for k, v in given.items()})
  short = lambda steps: _set(rm_config_for(data, steps=steps), eval__before=False)
  part = rm_experiment.train(short(4), tmp_path / 'arrays', pretrained, pairs=split)
  assert part['steps'] == 4 and part['heldout']['n'] == 8
  done = rm_experiment.train(short(8), tmp_path / 'arrays', pretrained, pairs=split)
  assert done['steps'] == 8 and done['data']['source'] == 'arrays'


def test_batches_are_seeded_epochs_and_resumable():
  sampler = data_lib.EpochSampler(10, 4, seed=3)
  steps = [next(sampler) for _ in range(5)]
  flat = np.concatenate(steps)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:20])  # a new permutation each epoch
  np.testing.assert_array_equal(flat[:10], np.random.default_rng([3, 0]).permutation(10))
  resumed = data_lib.EpochSampler(10, 4, seed=3)
  resumed.set_state(data_lib.EpochSampler(10, 4, seed=3, position=12).get_state())
  np.testing.assert_array_equal(next(resumed), steps[3])
  assert len(next(data_lib.EpochSampler(3, 8, seed=0))) == 8  # fewer items than a batch


@pytest.mark.slow
def test_cli_errors_are_one_line(pretrained, tmp_path):
  good = write_pairs(tmp_path / 'good.jsonl', 4)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(good.read_text() + '{"prompt": "hi", "chosen": "a"}\n')
  # Through the command line: exit 2 and one line on stderr.
  for args, expected in [([], 'no init workdir'),
                         ([f'--init={pretrained}', f'--config.data.path={bad}'], 'bad.jsonl:5')]:
    out = subprocess.run([sys.executable, '-m', 'experiments.reward_model',
                          '--config=configs/reward_model.py:test', f'--workdir={tmp_path / "w"}',
                          *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count('\n') == 1 and expected in out.stderr, out.stderr
  # The other input errors are UserErrors too (what the command line prints as one line).
  cases = [
      (dict(init=str(tmp_path / 'missing')), 'missing'),
      (dict(data__path=tmp_path / 'nope.jsonl'), 'nope.jsonl: no such file'),
      (dict(data__path=good, data__seq_len=1), 'no training pairs'),  # all identical when cut
      (dict(data__source='hh_rlhf', data__path=tmp_path / 'hh.jsonl.gz'), 'hh.jsonl.gz'),
  ]
  for values, expected in cases:
    config = _set(rm_config.get_config('test'), **{'init': pretrained, **values})
    with pytest.raises(common.UserError, match=expected) as e:
      rm_experiment.main(config, tmp_path / 'w')
    assert '\n' not in str(e.value)
  assert not (tmp_path / 'w').exists()
