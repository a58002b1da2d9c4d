"""A damaged latest checkpoint (a file under its `state/` truncated or gone, its metadata
missing): a resume falls back to the newest readable step with one warning line naming
both steps and moves the damaged one aside (nothing deleted); a later stage reading the
run (`sample`, `sft --init`) does the same without touching the folder; with no readable
step every reader fails with one line (exit 2 on the command line), never starting over."""
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from experiments import common
from experiments import loop as loop_lib
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import model as model_lib
from research import tokenizer as tokenizer_lib
from tests.test_bad_inputs import _set, cli, snapshot
from tests.test_rlhf import init_params


def biggest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array data file of a checkpoint step (the one holding the embeddings)."""
  return max((p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)


def truncate(step_dir):
  path = biggest_state_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 3)


def remove_state_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').unlink()


def remove_meta(step_dir):
  (step_dir / 'meta' / 'metadata').unlink()


def remove_data_file(step_dir):
  biggest_state_file(step_dir).unlink()


DAMAGES = {'truncated': truncate, 'state_metadata_missing': remove_state_metadata,
           'meta_missing': remove_meta, 'data_file_missing': remove_data_file}
EXPECTED_REASON = {'truncated': 'OUT_OF_RANGE', 'state_metadata_missing': 'state/_METADATA is '
                   'missing', 'meta_missing': 'meta/metadata is missing',
                   'data_file_missing': 'missing or empty'}

# -- the loop every stage runs on ---------------------------------------------------------

SHAPE = (64, 64)


def step_fn(state, batch):
  """A deterministic state update that depends on the batch (so the data position
  matters) and on the step."""
  w = state['w'] * 0.9 + jnp.asarray(batch, jnp.float32).sum() * 1e-3 + state['step']
  return {'w': w, 'step': state['step'] + 1}, {'loss': w.mean()}


def initial_state():
  return {'w': jnp.arange(np.prod(SHAPE), dtype=jnp.float32).reshape(SHAPE) / 100,
          'step': jnp.zeros((), jnp.int32)}


def abstract_state():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      initial_state())


def train(workdir, steps, keep=2):
  """Runs (or resumes) the toy stage to `steps`, checkpoints every 2 -> (Result, Restored)."""
  sampler = data_lib.EpochSampler(10, 3, seed=0)
  with loop_lib.Loop(workdir, steps=steps, checkpoint_every=2, keep=keep) as loop:
    restored = loop.restore(abstract_state(), sampler)
    state = restored.state if restored else initial_state()
    result = loop.run(state, step_fn, sampler, first_step=int(state['step']))
  return result, restored


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  result, _ = train(tmp_path_factory.mktemp('reference'), 8)
  return np.asarray(result.state['w'])


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys, reference, damage):
  workdir = tmp_path / 'run'
  train(workdir, 6)
  ckpts = workdir / 'checkpoints'
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 6]
  DAMAGES[damage](ckpts / '6')
  damaged = snapshot(ckpts / '6')
  capsys.readouterr()

  result, restored = train(workdir, 8)

  warnings = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(warnings) == 1, warnings
  assert 'step 6 is damaged' in warnings[0] and 'using step 4' in warnings[0], warnings
  assert EXPECTED_REASON[damage] in warnings[0], warnings
  assert restored.step == 4 and result.resumed_from == 4 and result.steps_run == 4
  # Nothing saved is lost: the damaged step moved aside byte for byte; the run saved a
  # fresh step 6 (and 8) in its place.
  moved = workdir / checkpoint_lib.DAMAGED_DIR / '6'
  assert {p.relative_to(moved): b for p, b in snapshot(moved).items()} == {
      p.relative_to(ckpts / '6'): b for p, b in damaged.items()}
  checkpoint_lib.Checkpointer(workdir, async_save=False).verify(6)
  # The same end as a run never interrupted: same data positions, same updates.
  np.testing.assert_array_equal(np.asarray(result.state['w']), reference)
  steps = [r['step'] for r in loop_lib.read_metrics(workdir) if 'train/loss' in r]
  assert steps == list(range(1, 9)), steps  # the metrics of steps 5-6 not kept twice


def test_a_second_damage_of_the_same_step_keeps_both_copies(tmp_path, capsys):
  workdir = tmp_path / 'run'
  train(workdir, 6)
  for _ in range(2):
    truncate(workdir / 'checkpoints' / '6')
    train(workdir, 6)  # falls back to 4, saves 6 again
  names = sorted(p.name for p in (workdir / checkpoint_lib.DAMAGED_DIR).iterdir())
  assert names == ['6', '6.1'], names
  assert capsys.readouterr().err.count('step 6 is damaged') == 2


def test_no_readable_checkpoint_fails_in_one_line_and_touches_nothing(tmp_path):
  workdir = tmp_path / 'run'
  train(workdir, 6)
  truncate(workdir / 'checkpoints' / '6')
  remove_meta(workdir / 'checkpoints' / '4')
  before = snapshot(workdir)
  with pytest.raises(checkpoint_lib.CheckpointError) as error:
    train(workdir, 8)
  message = str(error.value)
  assert '\n' not in message and 'no readable checkpoint' in message
  assert 'step 6: state/' in message and 'step 4: meta/metadata is missing' in message, message
  assert snapshot(workdir) == before  # never starts over, never deletes


def test_an_intact_checkpoint_passes_verify_and_restores_silently(tmp_path, capsys):
  workdir = tmp_path / 'run'
  train(workdir, 4)
  capsys.readouterr()
  result, restored = train(workdir, 6)
  assert restored.step == 4 and capsys.readouterr().err == ''
  assert not (workdir / checkpoint_lib.DAMAGED_DIR).exists()


def test_failure_reason_is_the_innermost_first_line():
  try:
    try:
      raise ValueError('OUT_OF_RANGE: byte range\nmore detail')
    except ValueError as inner:
      raise RuntimeError('Encountered error while reading array index') from inner
  except RuntimeError as outer:
    assert checkpoint_lib.failure_reason(outer) == 'ValueError: OUT_OF_RANGE: byte range'
  assert checkpoint_lib.failure_reason(ValueError('x' * 500), limit=20) == 'ValueError: xxxxx...'


# -- a later stage reading a finished run --------------------------------------------------


@pytest.fixture(scope='module')
def stage(tmp_path_factory):
  """A small language-model stage written directly, with checkpoints at steps 1 and 2
  (params only; step 2's are step 1's times 2, exactly)."""
  workdir = tmp_path_factory.mktemp('damaged_stage') / 'lm'
  workdir.mkdir()
  tokenizer = tokenizer_lib.train_tokenizer(
      ['the nation and the people of the union ' * 20, 'war and peace and trade ' * 20], 400,
      seed=0)
  config = _set(pretrain_config.get_config('tiny'), tokenizer__vocab_size=400,
                model__d_model=16, model__num_layers=1, model__num_heads=2,
                data__seq_len=32).to_dict()
  params = init_params(model_lib.TransformerConfig.from_dict(config['model']))
  checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
  tokenizer.save(workdir / checkpoint_lib.TOKENIZER_FILE)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  for step in (1, 2):
    ckpt.save(step, {'params': jax.tree.map(lambda x, s=step: x * s, params)}, None,
              {'step': step, 'tokenizer_fingerprint': tokenizer.fingerprint})
    ckpt.wait()
  ckpt.close()
  return workdir


def damaged_copy(stage, tmp_path, *steps, damage=truncate):
  workdir = tmp_path / 'lm'
  shutil.copytree(stage, workdir)
  for step in steps:
    damage(workdir / 'checkpoints' / str(step))
  return workdir


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_load_stage_falls_back_and_leaves_the_folder_as_it_is(stage, tmp_path, damage):
  workdir = damaged_copy(stage, tmp_path, 2, damage=DAMAGES[damage])
  before = snapshot(workdir)
  warnings = []
  params, _, _ = checkpoint_lib.load_stage(workdir, warn=warnings.append)
  assert len(warnings) == 1 and 'step 2 is damaged' in warnings[0], warnings
  assert 'using step 1' in warnings[0] and EXPECTED_REASON[damage] in warnings[0], warnings
  step2, _, _ = checkpoint_lib.load_stage(stage, warn=warnings.append)  # the intact original
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(lambda x: x / 2, step2))
  assert checkpoint_lib.load_meta(workdir, warn=warnings.append)['step'] == (
      1 if damage == 'meta_missing' else 2)  # the meta of step 2 reads unless it is gone
  assert snapshot(workdir) == before


def test_sample_on_a_damaged_only_checkpoint_is_one_line(stage, tmp_path):
  workdir = damaged_copy(stage, tmp_path, 2, 1)
  before = snapshot(workdir)
  code, lines = cli('experiments.sample', f'--workdir={workdir}', '--prompt=The')
  assert code == 2 and len(lines) == 1, lines
  assert 'no readable checkpoint' in lines[0] and 'step 2' in lines[0] and 'step 1' in lines[0]
  assert snapshot(workdir) == before


def test_sft_init_from_a_damaged_only_checkpoint_is_one_line(stage, tmp_path):
  workdir = damaged_copy(stage, tmp_path, 2, 1, damage=remove_state_metadata)
  before = snapshot(workdir)
  code, lines = cli('experiments.sft', '--config=configs/sft.py:test', f'--init={workdir}',
                    f'--workdir={tmp_path / "sft"}')
  assert code == 2 and len(lines) == 1 and 'no readable checkpoint' in lines[0], lines
  assert 'state/_METADATA is missing' in lines[0], lines
  assert not (tmp_path / 'sft').exists()
  assert snapshot(workdir) == before


# -- a real stage: pretraining resumed past a damaged checkpoint ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated', 'state_metadata_missing'])
def test_pretrain_resumes_past_a_damaged_checkpoint_like_an_uninterrupted_run(tmp_path, capsys,
                                                                             damage):
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from experiments import pretrain  # pylint: disable=g-import-not-at-top
  from tests import test_pretrain as tp  # pylint: disable=g-import-not-at-top
  corpus = tp.write_corpus(tmp_path / 'corpus')
  flags = tp.overrides(corpus, **{'model.num_layers': 1, 'train.num_samples': 0})

  def config(steps):  # one schedule (over 8 steps) for every call
    c = pretrain_config.get_config('tiny')
    for flag in flags:
      common.apply_override(c, *flag[len('--config.'):].split('=', 1))
    c = c.to_dict()  # (a plain dict: train.steps no longer tied to optimizer.total_steps)
    c['train']['steps'], c['optimizer']['total_steps'] = steps, 8
    return c
  reference = tmp_path / 'reference'
  pretrain.train(config(8), reference)
  workdir = tmp_path / 'run'
  pretrain.train(config(6), workdir)
  DAMAGES[damage](workdir / 'checkpoints' / '6')
  capsys.readouterr()
  summary = pretrain.train(config(8), workdir)
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(warnings) == 1 and 'step 6 is damaged' in warnings[0], warnings
  assert 'using step 4' in warnings[0] and EXPECTED_REASON[damage] in warnings[0], warnings
  assert summary['loop']['resumed_from'] == 4 and summary['loop']['steps_run'] == 4
  assert tp.losses(workdir) == tp.losses(reference)
  jax.tree.map(np.testing.assert_array_equal, tp.final_params(reference), tp.final_params(workdir))
  assert (workdir / checkpoint_lib.DAMAGED_DIR / '6' / 'state').is_dir()
  if damage != 'truncated':
    return
  # Every checkpoint damaged, through the command line: one line, exit 2, the workdir as
  # it was (no fresh start).
  for step in (6, 8):
    truncate(workdir / 'checkpoints' / str(step))
  before = snapshot(workdir)
  code, lines = cli('experiments.pretrain', '--config=configs/pretrain.py:tiny',
                    f'--workdir={workdir}', *tp.overrides(corpus, steps=10, **{
                        'model.num_layers': 1, 'train.num_samples': 0}))
  assert code == 2 and len(lines) == 1 and 'no readable checkpoint' in lines[0], lines
  assert 'step 8: state/' in lines[0] and 'step 6: state/' in lines[0], lines
  assert snapshot(workdir) == before
