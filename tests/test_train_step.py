"""The jitted train step: objectives learn, meshes agree, bad meshes fail early.

The mesh-equivalence test runs `python -m tests.test_train_step MESH` in a subprocess
with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import model as model_lib
from research import objectives
from research import sharding
from research import train_step as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L, B = 256, 32, 8
IDS = objectives.SpecialIds(pad=0, mask=4, vocab_size=V, special=tuple(range(1, 45)),
                            sentinels=tuple(range(5, 40)))
CFG = model_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_len=L)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(45, V, (B, L)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[:, L // 2:] = 2
  seg[-1, -5:] = 0
  pos = np.concatenate([np.arange(L // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
  pos[seg == 0] = 0
  tokens[seg == 0] = 0
  return dict(tokens=tokens, segment_ids=seg, positions=pos)


def run_steps(mesh_shape, objective='causal', steps=5, cfg=CFG, lr=3e-3, grad_accum=1,
              record=None):
  """Trains `steps` steps on `_batch()`; with a dict `record`, also keeps every step's
  metrics and a copy of the params before the first step and after each one."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  model = model_lib.Transformer(cfg)
  tx, schedule = train_lib.make_optimizer(
      train_lib.OptimizerConfig(learning_rate=lr, warmup_steps=2, total_steps=steps))
  shardings = train_lib.state_shardings(model, tx, mesh, B, L)
  state = train_lib.make_train_state(model, tx, mesh, jax.random.key(0), B, L)
  step = train_lib.jit_train_step(
      train_lib.make_train_step(model, tx, schedule, objectives.get_objective(objective), IDS,
                                z_loss=1e-4, grad_accum_steps=grad_accum), shardings, mesh)
  losses = []
  copy = lambda tree: jax.tree.map(np.array, tree)  # the step donates the state
  if record is not None:
    record.update(params=[copy(state.params)], metrics=[])
  for _ in range(steps):
    state, metrics = step(state, _batch(), jax.random.key(1))
    losses.append(float(metrics['loss']))
    if record is not None:
      record['params'].append(copy(state.params))
      record['metrics'].append(copy(metrics))
  return losses, metrics, state


@pytest.fixture(scope='module')
def three_causal_steps():
  """Three causal steps (lr 3e-3, warmup 2, z-loss 1e-4) with every metric and params."""
  record = {}
  losses, metrics, state = run_steps((1, 1, 1), steps=3, record=record)
  return losses, metrics, state, record


def _hand_mean_loss(params, batch, z_loss):
  """The per-token mean of cross-entropy + z_loss·log²Z over scored next tokens, written
  plainly (full logits, log-sum-exp): what the train step's gradient is the gradient of.
  -> (loss, (mean cross-entropy, mean z term, accuracy))."""
  ex = objectives.causal(batch, None, IDS)
  hidden, _ = model_lib.Transformer(CFG).apply(
      {'params': params}, ex['inputs'], ex['positions'], ex['segment_ids'], ex['prefix'])
  logits = jnp.einsum('bld,vd->blv', hidden, params['embed'])
  log_z = jax.nn.logsumexp(logits, axis=-1)
  nll = log_z - jnp.take_along_axis(logits, ex['targets'][..., None], axis=-1)[..., 0]
  w = ex['weights']
  mean = lambda x: jnp.sum(x * w) / jnp.sum(w)
  correct = (jnp.argmax(logits, axis=-1) == ex['targets']).astype(jnp.float32)
  return mean(nll + z_loss * log_z ** 2), (mean(nll), mean(z_loss * log_z ** 2), mean(correct))


@pytest.mark.parametrize('objective', ['causal', 'masked', 'prefix', 'span', 'hybrid'])
@pytest.mark.slow
def test_every_objective_overfits_one_batch(objective):
  losses, metrics, _ = run_steps((1, 1, 1), objective, steps=30, lr=1e-2)
  # Masked LM draws new masks every step over uniformly random tokens, so it learns
  # slowest; the others memorise the batch.
  assert losses[-1] < (0.9 if objective == 'masked' else 0.6) * losses[0], losses
  assert metrics['loss_tokens'] > 0 and 0 <= metrics['accuracy'] <= 1


def test_gradient_accumulation_matches_one_big_batch(three_causal_steps):
  one, _, _, record = three_causal_steps
  accumulated_record = {}
  accumulated, _, _ = run_steps((1, 1, 1), steps=3, grad_accum=4, record=accumulated_record)
  np.testing.assert_allclose(one, accumulated, rtol=1e-5)
  # Adam is nearly blind to the gradient's scale, so compare the gradients themselves:
  # microbatch gradients are summed, then divided by all scored tokens once.
  for key in ('grad_norm', 'loss_tokens', 'z_loss', 'accuracy'):
    np.testing.assert_allclose([m[key] for m in accumulated_record['metrics']],
                               [m[key] for m in record['metrics']], rtol=1e-5, err_msg=key)


def test_metrics_and_learning_rate_schedule(three_causal_steps):
  _, metrics, state, record = three_causal_steps
  assert int(state.step) == 3
  for key in ('loss', 'accuracy', 'grad_norm', 'learning_rate', 'loss_tokens', 'z_loss'):
    assert np.isfinite(metrics[key]), key
  # 8 rows x 31 scorable positions, minus padding (5) and the boundary between documents.
  assert metrics['loss_tokens'] == B * (L - 2) - 5
  # Warmup over 2 steps to the peak 3e-3, lr·(t+1)/2, then the cosine from the peak: each
  # step reports the rate it used, and the first is not 0.
  np.testing.assert_allclose([float(m['learning_rate']) for m in record['metrics']],
                             [1.5e-3, 3e-3, 3e-3], rtol=1e-6, atol=0)
  # A nonzero rate: the first step moves every parameter (no update is wasted).
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), record['params'][1],
                       record['params'][0])
  assert all(jax.tree.leaves(moved))


def test_schedule_values_at_start_warmup_and_end():
  cfg = train_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10, total_steps=50,
                                  final_lr_fraction=0.1)
  schedule = train_lib.make_schedule(cfg)
  at = lambda t: float(schedule(t))
  # Linear warmup lr·(t+1)/10: step 0 already learns, step 9 is at the peak.
  np.testing.assert_allclose([at(0), at(4), at(9)], [1e-4, 5e-4, 1e-3], rtol=1e-6)
  # Cosine from the peak at step 10 to 10% of it at step 50, then flat.
  for t in (10, 20, 30, 45):
    want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * (t - 10) / 40))
    np.testing.assert_allclose(at(t), want, rtol=1e-5)
  np.testing.assert_allclose([at(50), at(80)], [1e-4, 1e-4], rtol=1e-5)
  # A warmup longer than the run is cut to the run: the peak is still reached (last step).
  short = train_lib.make_schedule(train_lib.OptimizerConfig(learning_rate=2e-3,
                                                            warmup_steps=100, total_steps=5))
  np.testing.assert_allclose([float(short(t)) for t in (0, 2, 4, 5)],
                             [4e-4, 1.2e-3, 2e-3, 2e-4], rtol=1e-5)
  # warmup_steps=0: the full rate at step 0, then the cosine.
  none = train_lib.make_schedule(train_lib.OptimizerConfig(learning_rate=1e-3,
                                                           warmup_steps=0, total_steps=10))
  np.testing.assert_allclose([float(none(t)) for t in (0, 5, 10)],
                             [1e-3, 1e-4 + 0.5 * 9e-4, 1e-4], rtol=1e-5)


@pytest.mark.slow
def test_loss_gradient_and_update_equal_a_hand_computation(three_causal_steps):
  """Metrics of the first step against a plain per-token-mean loss; its update
  against AdamW written out."""
  _, _, _, record = three_causal_steps
  params0, first = record['params'][0], record['metrics'][0]
  batch = jax.tree.map(jnp.asarray, _batch())
  (_, (nll, z_term, accuracy)), grads = jax.jit(jax.value_and_grad(
      _hand_mean_loss, has_aux=True), static_argnums=2)(params0, batch, 1e-4)
  np.testing.assert_allclose(first['loss'], nll, rtol=1e-5)  # the z term is reported apart
  np.testing.assert_allclose(first['z_loss'], z_term, rtol=1e-4)
  np.testing.assert_allclose(first['accuracy'], accuracy, rtol=1e-6)
  grad_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(first['grad_norm'], grad_norm, rtol=1e-4)
  # The z-loss is part of what is differentiated (0.1 makes its gradient visible).
  model, example = model_lib.Transformer(CFG), objectives.causal(batch, None, IDS)
  summed = jax.grad(lambda p: train_lib.loss_sums(p, model, example, 0.1)[0])(params0)
  by_hand = jax.grad(lambda p: _hand_mean_loss(p, batch, 0.1)[0])(params0)
  n = float(jnp.sum(example['weights']))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a / n, b, atol=1e-6, rtol=0), summed,
               by_hand)
  # The first step's update from this gradient g: Adam's two bias-corrected moments are
  # g and g², the update -lr·(g/(|g| + eps) + wd·p) at the first step's lr 1.5e-3
  # (clipping rescales g, which this ratio ignores up to eps); no decay on norm scales.
  decays = train_lib.decay_mask(params0)

  def expected(p, g, decay):
    g = g * min(1.0, 1.0 / grad_norm)
    return p - 1.5e-3 * (g / (np.abs(g) + 1e-8) + (0.1 * p if decay else 0.0))
  want = jax.tree.map(expected, params0, grads, decays)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=0),
               record['params'][1], want)


def test_no_weight_decay_on_norms():
  mask = train_lib.decay_mask({'layers': {'attention_norm': {'scale': 1}, 'mlp': {'up': 1}},
                               'embed': 1, 'final_norm': {'scale': 1, 'bias': 1}})
  assert mask == {'layers': {'attention_norm': {'scale': False}, 'mlp': {'up': True}},
                  'embed': True, 'final_norm': {'scale': False, 'bias': False}}


def test_mesh_needing_more_devices_is_a_clear_error():
  with pytest.raises(sharding.MeshError, match='needs 8 devices'):
    sharding.make_mesh((2, 2, 2), jax.devices()[:1])


def _in_subprocess(mesh_arg: str) -> list:
  # XLA's backend optimisation and fusion emitters off (as tests/test_multihost.py): the
  # run is mostly compilation, and every mesh in it compiles the same way.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'tests.test_train_step', mesh_arg], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_losses_equal_on_one_device_and_on_8_device_meshes():
  results = _in_subprocess('1,1,1;2,2,2;8,1,1;1,4,2')
  single = results['1,1,1']
  for mesh, losses in results.items():
    np.testing.assert_allclose(losses, single, atol=1e-5, rtol=0, err_msg=mesh)


def test_mesh_not_dividing_batch_or_heads_fails_before_compiling():
  results = _in_subprocess('bad:3,1,1;bad:1,1,8')
  assert 'batch size 8 is not divisible by data×fsdp = 3' in results['bad:3,1,1']
  assert 'num_heads=4 is not divisible by the mesh tensor axis 8' in results['bad:1,1,8']


if __name__ == '__main__':
  results = {}
  for mesh in sys.argv[1].split(';'):
    shape = tuple(int(x) for x in mesh.removeprefix('bad:').split(','))
    try:
      results[mesh] = run_steps(shape)[0]
    except sharding.MeshError as e:
      results[mesh] = str(e)
  print(json.dumps(results))
