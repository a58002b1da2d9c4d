"""The whole pipeline on 2 processes × 4 devices (experiments.launch), as the `pod` preset
runs it: the training stages over all 8 devices, then the evaluation on process 0 as a
one-process run (at its smallest: no limitation parts), and the report card names every
stage."""
import json
import os

import pytest

from tests.test_multihost import two_processes
from tests.test_rlhf import write_corpus


@pytest.mark.slow
def test_the_pipeline_trains_on_two_processes_and_evaluates_on_process_0(tmp_path):
  corpus = write_corpus(tmp_path / 'corpus')
  workdir = tmp_path / 'run'
  args = ['-m', 'experiments.pipeline', '--config=configs/pipeline.py:test',
          f'--workdir={workdir}', f'--config.pretrain.data.corpus={corpus}',
          f'--config.rlhf.data.corpus={corpus}', '--config.rlhf.ppo.batch_size=16',
          # The evaluation's contents are tests/test_pipeline.py's: here only who runs it.
          '--config.evaluate.limitations.parts=', '--config.evaluate.ks=(1,)']
  training = ('pretrain', 'sft', 'rlhf')
  args += [f'--config.{s}.mesh.shape=(-1,1,1)' for s in training]
  with open(tmp_path / 'log', 'w') as out:
    code = two_processes(args, check=False, out=out, timeout_seconds=300)
  log = (tmp_path / 'log').read_text()
  assert code == 0, log[-3000:]
  card = json.loads((workdir / 'report.json').read_text())
  assert sorted(card['stages']) == ['evaluate', 'pretrain', 'rlhf', 'sft']
  for i, stage in enumerate(training, 1):  # trained over both processes' devices
    assert f'[p0] == [{i}/4] {stage} in' in log
  assert log.count("mesh {'data': 8, 'fsdp': 1, 'tensor': 1}") >= 3, log[-3000:]
  # Process 0 alone evaluated, after both processes had left jax.distributed.
  assert log.count('[p0] == [4/4] evaluate in') == 1
  assert '[p1] == [4/4] evaluate' not in log
  assert '[p0] == [3/4] rlhf: done before, skipped' in log
  words = card['stages']['evaluate']['word_problems']
  assert sorted(words) == ['pretrain', 'rl', 'sft']
  assert 'report.md' in os.listdir(workdir)


@pytest.mark.parametrize('env', [
    dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='0',
         LAUNCH_CPU_COLLECTIVES='gloo'),  # experiments.launch
    dict(COORDINATOR_ADDRESS='10.0.0.1:8476'),
    dict(TPU_WORKER_HOSTNAMES='w0,w1,w2,w3'),
    dict(SLURM_NTASKS='16', SLURM_PROCID='3')])
def test_the_one_process_environment_starts_no_jax_distributed(env):
  from experiments import common  # pylint: disable=g-import-not-at-top
  env = dict(env, PATH='/bin', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  assert common.distributed_env(env)
  alone = common.one_process_env(env)
  assert not common.distributed_env(alone)
  assert alone['PATH'] == '/bin' and alone['XLA_FLAGS'] == env['XLA_FLAGS']
  assert alone.get('JAX_PLATFORMS') == ('cpu' if 'TPU_WORKER_HOSTNAMES' in env else None)
