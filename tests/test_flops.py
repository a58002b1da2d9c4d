"""Parameter and FLOP accounting against the real model and a hand count."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from research import flops
from research import model as model_lib

# V 100, d 8, 2 layers, 2 heads of 4, GELU 4x (F 32), RMSNorm, tied embeddings, T 16.
SMALL = model_lib.TransformerConfig(vocab_size=100, d_model=8, num_layers=2, num_heads=2,
                                    max_len=16)
T = 16


def model_param_count(cfg) -> tuple:
  """(total, embedding-table) sizes of the parameters the model really creates."""
  z = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z + 1,
                          z.astype(bool))
  leaves = jax.tree_util.tree_leaves_with_path(shapes['params'])
  total = sum(math.prod(x.shape) for _, x in leaves)
  tables = sum(math.prod(x.shape) for p, x in leaves
               if p[0].key in ('embed', 'unembed', 'position_embed'))
  return total, tables


def test_hand_count_of_parameters():
  # per layer: Q, K, V, O 4·8·8 = 256; MLP 2·8·32 = 512; two RMSNorm scales 16 -> 784.
  # 2 layers 1568 + final norm 8 = 1576 non-embedding; embedding 100·8 = 800 (tied head).
  assert flops.param_counts(SMALL) == dict(total=2376, non_embedding=1576, embedding=800,
                                           per_layer=784)
  assert flops.matmul_params(SMALL) == 2 * (256 + 512) + 800
  assert flops.scaling_params(SMALL, '6N') == flops.scaling_params(SMALL, '6N+attn') == 1576
  assert flops.scaling_params(SMALL, 'chinchilla') == 2376


def test_hand_count_of_flops_per_token():
  assert flops.train_flops_per_token(SMALL, T, '6N') == 6 * 1576
  # Kaplan et al. eq. 2.2: forward 2N + 2·L·T·d_attn = 2·1576 + 2·2·16·8; training 3x.
  assert flops.train_flops_per_token(SMALL, T, '6N+attn') == 3 * (2 * 1576 + 2 * 2 * 16 * 8)
  # Hoffmann et al. app. F per token: embeddings 2·8·100 = 1600; per layer QKV 2·3·8·8 = 384,
  # logits 2·16·8 = 256, softmax 3·2·16 = 96, attention × V 256, output 2·8·8 = 128,
  # FFN 2·2·8·32 = 1024 -> 2144; final logits 1600. Forward 1600 + 2·2144 + 1600 = 7488.
  assert flops.forward_flops_chinchilla(SMALL, T) == 7488
  assert flops.train_flops_per_token(SMALL, T, 'chinchilla') == 3 * 7488
  # PaLM app. B: 6 · (matmul weights with the head, 2336) + 12·L·T·d_attn.
  assert flops.train_flops_per_token(SMALL, T, 'palm') == 6 * 2336 + 12 * 2 * 16 * 8


def test_bench_shapes_give_the_documented_89_7_mflop_under_palm():
  bench = model_lib.TransformerConfig(vocab_size=8192, d_model=384, num_layers=6, num_heads=6,
                                      max_len=256)
  assert flops.train_flops_per_token(bench, 256, 'palm') / 1e6 == pytest.approx(89.65, abs=0.01)


@pytest.mark.parametrize('overrides', [
    {},
    dict(norm='layernorm', mlp='swiglu'),
    dict(tie_embeddings=False, position='learned', scalar_head=True),
    dict(num_kv_heads=1, head_dim=8, mlp_dim=24),
])
def test_param_counts_match_the_model(overrides):
  cfg = dataclasses.replace(SMALL, **overrides)
  counts = flops.param_counts(cfg)
  total, tables = model_param_count(cfg)
  assert counts['total'] == total
  assert counts['embedding'] == tables
  assert counts['non_embedding'] == total - tables


def test_gqa_counts_fewer_key_value_flops():
  gqa = dataclasses.replace(SMALL, num_kv_heads=1)
  # K and V shrink from 2·8·8 to 2·8·4 weights: 2 layers · 64 fewer, 2 FLOPs each.
  assert (flops.forward_flops_chinchilla(SMALL, T) - flops.forward_flops_chinchilla(gqa, T)
          == 2 * 2 * 64)


def test_unknown_convention_is_an_error():
  with pytest.raises(ValueError, match='6N\\+attn'):
    flops.train_flops_per_token(SMALL, T, 'kaplan')
