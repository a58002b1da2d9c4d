"""Attention patterns come from the batch; scanned and unrolled layers agree."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import kernels
from research import model as model_lib
from research import train_step as train_lib

CFG = model_lib.TransformerConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_len=16)
L = 12


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, segment_ids, positions, prefix):
  return model_lib.Transformer(cfg).apply({'params': params}, tokens, positions, segment_ids,
                                          prefix)


@pytest.fixture(scope='module')
def setup():
  model = model_lib.Transformer(CFG)
  z = jnp.zeros((1, L), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), z, z, z, jnp.zeros((1, L), bool))['params']
  tokens = jax.random.randint(jax.random.key(1), (1, L), 10, 128)
  return jax.tree.map(lambda x: getattr(x, 'value', x), params,
                      is_leaf=lambda x: hasattr(x, 'value')), tokens


def _changed_positions(params, tokens, changed_at, segment_ids=None, positions=None,
                       prefix=None, cfg=CFG):
  segment_ids = jnp.ones((1, L), jnp.int32) if segment_ids is None else segment_ids
  positions = jnp.arange(L)[None] if positions is None else positions
  prefix = jnp.zeros((1, L), bool) if prefix is None else prefix
  other = tokens.at[0, changed_at].set((tokens[0, changed_at] + 1) % 128)
  a, _ = _apply(cfg, params, tokens, segment_ids, positions, prefix)
  b, _ = _apply(cfg, params, other, segment_ids, positions, prefix)
  return np.flatnonzero(np.abs(np.asarray(a - b)).max(-1)[0] > 1e-6)


def test_causal_future_token_changes_no_earlier_output(setup):
  params, tokens = setup
  np.testing.assert_array_equal(_changed_positions(params, tokens, 7), np.arange(7, L))


def test_bidirectional_future_token_changes_earlier_outputs(setup):
  params, tokens = setup
  changed = _changed_positions(params, tokens, 7, prefix=jnp.ones((1, L), bool))
  np.testing.assert_array_equal(changed, np.arange(L))


def test_prefix_is_bidirectional_inside_and_causal_after(setup):
  params, tokens = setup
  prefix = jnp.arange(L)[None] < 5
  # A change inside the prefix reaches every position; one after it only later ones.
  np.testing.assert_array_equal(_changed_positions(params, tokens, 3, prefix=prefix),
                                np.arange(L))
  np.testing.assert_array_equal(_changed_positions(params, tokens, 8, prefix=prefix),
                                np.arange(8, L))


@pytest.mark.parametrize('prefix_all', [False, True])
def test_segments_never_attend_across(setup, prefix_all):
  params, tokens = setup
  segment_ids = jnp.asarray([[1] * 6 + [2] * 6])
  positions = jnp.asarray([list(range(6)) * 2])
  prefix = jnp.full((1, L), prefix_all)
  # Changing the first document's last token leaves the second document untouched ...
  changed = _changed_positions(params, tokens, 5, segment_ids, positions, prefix)
  assert set(changed) <= set(range(6)) and 5 in changed
  # ... and the second document computes what it would alone, at positions from 0.
  a, _ = _apply(CFG, params, tokens, segment_ids, positions, prefix)
  alone, _ = _apply(CFG, params, tokens[:, 6:], jnp.ones((1, 6), jnp.int32),
                    jnp.arange(6)[None], prefix[:, 6:])
  np.testing.assert_allclose(a[:, 6:], alone, atol=1e-5)


@pytest.mark.parametrize('overrides', [dict(), dict(mlp='swiglu', norm='layernorm',
                                                    position='learned', tie_embeddings=False,
                                                    scalar_head=True, remat='full')])
@pytest.mark.slow
def test_scanned_and_unrolled_layers_agree(overrides):
  scanned = dataclasses.replace(CFG, **overrides)
  unrolled = dataclasses.replace(scanned, scan_layers=False)
  z = jnp.zeros((2, L), jnp.int32)
  args = (jax.random.randint(jax.random.key(2), (2, L), 0, 128), jnp.tile(jnp.arange(L), (2, 1)),
          jnp.ones((2, L), jnp.int32), jnp.zeros((2, L), bool))
  params = jax.jit(model_lib.Transformer(scanned).init)(jax.random.key(0), z, z, z,
                                                         args[3])['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  tokens, positions, segment_ids, prefix = args
  h1, s1 = _apply(scanned, params, tokens, segment_ids, positions, prefix)
  h2, s2 = _apply(unrolled, model_lib.unstack_layers(params, scanned.num_layers), tokens,
                  segment_ids, positions, prefix)
  np.testing.assert_allclose(h1, h2, atol=1e-5)
  if scanned.scalar_head:
    assert s1.shape == (2, L)
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match='num_kv_heads'):
    model_lib.TransformerConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match='unknown model config keys'):
    model_lib.TransformerConfig.from_dict({'num_layer': 3})


def test_rope_matches_rotation_formula_and_is_relative():
  """rope(x, tables) rotates each pair (x_i, x_{i+H/2}) by angle pos * theta^(-i/(H/2)),
  so a query-key dot product depends only on the distance between their positions."""
  b, l, n, h, theta = 2, 9, 3, 8, 100.0
  x = jax.random.normal(jax.random.key(0), (b, l, n, h))
  positions = jnp.stack([jnp.arange(l), jnp.arange(l) + 5])
  out = model_lib.rope(x, model_lib.rope_tables(positions, h, theta))
  angle = positions[:, :, None, None] * theta ** (-np.arange(h // 2) / (h // 2))
  x1, x2 = np.asarray(x[..., :h // 2]), np.asarray(x[..., h // 2:])
  expected = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                             x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # Same vectors at positions shifted by 5 (row 1): every q.k dot product is unchanged.
  q = model_lib.rope(jnp.broadcast_to(x[:1], x.shape), model_lib.rope_tables(positions, h, theta))
  scores = jnp.einsum('blnh,bmnh->bnlm', q, q)
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4)


def _loss_example(tokens_BxL):
  b, l = tokens_BxL.shape
  targets = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros((b, 1), tokens_BxL.dtype)], axis=1)
  return dict(inputs=tokens_BxL, positions=jnp.tile(jnp.arange(l), (b, 1)),
              segment_ids=jnp.ones((b, l), jnp.int32), prefix=jnp.zeros((b, l), bool),
              targets=targets, weights=(jnp.arange(l) < l - 1).astype(jnp.float32)[None]
              .repeat(b, 0))


@functools.partial(jax.jit, static_argnums=0)
def _hidden_and_loss(cfg, params, example):
  """Hidden states and the summed loss + z-loss (the train step's loss_sums)."""
  model = model_lib.Transformer(cfg)
  hidden, _ = model.apply({'params': params}, example['inputs'], example['positions'],
                          example['segment_ids'], example['prefix'])
  return hidden, train_lib.loss_sums(params, model, example, 1e-4)[0]


@functools.partial(jax.jit, static_argnums=0)
def _hidden_loss_and_grads(cfg, params, example):
  """`_hidden_and_loss` and the loss's gradient."""
  grads = jax.grad(lambda p: _hidden_and_loss(cfg, p, example)[1])(params)
  return (*_hidden_and_loss(cfg, params, example), grads)


def test_bfloat16_compute_is_close_to_float32(setup):
  """A whole model's forward and fused head + loss with bf16 dot operands: the loss
  agrees to bf16 precision, and it is not silently float32. (The gradient: below.)"""
  params, _ = setup
  example = _loss_example(jax.random.randint(jax.random.key(5), (4, L), 10, 128))
  h32, loss32 = _hidden_and_loss(CFG, params, example)
  h16, loss16 = _hidden_and_loss(dataclasses.replace(CFG, compute_dtype='bfloat16'), params,
                                 example)
  assert h16.dtype == jnp.float32 and loss16.dtype == jnp.float32  # float32 out
  diff = float(jnp.max(jnp.abs(h16 - h32)))
  assert 1e-6 < diff < 0.05, diff  # rounded (bf16 has 8 bits of mantissa), yet close
  np.testing.assert_allclose(loss16, loss32, rtol=2e-3)


@pytest.mark.parametrize('bf16_dots', ['native', 'f32'])
@pytest.mark.slow
def test_bfloat16_gradient_runs_and_is_close_to_float32(setup, bf16_dots, monkeypatch):
  """The whole model's gradient (loss + z-loss, tied head, one loss chunk) with bf16 dot
  operands runs and agrees with float32's to bf16 precision, in both dot modes of
  kernels.BF16_DOTS, whatever the CPU. 'native' (bf16 x bf16 -> f32 dots, what 'auto'
  picks on AVX512-BF16 / AMX CPUs) used to fail on XLA:CPU with "Unsupported element
  type for DotThunk::Execute: BF16 x BF16 = F32": XLA folded the transpose of the LM
  head's (D, V) weight gradient into its dot, giving a bf16 dot that contracts the rows
  of its left operand, which no XLA:CPU kernel runs."""
  monkeypatch.setattr(kernels, 'BF16_DOTS', bf16_dots)
  params, _ = setup
  example = _loss_example(jax.random.randint(jax.random.key(7), (4, L), 10, 128))

  def loss_and_grads(cfg):  # a fresh trace: BF16_DOTS is read at trace time
    model = model_lib.Transformer(cfg)
    loss = lambda p: train_lib.loss_sums(p, model, example, 1e-4)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  loss32, grads32 = loss_and_grads(CFG)
  loss16, grads16 = loss_and_grads(dataclasses.replace(CFG, compute_dtype='bfloat16'))
  np.testing.assert_allclose(loss16, loss32, rtol=2e-3)
  flat32, flat16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
  assert all(g.dtype == jnp.float32 for g in flat16)
  errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(flat16, flat32)]
  assert max(errors) < 0.05, errors  # relative to each leaf's largest entry
  assert max(errors) > 1e-5, errors  # really rounded to bf16


@pytest.mark.parametrize('remat', ['dots', 'full'])
@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients(setup, remat):
  params, _ = setup
  example = _loss_example(jax.random.randint(jax.random.key(6), (2, L), 10, 128))
  h, loss, grads = _hidden_loss_and_grads(CFG, params, example)
  h_r, loss_r, grads_r = _hidden_loss_and_grads(dataclasses.replace(CFG, remat=remat), params,
                                                example)
  np.testing.assert_allclose(h_r, h, atol=1e-6)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r,
               grads)
