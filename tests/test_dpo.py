"""DPO / IPO: the loss and its gradient against hand values, the response start, and the
stage end to end on a tiny model (learns "good good" over "bad bad", reference log-probs
computed once, exact resume, loads back as a stage)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo as dpo_config
from experiments import common
from experiments import dpo as dpo_experiment
from experiments import loop as loop_lib
from research import checkpoint as checkpoint_lib
from research import dpo
from tests.test_pretrain import tiny_pretrain_workdir
from tests.test_reward_model_experiment import write_pairs


def test_dpo_loss_and_gradient_sign_against_hand_values():
  # h = (−1 − −2) − (−3 − −2) = 2; β = ½: margin β·h = 1, loss −log σ(1) = log(1 + e^−1).
  args = [jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0])]
  loss, m = dpo.dpo_loss(*args, beta=0.5)
  np.testing.assert_allclose(loss, math.log1p(math.exp(-1.0)), rtol=1e-6)
  assert m['accuracy'] == 1.0 and m['margin'] == pytest.approx(1.0)
  assert m['chosen_reward'] == pytest.approx(0.5) and m['rejected_reward'] == pytest.approx(-0.5)
  # dL/d log π(y_c) = −β·σ(−β·h) < 0 (raise the chosen), dL/d log π(y_r) = +β·σ(−β·h).
  g = jax.grad(lambda c, r: dpo.dpo_loss(c, r, args[2], args[3], beta=0.5)[0], (0, 1))(
      args[0], args[1])
  s = 0.5 / (1 + math.e)  # β·σ(−1)
  np.testing.assert_allclose(g[0], [-s], rtol=1e-6)
  np.testing.assert_allclose(g[1], [s], rtol=1e-6)
  # IPO: (h − 1/(2β))² = (2 − 1)² = 1; gradient 2·(h − 1/(2β)) = 2 on the chosen side.
  loss, _ = dpo.dpo_loss(*args, beta=0.5, loss='ipo')
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  g = jax.grad(lambda c: dpo.dpo_loss(c, args[1], args[2], args[3], beta=0.5, loss='ipo')[0])(
      args[0])
  np.testing.assert_allclose(g, [2.0], rtol=1e-6)
  with pytest.raises(ValueError, match='loss'):
    dpo.dpo_loss(*args, beta=0.5, loss='kto')


def test_response_starts_at_the_first_differing_token():
  arrays = dict(chosen_tokens=np.array([[5, 6, 7, 8, 0], [5, 6, 0, 0, 0], [9, 6, 0, 0, 0]]),
                chosen_lengths=np.array([4, 2, 2]),
                rejected_tokens=np.array([[5, 6, 9, 0, 0], [5, 6, 7, 0, 0], [5, 6, 0, 0, 0]]),
                rejected_lengths=np.array([3, 3, 2]))
  np.testing.assert_array_equal(dpo.response_starts(arrays), [2, 2, 1])


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  return tiny_pretrain_workdir(tmp_path_factory.mktemp('dpo'), seq_len=64, d_model=32,
                               num_layers=1, steps=2)


def _config(path, steps=30):
  c = dpo_config.get_config('test')
  for name, value in dict(data__path=path, train__steps=steps, data__seq_len=48,
                          data__batch_size=16, optimizer__learning_rate=3e-3,
                          optimizer__warmup_steps=3, data__heldout_fraction=0.25,
                          train__log_every=5, train__checkpoint_every=10,
                          dpo__beta=0.5).items():
    common.apply_override(c, name.replace('__', '.'), str(value))
  return c


@pytest.mark.slow
def test_dpo_learns_separable_pairs_resumes_exactly_and_loads_as_a_stage(pretrained, tmp_path,
                                                                         monkeypatch):
  calls = []
  original = dpo.reference_logprobs
  monkeypatch.setattr(dpo, 'reference_logprobs',
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  data = write_pairs(tmp_path / 'pairs.jsonl', 160)
  summary = dpo_experiment.train(_config(data), tmp_path / 'dpo', pretrained)
  assert summary['steps'] == 30 and not summary['interrupted']
  assert summary['heldout']['n'] == 40 and summary['data']['train'] == 120
  assert summary['heldout_before']['accuracy'] == 0.5  # the policy starts at the reference
  assert summary['heldout']['accuracy'] > 0.9, summary['heldout']
  # Reference log-probs: once for the train pairs and once for the held-out ones, before
  # training; never again (the train step has no reference params to compute them with).
  assert len(calls) == 2
  params, config, _ = checkpoint_lib.load_stage(tmp_path / 'dpo')
  assert config['dpo']['beta'] == 0.5 and config['init'] == str(pretrained)
  init_params, _, _ = checkpoint_lib.load_stage(pretrained)
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params,
                                              init_params)))

  # Killed after step 15 (checkpoint at 10), resumed: steps 11-30 only, the same losses and
  # held-out figures as the uninterrupted run, and the stored reference log-probs reused.
  calls.clear()
  with loop_lib.simulate_kill(15), pytest.raises(loop_lib.SimulatedKill):
    dpo_experiment.train(_config(data), tmp_path / 'killed', pretrained)
  assert len(calls) == 2
  again = dpo_experiment.train(_config(data), tmp_path / 'killed', pretrained)
  assert len(calls) == 2
  assert (again['loop']['resumed_from'], again['loop']['steps_run']) == (10, 20)
  losses = lambda w: {r['step']: r['train/loss'] for r in loop_lib.read_metrics(w)
                      if 'train/loss' in r}
  got, want = losses(tmp_path / 'killed'), losses(tmp_path / 'dpo')
  assert {s: l for s, l in got.items() if s != 11} == want
  assert again['heldout'] == summary['heldout']
