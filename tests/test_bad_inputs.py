"""Bad input, as a new user gives it: every entry point answers with one line naming the
key or file, exit status 2, and leaves the workdir as it was (absent if it was absent).

Config values are checked in one place (`common.validate_config`, the model section by
`TransformerConfig`) before anything is written; a resume refuses a changed config; a
stage refuses an init or workdir of the wrong kind."""
import os
import pathlib
import subprocess
import sys

import pytest

from configs import pretrain as pretrain_config
from configs import reward_model as rm_config
from configs import sft as sft_config
from experiments import common
from experiments import pretrain
from experiments import reward_model as rm_stage
from experiments import rlhf
from experiments import sft
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import model as model_lib
from research import tokenizer as tokenizer_lib
from tests.test_pretrain import write_corpus
from tests.test_rlhf import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set(config, **values):
  for name, value in values.items():
    common.apply_override(config, name.replace('__', '.'), str(value))
  return config


def snapshot(workdir) -> dict:
  workdir = pathlib.Path(workdir)
  if not workdir.exists():
    return {}
  return {p: p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()}


def cli(module, *args, env=None):
  out = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, **(env or {})))
  return out.returncode, out.stderr.strip().splitlines()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('bad_corpus'))


@pytest.fixture(scope='module')
def stages(tmp_path_factory):
  """A pretraining-like stage and a reward-model-like stage written directly."""
  root = tmp_path_factory.mktemp('bad_stages')
  texts = ['the nation and the people of the union ' * 20, 'war and peace and trade ' * 20]
  tokenizer = tokenizer_lib.train_tokenizer(texts, 400, seed=0)
  out = {}
  for name, head in (('lm', False), ('rm', True)):
    config = _set(pretrain_config.get_config('tiny'), tokenizer__vocab_size=400,
                  model__d_model=16, model__num_layers=1, model__num_heads=2,
                  data__seq_len=32).to_dict()
    config['model']['scalar_head'] = head
    cfg = model_lib.TransformerConfig.from_dict(config['model'])
    workdir = root / name
    workdir.mkdir()
    checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
    tokenizer.save(workdir / checkpoint_lib.TOKENIZER_FILE)
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    ckpt.save(1, {'params': init_params(cfg)}, None,
              {'step': 1, 'tokenizer_fingerprint': tokenizer.fingerprint})
    ckpt.close()
    out[name] = workdir
  return out


# 1. Config values are checked before anything is written, in every stage.
PRETRAIN_BAD = [
    ('optimizer.learning_rate', 'nan', 'finite'),
    ('data.batch_size', '0', 'integer >= 1'),
    ('data.seq_len', '0', 'integer >= 1'),
    ('data.validation_fraction', '1.0', '[0, 1)'),
    ('model.num_layers', '-1', 'num_layers'),
    ('model.num_heads', '6', 'not a multiple of model.num_heads'),  # 256 / 6: 42-wide heads
    ('model.num_heads', '3', 'not a multiple of model.num_heads'),
    ('objective.mask_rate', '1.5', 'rate in (0, 1)'),
    ('train.grad_accum_steps', '3', 'must divide'),
]


@pytest.mark.parametrize('key, value, expected', PRETRAIN_BAD)
def test_pretrain_config_values_are_checked_before_anything_is_written(corpus, tmp_path, key,
                                                                       value, expected):
  config = _set(pretrain_config.get_config('tiny'), data__corpus=corpus)
  common.apply_override(config, key, value)
  with pytest.raises(common.UserError, match=expected.replace('(', r'\(').replace(')', r'\)')
                     .replace('[', r'\[')):
    pretrain.train(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_other_stages_check_their_config_values_first(stages, tmp_path):
  for key, value in (('optimizer.learning_rate', 'nan'), ('data.batch_size', '0')):
    with pytest.raises(common.UserError, match=key.split('.')[-1]):
      rm_stage.train(_set(rm_config.get_config('test'), **{key.replace('.', '__'): value}),
                     tmp_path / 'rm', stages['lm'])
    with pytest.raises(common.UserError, match=key.split('.')[-1]):
      sft.finetune(_set(sft_config.get_config('test'), **{key.replace('.', '__'): value}),
                   tmp_path / 'sft', stages['lm'])
  assert not (tmp_path / 'rm').exists() and not (tmp_path / 'sft').exists()


def test_rlhf_reads_its_corpus_before_writing(stages, tmp_path):
  from configs import rlhf as rlhf_config  # pylint: disable=g-import-not-at-top
  config = _set(rlhf_config.get_config('test'), data__corpus=tmp_path / 'no_such_corpus')
  with pytest.raises(data_lib.DataError, match='no_such_corpus'):
    rlhf.run(config, tmp_path / 'rl', stages['lm'])
  assert not (tmp_path / 'rl').exists()


# 2. Resuming or initialising from something that does not match.
@pytest.mark.slow
def test_resume_refuses_a_changed_batch_seed_or_corpus(corpus, tmp_path):
  base = dict(data__corpus=corpus, data__seq_len=32, data__batch_size=8,
              tokenizer__vocab_size=512, model__d_model=32, model__num_layers=1,
              model__num_heads=2, train__steps=2, train__eval_every=0, train__eval_batches=1,
              train__num_samples=0, optimizer__warmup_steps=1)
  workdir = tmp_path / 'run'
  pretrain.train(_set(pretrain_config.get_config('tiny'), **base), workdir)
  before = snapshot(workdir)
  other = write_corpus(tmp_path / 'other', seed=1)
  for change, key in ((dict(data__batch_size=4), 'data.batch_size'), (dict(seed=1), 'seed'),
                      (dict(data__corpus=other), 'data.corpus'),
                      (dict(optimizer__learning_rate=1e-4), 'optimizer.learning_rate')):
    config = _set(pretrain_config.get_config('tiny'), **{**base, **change})
    with pytest.raises(checkpoint_lib.CheckpointError, match=key):
      pretrain.train(config, workdir)
  assert snapshot(workdir) == before
  # What may change on a resume: the step budget (here 2 -> 3) and how data is read.
  summary = pretrain.train(_set(pretrain_config.get_config('tiny'),
                                **{**base, 'train__steps': 3, 'data__num_threads': 1}), workdir)
  assert summary['loop']['resumed_from'] == 2 and summary['step'] == 3


def test_a_stage_of_the_wrong_kind_is_refused(stages, tmp_path):
  with pytest.raises(common.UserError, match='reward model'):
    sft.finetune(sft_config.get_config('test'), tmp_path / 'sft', stages['rm'])
  assert not (tmp_path / 'sft').exists()
  code, lines = cli('experiments.sample', f'--workdir={stages["rm"]}', '--prompt=The')
  assert code == 2 and len(lines) == 1 and 'reward' in lines[0], lines


# Through the command line: one line, exit 2, the key or file named, nothing written.
@pytest.mark.parametrize('module, args, expected', [
    ('experiments.pretrain', ['--config.optimizer.learning_rate=nan'], 'learning_rate'),
    ('experiments.pretrain', ['--config.data.batch_size=0'], 'data.batch_size'),
    ('experiments.reward_model', ['--config=configs/reward_model.py:test',
                                  '--config.data.batch_size=0'], 'data.batch_size'),
    ('experiments.rlhf', ['--config=configs/rlhf.py:test', '--config.ppo.policy_lr=-1'],
     'policy_lr'),
    ('experiments.pipeline', ['--config=configs/pipeline.py:test',
                              '--config.sft.data.seq_len=0'], 'sft.data.seq_len'),
])
def test_command_line_errors_are_one_line_and_write_nothing(tmp_path, module, args, expected):
  code, lines = cli(module, f'--workdir={tmp_path / "w"}', *args)
  assert code == 2 and len(lines) == 1 and expected in lines[0], lines
  assert not (tmp_path / 'w').exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  target = tmp_path / 'file.txt'
  target.write_text('not a folder')
  code, lines = cli('experiments.pretrain', f'--workdir={target}')
  assert code == 2 and len(lines) == 1 and 'is a file' in lines[0], lines
  assert target.read_text() == 'not a folder'


def test_validate_config_names_the_key_and_allowed_values():
  for config, expected in (
      ({'optimizer': {'learning_rate': float('inf')}}, 'optimizer.learning_rate=inf: expected a '
       'finite number'),
      ({'ppo': {'minibatches': 0}}, 'ppo.minibatches=0: expected an integer >= 1'),
      ({'data': {'heldout_fraction': -0.1}}, 'data.heldout_fraction=-0.1: expected a fraction'),
      ({'train': {'checkpoint_every': -1}}, 'train.checkpoint_every=-1: expected a number >= 0'),
      ({'model': dict(pretrain_config.get_config('tiny').model.to_dict(), d_model=250)},
       'd_model=250'),
  ):
    with pytest.raises(common.UserError, match=expected.replace('(', r'\(').replace('[', r'\[')):
      common.validate_config(config)
  common.validate_config(pretrain_config.get_config('tiny'))  # the presets pass


@pytest.mark.parametrize('module', ['experiments.pretrain', 'experiments.reward_model'])
def test_checkpoints_without_their_config_are_refused(tmp_path, module):
  """A folder whose checkpoints/ outlived its config.json (e.g. saved by a killed process
  after the folder was deleted) is refused, not resumed as if it were this run."""
  workdir = tmp_path / 'w'
  (workdir / 'checkpoints' / '3').mkdir(parents=True)
  before = sorted(p.relative_to(workdir) for p in workdir.rglob('*'))
  code, lines = cli(module, f'--workdir={workdir}')
  assert code == 2 and len(lines) == 1 and 'no config.json' in lines[0], lines
  assert sorted(p.relative_to(workdir) for p in workdir.rglob('*')) == before
