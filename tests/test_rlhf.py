"""RLHF end to end on a tiny model: reward model on gold-labelled pairs -> PPO -> report,
exact resume after a kill, best-of-n, and one-line CLI errors."""
import functools
import json
import math
import os
import pathlib
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from configs import rlhf as rlhf_config
from experiments import common
from experiments import loop as loop_lib
from experiments import rlhf
from experiments import rlhf_report
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import model as model_lib
from research import ppo
from research import reward_model
from research import rl_tasks
from research import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ('the nation people congress year government states war peace law trade work union '
         'great public country free power good bad happy sad hope fear love hate strong weak '
         'success failure proud terrible').split()


def _set(config, **values):
  for name, value in values.items():
    common.apply_override(config, name.replace('__', '.'), str(value))
  return config


def write_corpus(path: pathlib.Path, docs=80, seed=0) -> pathlib.Path:
  rng = random.Random(seed)
  path.mkdir(parents=True, exist_ok=True)
  for i in range(docs):
    sentences = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + '.'
                 for _ in range(rng.randint(8, 16))]
    (path / f'{i:03d}.txt').write_text(' '.join(sentences) + '\n')
  return path


def init_params(cfg, seed=0):
  """Random params drawn by numpy (compiling the model's init costs CPU-seconds)."""
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                          jnp.zeros((1, 8), bool))['params']
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    noise = rng.normal(0.0, 0.1, leaf.value.shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == 'scale' else noise
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, 'value'))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny "pretraining" workdir written directly (a stage: config, tokenizer, params):
  what experiments.pretrain leaves, without compiling a train step."""
  root = tmp_path_factory.mktemp('rlhf')
  corpus = write_corpus(root / 'corpus')
  config = _set(pretrain_config.get_config('tiny'), data__corpus=corpus, data__seq_len=32,
                data__validation_fraction=0.25, tokenizer__vocab_size=512, model__d_model=32,
                model__num_layers=1, model__num_heads=2).to_dict()
  docs = data_lib.load_corpus(str(corpus))
  train_docs, _ = data_lib.split_documents(docs, 0.25, seed=0)
  tokenizer = tokenizer_lib.train_tokenizer((d.text for d in train_docs), 512, seed=0)
  workdir = root / 'pretrain'
  workdir.mkdir()
  checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
  tokenizer.save(workdir / checkpoint_lib.TOKENIZER_FILE)
  params = init_params(model_lib.TransformerConfig.from_dict(config['model']))
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  ckpt.save(1, {'params': params}, None, {'step': 1,
                                          'tokenizer_fingerprint': tokenizer.fingerprint})
  ckpt.close()
  return root


def config_for(root, **extra):
  return _set(rlhf_config.get_config('test'), data__corpus=root / 'corpus',
              data__min_sentence_words=6, data__min_words=2, data__max_words=4, **extra)


def train_rows(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  drop = ('seconds', 'per_second', 'prompt_position')
  return [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]


@pytest.mark.slow
def test_end_to_end_and_exact_resume(pretrained, tmp_path):
  init = pretrained / 'pretrain'
  full = tmp_path / 'full'
  summary = rlhf.run(config_for(pretrained), full, init)
  assert summary['iterations'] == 4
  for key in ('reward_model', 'start', 'end', 'evals', 'best_of_n', 'samples', 'wall_minutes',
              'policy_workdir', 'seconds_per_iteration'):
    assert key in summary, key
  heldout = summary['reward_model']['heldout']
  assert 0.0 <= heldout['accuracy'] <= 1.0 and heldout['n'] >= 1
  assert summary['reward_model']['pairs']['pairs'] >= 4
  assert summary['start']['kl_k1'] == pytest.approx(0.0, abs=1e-4)  # the init policy itself
  assert [e['iteration'] for e in summary['evals']] == [0, 2, 4]
  assert [r['n'] for r in summary['best_of_n']] == [1, 2, 4, 8, 16]
  saved = json.loads((full / 'summary.json').read_text())
  assert saved['end']['gold'] == pytest.approx(summary['end']['gold'])
  text = (full / 'report.md').read_text()
  for needle in ('held-out pairwise accuracy', 'overoptimization.png', 'Best-of-n', 'Samples'):
    assert needle in text, needle
  for name in summary['plots']:
    assert (full / name).stat().st_size > 1000
  # The report is rebuilt from the run's files alone, identically.
  (full / 'report.md').unlink()
  (full / 'overoptimization.png').unlink()
  assert rlhf_report.main(['rlhf_report', f'--workdir={full}']) == 0
  assert (full / 'report.md').read_text() == text
  assert (full / 'overoptimization.png').stat().st_size > 1000
  rows = train_rows(full)
  train = [r for r in rows if 'train/kl_k1' in r]
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  for name in ('train/gold', 'train/proxy', 'train/sqrt_kl', 'train/explained_variance',
               'train/clip_fraction', 'train/beta'):
    assert all(math.isfinite(r[name]) for r in train), name

  # The final policy is a stage (what experiments.sample / chat load).
  params, config, tokenizer = checkpoint_lib.load_stage(full / 'policy')
  init_params, init_config, init_tokenizer = checkpoint_lib.load_stage(init)
  assert config['model'] == init_config['model']
  assert tokenizer.fingerprint == init_tokenizer.fingerprint
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       params, init_params)
  assert max(jax.tree.leaves(moved)) > 0  # PPO changed the policy

  # Killed after iteration 3 (checkpoint at 2, metrics of 3 written), then resumed: the
  # same final policy and the same metrics as the uninterrupted run (same reward model).
  resumed = tmp_path / 'resumed'
  config = config_for(pretrained, reward_model_workdir=full / 'reward_model')
  with loop_lib.simulate_kill(3), pytest.raises(loop_lib.SimulatedKill):
    rlhf.run(config, resumed, init)
  assert checkpoint_lib.Checkpointer(resumed).latest_step() == 2
  assert max(r['step'] for r in train_rows(resumed)) == 3
  again = rlhf.run(config, resumed, init)
  assert again['iterations'] == 4
  # It restored iteration 2 (policy, value, β, rng, the prompt sampler's position) and
  # ran iterations 3 and 4 only.
  assert (again['loop']['resumed_from'], again['loop']['steps_run']) == (2, 2)
  resumed_params, _, _ = checkpoint_lib.load_stage(resumed / 'policy')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed_params, params)
  assert train_rows(resumed) == rows
  no_time = lambda evals: [{k: v for k, v in e.items() if 'seconds' not in k} for e in evals]
  assert no_time(again['evals']) == no_time(summary['evals'])


def test_best_of_n_kl_formula_and_monotone_proxy():
  # Exact KL of best-of-n over M equally likely outcomes with distinct scores: the i-th
  # ranked is picked with (i/M)^n − ((i−1)/M)^n. As M grows it tends to log n − (n−1)/n.
  m = 200_000
  i = np.arange(1, m + 1, dtype=np.float64)
  for n in (1, 2, 4, 16):
    p = (i / m) ** n - ((i - 1) / m) ** n
    exact = float(np.sum(np.where(p > 0, p * np.log(p * m), 0.0)))
    assert rl_tasks.best_of_n_kl(n) == pytest.approx(exact, abs=2e-3), n
  assert rl_tasks.best_of_n_kl(1) == 0.0

  rng = np.random.default_rng(0)
  proxy = rng.normal(size=(50, 16))
  gold = proxy + rng.normal(size=(50, 16))
  rows = rl_tasks.best_of_n(proxy, gold, (1, 2, 4, 8, 16))
  means = [r['proxy'] for r in rows]
  assert all(b >= a for a, b in zip(means, means[1:])), means
  assert means[-1] > means[0] + 1.0
  assert rows[0]['proxy'] == pytest.approx(proxy[:, 0].mean())
  best = np.argmax(proxy, axis=1)
  assert rows[-1]['gold'] == pytest.approx(gold[np.arange(50), best].mean())
  assert rows[2]['kl'] == pytest.approx(math.log(4) - 0.75)


def test_reward_fn_scores_responses_closed_by_the_stop_token():
  """In PPO the reward model reads each response as its pairs were built: + stop if missing."""
  cfg = model_lib.TransformerConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2,
                                    max_len=32, scalar_head=True)
  params = init_params(cfg, seed=1)
  params['scalar_head'] = jnp.asarray(np.random.default_rng(1).normal(size=(16, 1)), jnp.float32)
  model = model_lib.Transformer(cfg)
  stop = 3
  prompt = np.array([[5, 6, 7], [8, 0, 0], [9, 10, 0]], np.int32)
  lengths = np.array([3, 1, 2], np.int32)
  response = np.array([[11, 12, stop, 0], [13, 14, 15, 16], [17, 0, 0, 0]], np.int32)
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
  fast = functools.partial(jax.jit, compiler_options=ppo.FAST_COMPILE)
  got = fast(reward_model.make_reward_fn(model, 0, stop))(prompt, lengths, response, valid, params, 0.5)
  seqs = [reward_model.closed(prompt[i, :lengths[i]], response[i, :valid[i].sum()], stop)
          for i in range(3)]
  assert all(seq[-1] == stop and seq.count(stop) == 1 for seq in seqs)
  tokens = np.zeros((3, 8), np.int32)
  for i, seq in enumerate(seqs):
    tokens[i, :len(seq)] = seq
  want = fast(lambda t, l: reward_model.sequence_scores(params, model, t, l))(
      tokens, np.asarray([len(seq) for seq in seqs], np.int32))
  np.testing.assert_allclose(got, np.asarray(want) - 0.5, rtol=1e-5, atol=1e-5)
  plain = fast(reward_model.make_reward_fn(model, 0, stop, close=False))(prompt, lengths, response, valid,
                                                              params, 0.5)
  np.testing.assert_allclose(plain[0], got[0], rtol=1e-5, atol=1e-6)  # already closed
  assert abs(float(plain[1]) - float(got[1])) > 1e-4


@pytest.mark.slow
def test_cli_errors_are_one_line(pretrained, tmp_path):
  # A vaderSentiment that fails to import stands for a missing package.
  shadow = tmp_path / 'shadow' / 'vaderSentiment'
  shadow.mkdir(parents=True)
  (shadow / '__init__.py').write_text('raise ImportError("hidden by the test")\n')
  cases = [
      ({'PYTHONPATH': str(shadow.parent)}, [f'--init={pretrained / "pretrain"}'],
       'pip install --no-deps vaderSentiment==3.3.2'),
      ({}, [f'--init={tmp_path / "missing"}'], 'missing'),
  ]
  for env, args, expected in cases:
    out = subprocess.run([sys.executable, '-m', 'experiments.rlhf', '--config=configs/rlhf.py:test',
                          f'--workdir={tmp_path / "w"}', *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count('\n') == 1 and expected in out.stderr, out.stderr
