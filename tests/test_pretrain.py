"""The pretraining experiment end to end: resume after kill -9, restore onto other meshes,
one-line errors for bad overrides and foreign workdirs, stage handoff."""
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from research import checkpoint as checkpoint_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ('the nation people congress year government states war peace law trade men '
         'work union great public country free power act time duty world').split()


def write_corpus(path: pathlib.Path, docs=60, seed=0) -> pathlib.Path:
  rng = random.Random(seed)
  path.mkdir(parents=True, exist_ok=True)
  for i in range(docs):
    sentences = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + '.'
                 for _ in range(rng.randint(8, 20))]
    (path / f'{i:03d}.txt').write_text(' '.join(sentences) + '\n')
  return path


def tiny_pretrain_workdir(root: pathlib.Path, seq_len: int, d_model: int, num_layers: int,
                          steps: int) -> pathlib.Path:
  """A finished, seconds-long pretraining run in root/pretrain: the init a later stage's
  tests start from."""
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from experiments import common, pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain_config.get_config('tiny')
  for name, value in {
      'data.corpus': write_corpus(root / 'corpus'), 'data.seq_len': seq_len,
      'data.batch_size': 8, 'tokenizer.vocab_size': 512, 'model.d_model': d_model,
      'model.num_layers': num_layers, 'model.num_heads': 2, 'train.steps': steps,
      'train.eval_every': 0, 'train.eval_batches': 1, 'train.checkpoint_every': 100,
      'train.num_samples': 0, 'optimizer.warmup_steps': 1}.items():
    common.apply_override(config, name, str(value))
  pretrain.train(config, root / 'pretrain')
  return root / 'pretrain'


def overrides(corpus, steps=12, **extra):
  flags = {
      'data.corpus': str(corpus), 'data.seq_len': 32, 'data.batch_size': 8,
      'tokenizer.vocab_size': 512, 'model.d_model': 32, 'model.num_layers': 2,
      'model.num_heads': 2, 'train.steps': steps, 'train.log_every': 1,
      'train.eval_every': 0, 'train.eval_batches': 2, 'train.checkpoint_every': 2,
      'train.num_samples': 1, 'train.sample_tokens': 4, 'optimizer.warmup_steps': 2,
  }
  flags.update(extra)
  return [f'--config.{k}={v}' for k, v in flags.items()]


def pretrain_cmd(workdir, flags):
  return [sys.executable, '-m', 'experiments.pretrain', '--config=configs/pretrain.py:tiny',
          f'--workdir={workdir}', *flags]


def run(cmd, env=None, check=True):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **(env or {})))
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def losses(workdir) -> dict:
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def final_params(workdir):
  params, _, _ = checkpoint_lib.load_stage(workdir)
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='module')
def reference_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  run(pretrain_cmd(workdir, overrides(corpus)))
  return workdir


def metric_lines(workdir) -> list[str]:
  return (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()


@pytest.mark.slow
def test_kill_9_resumes_from_the_last_complete_checkpoint(corpus, reference_run, tmp_path):
  """A real SIGKILL at step 9 (checkpoints every 2): the restart restores the latest
  complete checkpoint, takes only the steps after it, keeps the metric rows up to it
  untouched, and ends with the reference run's losses and params."""
  workdir = tmp_path / 'killed'
  killed = run(pretrain_cmd(workdir, overrides(corpus)), env={'LOOP_KILL_AT_STEP': '9'},
               check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert max(losses(workdir)) == 9
  latest = checkpoint_lib.Checkpointer(workdir).latest_step()
  # Orbax starts a save only after the previous one finished: 6 is complete, 8 may be.
  assert latest in (6, 8), latest
  before = metric_lines(workdir)
  run(pretrain_cmd(workdir, overrides(corpus)))
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['loop']['resumed_from'] == latest
  assert summary['loop']['steps_run'] == 12 - latest  # no earlier step recomputed
  after = metric_lines(workdir)
  steps = [json.loads(l)['step'] for l in after if 'train/loss' in l]
  assert steps == sorted(set(steps)) == list(range(1, 13)), steps  # each step once
  kept = [l for l in before if json.loads(l)['step'] <= latest]
  assert after[:len(kept)] == kept  # rows up to the checkpoint kept, not rewritten
  assert 'train/tokens_per_second' in after[len(kept)]  # the restart's first row
  assert json.loads(after[len(kept)])['step'] == latest + 1
  expected, got = losses(reference_run), losses(workdir)
  assert got == expected
  ref, resumed = final_params(reference_run), final_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, ref, resumed)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
  workdir = tmp_path / 'term'
  proc = subprocess.Popen(pretrain_cmd(workdir, overrides(corpus, steps=400)), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (
      (workdir / 'metrics.jsonl').exists() and max(losses(workdir), default=0) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  last = max(losses(workdir))
  assert checkpoint_lib.Checkpointer(workdir).latest_step() >= last - 1 > 0


@pytest.mark.slow
def test_checkpoint_from_8_device_mesh_restores_onto_other_meshes(corpus, tmp_path):
  """A 5-step run on a (2,2,2) mesh, its last checkpoint deleted (as if killed after
  step 4's), resumes on three meshes: each takes only step 5, and its loss equals the
  uninterrupted run's."""
  # XLA's backend optimisation and fusion emitters off (as tests/test_multihost.py): the
  # four short runs are mostly compilation, and every run here compiles the same way.
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false',
         'JAX_PLATFORMS': 'cpu'}
  source = tmp_path / 'mesh222'
  run(pretrain_cmd(source, overrides(corpus, steps=5) + ['--config.mesh.shape=(2,2,2)']),
      env=env)
  assert sorted(p.name for p in (source / 'checkpoints').iterdir()) == ['4', '5']
  next_losses = {}
  for shape in ('(1,1,1)', '(8,1,1)', '(2,2,2)'):
    target = tmp_path / f'to{shape}'
    shutil.copytree(source, target)
    shutil.rmtree(target / 'checkpoints' / '5')
    run(pretrain_cmd(target, overrides(corpus, steps=5) + [f'--config.mesh.shape={shape}']),
        env=env)
    loop = json.loads((target / 'summary.json').read_text())['loop']
    assert (loop['resumed_from'], loop['steps_run']) == (4, 1), (shape, loop)
    got = losses(target)
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert {k: got[k] for k in range(1, 5)} == {k: losses(source)[k] for k in range(1, 5)}
    next_losses[shape] = got[5]
  np.testing.assert_allclose(list(next_losses.values()), losses(source)[5], atol=1e-5,
                             err_msg=str(next_losses))


def _snapshot(workdir):
  return {p: p.read_bytes() for p in sorted(pathlib.Path(workdir).rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_bad_override_and_foreign_workdir_are_one_line_errors(corpus, reference_run):
  before = _snapshot(reference_run)
  bad = run(pretrain_cmd(reference_run, overrides(corpus) + ['--config.model.num_layer=3']),
            check=False)
  assert bad.returncode != 0 and 'num_layers' in bad.stderr
  assert 'Traceback' not in bad.stderr and len(bad.stderr.strip().splitlines()) <= 3
  typed = run(pretrain_cmd(reference_run, overrides(corpus) + ['--config.model.d_model=abc']),
              check=False)
  assert typed.returncode != 0 and 'Traceback' not in typed.stderr
  other = run(pretrain_cmd(reference_run, overrides(corpus) + ['--config.model.d_model=64']),
              check=False)
  assert other.returncode == 2, other.stderr[-2000:]
  assert 'different model' in other.stderr and 'd_model' in other.stderr
  assert len(other.stderr.strip().splitlines()) == 1, other.stderr
  assert _snapshot(reference_run) == before  # nothing overwritten


def test_missing_corpus_is_a_one_line_error(tmp_path):
  out = run(pretrain_cmd(tmp_path / 'w', ['--config.data.corpus=/nonexistent/corpus.txt']),
            check=False)
  assert out.returncode == 2 and '/nonexistent/corpus.txt' in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert not (tmp_path / 'w').exists()


def test_stage_handoff_loads_params_config_and_tokenizer(reference_run):
  params, config, tokenizer = checkpoint_lib.load_stage(reference_run)
  assert config['model']['d_model'] == 32
  assert tokenizer.vocab_size == 512 == params['embed'].shape[0]
  summary = json.loads((reference_run / 'summary.json').read_text())
  assert summary['step'] == 12 and summary['validation']['causal_loss'] > 0
