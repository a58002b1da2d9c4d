"""Logit lens and attention maps against the model itself, on random tiny models."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import interpret
from research import model as model_lib

TOKENS = [5, 17, 3, 9, 30, 2, 11]


def params_of(cfg):
  z = jnp.zeros((1, 8), jnp.int32)
  variables = model_lib.Transformer(cfg).init(jax.random.key(1), z, z, z, jnp.zeros((1, 8), bool))
  return jax.tree.map(lambda x: x * 20, nn.unbox(variables['params']))  # sharp attention, not uniform


@pytest.mark.parametrize('extra', [dict(), dict(num_kv_heads=1, position='learned',
                                                scan_layers=False)])
@pytest.mark.slow
def test_lens_and_maps_are_the_models(extra):
  cfg = model_lib.TransformerConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=2,
                                    max_len=16, **extra)
  params = params_of(cfg)
  lens = interpret.logit_lens(params, cfg, TOKENS)
  t = len(TOKENS)
  assert lens.shape == (cfg.num_layers + 1, t, cfg.vocab_size)
  hidden, _ = model_lib.Transformer(cfg).apply(
      {'params': params}, jnp.asarray([TOKENS]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32),
      jnp.zeros((1, t), bool))
  want = jax.nn.log_softmax(model_lib.logits(params, hidden))[0]
  np.testing.assert_allclose(lens[-1], want, atol=1e-4)  # the last layer is the model
  assert np.abs(lens[0] - lens[-1]).max() > 1e-2  # earlier layers read something else
  maps = interpret.attention_maps(params, cfg, TOKENS)
  assert maps.shape == (cfg.num_layers, cfg.num_heads, t, t)
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
  assert np.all(maps[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0)
  mine, theirs = interpret.attention_outputs(params, cfg, TOKENS, maps)
  for a, b in zip(mine, theirs):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # Wrong maps (uniform over the causal past) do not reproduce the model's outputs.
  uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
  wrong, _ = interpret.attention_outputs(params, cfg, TOKENS,
                                         np.broadcast_to(uniform, maps.shape))
  assert np.abs(wrong[0] - theirs[0]).max() > 1e-3


def test_bad_tokens_raise():
  cfg = model_lib.TransformerConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match='non-empty'):
    interpret.logit_lens(params_of(cfg), cfg, [])
