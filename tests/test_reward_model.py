"""Reward model: Bradley-Terry loss, which token is scored, and a separable preference set.

Tiny random models (float32); the training test runs the step through
`train_step.jit_train_step` on a one-device mesh.
"""
import pytest
import functools

import jax
import jax.numpy as jnp
import numpy as np

from research import model as model_lib
from research import reward_model
from research import sharding
from research import train_step as train_lib

V, L = 64, 10
MARK = 2  # the token that makes a sequence preferred
CFG = model_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2,
                                  max_len=32)
# Compile-time options (these programs run in milliseconds either way).
FAST = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


def init_params(cfg, seed=0):
  """Random LM params drawn by numpy (compiling the model's init costs CPU-seconds)."""
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                          jnp.zeros((1, 8), bool))['params']
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    noise = rng.normal(0.0, cfg.init_std, leaf.value.shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == 'scale' else noise
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, 'value'))


def test_bradley_terry_loss_against_hand_values():
  chosen = jnp.array([2.0, 0.0, 1.0])
  rejected = jnp.array([1.0, 0.0, 3.0])
  loss, metrics = reward_model.bradley_terry_loss(chosen, rejected)
  # −log σ(1), −log σ(0), −log σ(−2)
  want = np.mean([np.log1p(np.exp(-1.0)), np.log(2.0), np.log1p(np.exp(2.0))])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(loss, 1.0444456, rtol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], 0.5)  # right, tie (1/2), wrong
  np.testing.assert_allclose(metrics['margin'], -1 / 3, rtol=1e-6)
  both = np.array([2.0, 0.0, 1.0, 1.0, 0.0, 3.0])
  np.testing.assert_allclose(metrics['score_mean'], both.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['score_std'], both.std(), rtol=1e-6)
  # Large margins do not overflow.
  loss, _ = reward_model.bradley_terry_loss(jnp.array([100.0]), jnp.array([-100.0]))
  assert float(loss) == 0.0
  loss, _ = reward_model.bradley_terry_loss(jnp.array([-100.0]), jnp.array([100.0]))
  np.testing.assert_allclose(loss, 200.0)


def test_with_scalar_head_adds_a_head_of_the_model_shape():
  params = init_params(CFG)
  new, cfg = reward_model.with_scalar_head(params, CFG, jax.random.key(0))
  assert cfg.scalar_head and not CFG.scalar_head
  assert 'scalar_head' not in params  # the input is not modified
  z = jnp.zeros((1, 4), jnp.int32)
  want = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                        jnp.zeros((1, 4), bool))['params']
  want = jax.tree.map(lambda x: x.value.shape, want, is_leaf=lambda x: hasattr(x, 'value'))
  assert jax.tree.map(np.shape, new) == want
  zero, _ = reward_model.with_scalar_head(params, CFG, jax.random.key(0), std=0.0)
  assert not np.any(zero['scalar_head'])


def test_sequence_scores_read_the_last_real_token():
  params, cfg = reward_model.with_scalar_head(init_params(CFG, seed=1), CFG, jax.random.key(1))
  model = model_lib.Transformer(cfg)
  rng = np.random.default_rng(0)
  lengths = np.array([L, 3, 1, 6], np.int32)
  tokens = rng.integers(3, V, (4, L)).astype(np.int32)
  tokens[np.arange(L)[None] >= lengths[:, None]] = 0
  scores = jax.jit(functools.partial(reward_model.sequence_scores, model=model),
                   compiler_options=FAST)
  base = np.asarray(scores(params, tokens_BxL=tokens, lengths_B=lengths))
  # The scalar head's output at index lengths − 1 of a plain forward.
  _, scalar = jax.jit(model.apply, compiler_options=FAST)(
      {'params': params}, tokens, jnp.broadcast_to(jnp.arange(L), (4, L)),
      (np.arange(L)[None] < lengths[:, None]).astype(np.int32), jnp.zeros((4, L), bool))
  np.testing.assert_allclose(base, np.asarray(scalar)[np.arange(4), lengths - 1], rtol=1e-5,
                             atol=1e-6)
  padded = tokens.copy()
  pads = np.arange(L)[None] >= lengths[:, None]
  padded[pads] = rng.integers(3, V, pads.sum())  # anything after the last real token
  np.testing.assert_allclose(scores(params, tokens_BxL=padded, lengths_B=lengths), base,
                             rtol=1e-6, atol=1e-6)
  last = tokens.copy()
  last[np.arange(4), lengths - 1] = (last[np.arange(4), lengths - 1] + 7) % (V - 3) + 3
  changed = np.asarray(scores(params, tokens_BxL=last, lengths_B=lengths))
  assert np.all(np.abs(changed - base) > 1e-5)


def preference_pairs(n, seed):
  """Chosen rows contain MARK once; the rejected row is the same with MARK replaced."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, L + 1, n).astype(np.int32)
  chosen = rng.integers(3, V, (n, L)).astype(np.int32)
  chosen[np.arange(L)[None] >= lengths[:, None]] = 0
  rejected = chosen.copy()
  at = (rng.random(n) * lengths).astype(int)
  chosen[np.arange(n), at] = MARK
  return dict(chosen_tokens=chosen, chosen_lengths=lengths, rejected_tokens=rejected,
              rejected_lengths=lengths.copy())


@pytest.mark.slow
def test_reward_model_learns_a_separable_preference():
  params, cfg = reward_model.with_scalar_head(init_params(CFG, seed=2), CFG, jax.random.key(2))
  model = model_lib.Transformer(cfg)
  b, steps = 32, 60
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(
      learning_rate=1e-2, warmup_steps=10, total_steps=steps, weight_decay=0.0))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  shardings = train_lib.state_shardings(model, tx, mesh, b, L)
  state = jax.device_put(reward_model.init_reward_state(params, tx), shardings)
  step = train_lib.jit_train_step(reward_model.make_reward_train_step(model, tx, schedule),
                                  shardings, mesh)
  train = preference_pairs(b * steps, seed=0)
  for i in range(steps):
    batch = {k: v[i * b:(i + 1) * b] for k, v in train.items()}
    state, metrics = step(state, batch, jax.random.key(0))
  assert float(metrics['loss']) < 0.2, metrics

  pair_scores = jax.jit(functools.partial(reward_model.pair_scores, model=model),
                        compiler_options=FAST)
  held_out = preference_pairs(256, seed=1)
  chosen, rejected = pair_scores(state.params, batch=held_out)
  _, metrics = reward_model.bradley_terry_loss(chosen, rejected)
  assert float(metrics['accuracy']) > 0.95, metrics

  # The offset centres the training scores.
  chosen, rejected = pair_scores(state.params, batch={k: v[:256] for k, v in train.items()})
  offset = reward_model.score_offset(jnp.concatenate([chosen, rejected]))
  centred = reward_model.normalized(jnp.concatenate([chosen, rejected]), offset)
  np.testing.assert_allclose(jnp.mean(centred), 0.0, atol=1e-5)


def test_reward_fn_scores_prompt_and_response_packed():
  params, cfg = reward_model.with_scalar_head(init_params(CFG, seed=3), CFG, jax.random.key(3))
  model = model_lib.Transformer(cfg)
  prompt = np.array([[5, 6, 7], [8, 0, 0]], np.int32)
  lengths = np.array([3, 1], np.int32)
  response = np.array([[9, 1, 0, 0], [10, 11, 12, 13]], np.int32)
  valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  tokens, total = reward_model.pack_prompt_response(prompt, lengths, response, valid)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 9, 1, 0, 0], [8, 10, 11, 12, 13, 0, 0]])
  np.testing.assert_array_equal(total, [5, 5])
  reward_fn = reward_model.make_reward_fn(model)
  both = jax.jit(lambda params: (reward_fn(prompt, lengths, response, valid, params, 0.25),
                                 reward_model.sequence_scores(params, model, tokens, total)),
                 compiler_options=FAST)
  got, want = both(params)
  want = want - 0.25
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
