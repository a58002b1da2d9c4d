"""The whole pipeline at test size: every stage runs, a rerun skips them, the report card
names them all and is rebuilt from the files, and a kill at a random point followed by
a restart ends with the same report numbers."""
import json
import random

import pytest

from configs import pipeline as pipeline_config
from experiments import common
from experiments import loop as loop_lib
from experiments import pipeline
from experiments import pipeline_report
from tests.test_rlhf import write_corpus

pytestmark = pytest.mark.slow

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
  """The card without wall times and the environment (what a rerun must reproduce)."""
  def strip(x):
    if isinstance(x, dict):
      return {k: strip(v) for k, v in x.items() if k not in ('minutes', 'cpu_minutes', 'environment',
                                                             'workdir')}
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


def test_every_stage_runs_then_is_skipped_and_the_card_names_them(corpus, straight,
                                                                   monkeypatch):
  workdir, card = straight
  assert set(card['stages']) == {'pretrain', 'sft', 'rlhf'}
  assert card['stages']['pretrain']['steps'] == 6 and card['stages']['sft']['steps'] == 6
  assert card['stages']['rlhf']['steps'] == 2
  text = (workdir / 'report.md').read_text()
  for needle in ('| pretrain |', '| sft |', '| reward model |', '| rl (gae) |',
                 'Word problems after SFT', '## Environment', 'loss_curves.png'):
    assert needle in text, needle
  assert (workdir / 'loss_curves.png').stat().st_size > 1000
  assert json.loads((workdir / 'report.json').read_text())['stages'].keys() == card['stages'].keys()

  # A rerun trains nothing: every stage is skipped, and the card is the same.
  def fail(*args, **kwargs):
    raise AssertionError('a finished stage was run again')
  for module, name in ((pipeline.pretrain, 'train'), (pipeline.sft, 'finetune'),
                       (pipeline.rlhf, 'run')):
    monkeypatch.setattr(module, name, fail)
  assert numbers(pipeline.run(config_for(corpus), workdir)) == numbers(card)
  # The card is rebuilt from the files alone.
  (workdir / 'report.md').unlink()
  assert pipeline_report.main(['report', f'--workdir={workdir}']) == 0
  assert (workdir / 'report.md').read_text() == text


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


def test_from_stage_moves_later_stages_aside_and_reruns_them(corpus, straight, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  source, card = straight
  workdir = tmp_path / 'copy'
  shutil.copytree(source, workdir)
  config = config_for(corpus)
  config.from_stage = 'rlhf'
  again = pipeline.run(config, workdir)
  assert (workdir / 'previous' / 'rlhf-0' / 'summary.json').exists()  # kept, not deleted
  assert numbers(again) == numbers(card)
  config.from_stage = 'nonsense'
  with pytest.raises(common.UserError, match='from_stage'):
    pipeline.run(config, workdir)
