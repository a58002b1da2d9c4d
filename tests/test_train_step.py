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


def run_steps(mesh_shape, objective='causal', steps=5, cfg=CFG, lr=3e-3, grad_accum=1):
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
  for _ in range(steps):
    state, metrics = step(state, _batch(), jax.random.key(1))
    losses.append(float(metrics['loss']))
  return losses, metrics, state


@pytest.mark.parametrize('objective', ['causal', 'masked', 'prefix', 'span', 'hybrid'])
def test_every_objective_overfits_one_batch(objective):
  losses, metrics, _ = run_steps((1, 1, 1), objective, steps=30, lr=1e-2)
  # Masked LM draws new masks every step over uniformly random tokens, so it learns
  # slowest; the others memorise the batch.
  assert losses[-1] < (0.9 if objective == 'masked' else 0.6) * losses[0], losses
  assert metrics['loss_tokens'] > 0 and 0 <= metrics['accuracy'] <= 1


def test_gradient_accumulation_matches_one_big_batch():
  one, _, _ = run_steps((1, 1, 1), steps=3)
  accumulated, _, _ = run_steps((1, 1, 1), steps=3, grad_accum=4)
  np.testing.assert_allclose(one, accumulated, rtol=1e-5)


def test_metrics_and_learning_rate_schedule():
  _, metrics, state = run_steps((1, 1, 1), steps=3)
  assert int(state.step) == 3
  for key in ('loss', 'accuracy', 'grad_norm', 'learning_rate', 'loss_tokens', 'z_loss'):
    assert np.isfinite(metrics[key]), key
  # 8 rows x 31 scorable positions, minus padding (5) and the boundary between documents.
  assert metrics['loss_tokens'] == B * (L - 2) - 5


def test_no_weight_decay_on_norms():
  mask = train_lib.decay_mask({'layers': {'attention_norm': {'scale': 1}, 'mlp': {'up': 1}},
                               'embed': 1, 'final_norm': {'scale': 1, 'bias': 1}})
  assert mask == {'layers': {'attention_norm': {'scale': False}, 'mlp': {'up': True}},
                  'embed': True, 'final_norm': {'scale': False, 'bias': False}}


def test_mesh_needing_more_devices_is_a_clear_error():
  with pytest.raises(sharding.MeshError, match='needs 8 devices'):
    sharding.make_mesh((2, 2, 2), jax.devices()[:1])


def _in_subprocess(mesh_arg: str) -> list:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'tests.test_train_step', mesh_arg], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


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
