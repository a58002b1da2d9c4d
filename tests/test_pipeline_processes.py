"""The whole pipeline on 2 processes × 4 devices (experiments.launch), as the `pod` preset
runs it: the training stages over all 8 devices, then the evaluation on process 0 as a
one-process run (at its smallest: no limitation parts), and the report card names every
stage."""
import json
import os
import sys

import pytest

from experiments import launch
from tests.test_multihost import FAST_XLA
from tests.test_rlhf import write_corpus


@pytest.mark.slow
def test_the_pipeline_trains_on_two_processes_and_evaluates_on_process_0(tmp_path):
  corpus = write_corpus(tmp_path / 'corpus')
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'experiments.pipeline', '--config=configs/pipeline.py:test',
             f'--workdir={workdir}', f'--config.pretrain.data.corpus={corpus}',
             f'--config.rlhf.data.corpus={corpus}', '--config.rlhf.ppo.batch_size=16',
             # The evaluation's contents are tests/test_pipeline.py's: here only who runs it.
             '--config.evaluate.limitations.parts=', '--config.evaluate.ks=(1,)']
  command += [f'--config.{s}.mesh.shape=(-1,1,1)' for s in ('pretrain', 'sft', 'rlhf')]
  old = dict(os.environ)
  os.environ.update(XLA_FLAGS=FAST_XLA)  # the launcher adds the device count
  try:
    with open(tmp_path / 'log', 'w') as out:
      code = launch.launch(command, 2, 4, timeout_seconds=300, grace_seconds=3, out=out)
  finally:
    os.environ.clear()
    os.environ.update(old)
  log = (tmp_path / 'log').read_text()
  assert code == 0, log[-3000:]
  card = json.loads((workdir / 'report.json').read_text())
  assert sorted(card['stages']) == ['evaluate', 'pretrain', 'rlhf', 'sft']
  for stage in ('pretrain', 'sft', 'rlhf'):  # trained over both processes' devices
    assert f"[p0] == [{['pretrain', 'sft', 'rlhf'].index(stage) + 1}/4] {stage} in" in log
  assert log.count("mesh {'data': 8, 'fsdp': 1, 'tensor': 1}") >= 3, log[-3000:]
  # Process 0 alone evaluated, after both processes had left jax.distributed.
  assert log.count('[p0] == [4/4] evaluate in') == 1
  assert '[p1] == [4/4] evaluate' not in log
  assert '[p0] == [3/4] rlhf: done before, skipped' in log
  words = card['stages']['evaluate']['word_problems']
  assert sorted(words) == ['pretrain', 'rl', 'sft']
  assert 'report.md' in os.listdir(workdir)
