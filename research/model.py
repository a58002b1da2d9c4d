"""The Transformer: one file, top to bottom.

A pre-norm decoder-style Transformer whose attention pattern comes from the batch,
not from the class: every token carries a segment id (packed documents never see
each other) and a `prefix` flag (a prefix token is visible to every token of its
segment). All-False prefix is causal attention, all-True is bidirectional, a
leading run of True is prefix-LM. So one model serves causal-LM, masked-LM,
prefix-LM and span corruption, and the objective alone decides.

The model returns final hidden states (after the last norm), plus an optional
scalar per position (the reward model / value head). For decoding it also takes and
returns a `KVCache` (keys and values of every layer): new tokens are written into it
and attend to every cached token (research/sampling.py drives it). Logits are
`hidden @ head_weights(params).T`; the training loss fuses that product with the
cross-entropy (`kernels.lm_head_loss`) so the B·L·V logits never need to exist.

Dimension letters:
  B batch, L sequence length, D model width, N query heads, K key/value heads,
  H head dim, F MLP hidden width, V vocabulary, S key length (cache slots).

Activations are kept 2-D, (B·L, D), around the dense layers: XLA:CPU runs those
dots 2.5x faster than on (B, L, D) (STACK_NOTES). The residual stream, norms and
softmax stay float32; only dot operands are cast to `compute_dtype`.
"""
import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from research import kernels


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int = 4096
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: Optional[int] = None  # None: = num_heads (MHA); fewer: GQA.
  head_dim: Optional[int] = None  # None: d_model // num_heads.
  mlp_dim: Optional[int] = None  # None: 4·d_model (gelu) or 8/3·d_model (swiglu).
  mlp: str = 'gelu'  # 'gelu' | 'swiglu'
  norm: str = 'rmsnorm'  # 'rmsnorm' | 'layernorm'
  norm_eps: float = 1e-6  # added to the mean square (variance) inside every norm
  position: str = 'rope'  # 'rope' | 'learned'
  max_len: int = 256  # only bounds learned positions.
  rope_theta: float = 10_000.0
  tie_embeddings: bool = True
  scalar_head: bool = False
  scan_layers: bool = True
  remat: str = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs only)
  compute_dtype: str = 'float32'  # dtype of dot operands; accumulation is float32.
  param_dtype: str = 'float32'
  attention_impl: str = 'auto'  # see kernels.attention
  init_std: float = 0.02

  def __post_init__(self):
    for name, allowed in (('mlp', ('gelu', 'swiglu')), ('norm', ('rmsnorm', 'layernorm')),
                          ('position', ('rope', 'learned')), ('remat', ('none', 'full', 'dots')),
                          ('compute_dtype', ('float32', 'bfloat16')),
                          ('param_dtype', ('float32', 'bfloat16'))):
      if getattr(self, name) not in allowed:
        raise ValueError(f'model.{name}={getattr(self, name)!r}: expected one of {allowed}')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} is not a multiple of '
                       f'model.num_kv_heads={self.kv_heads}')

  @classmethod
  def from_dict(cls, d) -> 'TransformerConfig':
    """From a config dict, where 0 stands for None (ml_collections fields keep one type)."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown model config keys: {sorted(unknown)}')
    for k in ('num_kv_heads', 'head_dim', 'mlp_dim'):
      d[k] = d.get(k) or None
    return cls(**d)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def hidden_dim(self) -> int:
    if self.mlp_dim:
      return self.mlp_dim
    if self.mlp == 'swiglu':  # same parameter count as a 4x GELU MLP, rounded to 64.
      return 64 * round(8 * self.d_model / 3 / 64)
    return 4 * self.d_model


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row is no NaN


def _param(module, name, shape, axes, std, dtype):
  init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
  return module.param(name, init, shape, jnp.dtype(dtype))


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32."""
  kind: str
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (d,), jnp.float32)
    x = x.astype(jnp.float32)
    if self.kind == 'layernorm':
      x = x - jnp.mean(x, axis=-1, keepdims=True)
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                        (d,), jnp.float32)
    else:
      bias = 0.0
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return x * scale + bias


def rope_tables(positions_BxL, head_dim, theta):
  """(cos, signed sin), each B×L×1×H float32, for `rope` (rotate-half form).

  Computed once per forward pass and shared by every layer: sin/cos are the costly
  part of rope on a CPU, and XLA recomputes them inside each consumer's fusion unless
  they are materialised (the optimization barrier); with the tables, rope is two
  multiplies and an add (4x faster fwd+bwd at the bench shapes, measured).
  """
  freq_H2 = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) / (head_dim // 2))
  angle_BxLx1xH2 = positions_BxL[:, :, None, None].astype(jnp.float32) * freq_H2
  sin, cos = jnp.sin(angle_BxLx1xH2), jnp.cos(angle_BxLx1xH2)
  tables = (jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1))
  return jax.lax.optimization_barrier(tables)


def rope(x_BxLxNxH, tables):
  """Rotary position embedding: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], float32."""
  cos_BxLx1xH, signed_sin_BxLx1xH = tables
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos_BxLx1xH + jnp.concatenate([x2, x1], axis=-1) * signed_sin_BxLx1xH


class Attention(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_MxD, rope_tables_, segment_ids_BxL, prefix_BxL, layer_cache=None,
               decode=None):
    """-> (output M×D, updated layer_cache | None).

    rope_tables_: `rope_tables` of the tokens' positions (None: no rotary embedding).
    Decoding passes this layer's cache {'key', 'value'} (B×K×S×H) and
    decode = (index, mask B×L×S): the chunk goes to slots [index, index + L).
    """
    cfg = self.cfg
    b, l = segment_ids_BxL.shape
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2: keep the residual sum O(1)
    w_q = _param(self, 'query', (d, n * h), ('embed', 'heads'), cfg.init_std, cfg.param_dtype)
    w_k = _param(self, 'key', (d, k * h), ('embed', 'kv_heads'), cfg.init_std, cfg.param_dtype)
    w_v = _param(self, 'value', (d, k * h), ('embed', 'kv_heads'), cfg.init_std, cfg.param_dtype)
    w_o = _param(self, 'out', (n * h, d), ('heads', 'embed'), out_std, cfg.param_dtype)

    dense = lambda x, w: kernels.dense(x, w, compute_dtype=cfg.compute_dtype)
    q_BxLxNxH = dense(x_MxD, w_q).reshape(b, l, n, h)
    k_BxLxKxH = dense(x_MxD, w_k).reshape(b, l, k, h)
    v_BxLxKxH = dense(x_MxD, w_v).reshape(b, l, k, h)
    if cfg.position == 'rope':
      q_BxLxNxH = rope(q_BxLxNxH, rope_tables_)
      k_BxLxKxH = rope(k_BxLxKxH, rope_tables_)
    q_BxLxNxH = _constrain(q_BxLxNxH, ('batch', 'length', 'act_heads', None))
    if layer_cache is None:
      out_BxLxNxH = kernels.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL,
                                      prefix_BxL, compute_dtype=cfg.compute_dtype,
                                      impl=cfg.attention_impl)
      return dense(out_BxLxNxH.reshape(b * l, n * h), w_o), None
    # Decoding: write the chunk into the cache first, then attend to the whole cache.
    # In this order the cache is only read after the write, so XLA updates it in place
    # (reading the old cache while writing the new one made it copy every step).
    index, mask_BxLxS = decode
    write = lambda cache_BxKxSxH, x_BxLxKxH: jax.lax.dynamic_update_slice_in_dim(
        cache_BxKxSxH, x_BxLxKxH.transpose(0, 2, 1, 3).astype(cache_BxKxSxH.dtype), index, 2)
    layer_cache = dict(key=write(layer_cache['key'], k_BxLxKxH),
                       value=write(layer_cache['value'], v_BxLxKxH))
    out_BxLxNxH = cached_attention(q_BxLxNxH, layer_cache['key'], layer_cache['value'],
                                   mask_BxLxS, cfg.compute_dtype)
    return dense(out_BxLxNxH.reshape(b * l, n * h), w_o), layer_cache


def cached_attention(q_BxLxNxH, keys_BxKxSxH, values_BxKxSxH, mask_BxLxS, compute_dtype):
  """A chunk of queries attends to a cache: `kernels.attention_reference`'s math.

  Scores / sqrt(H), float32 softmax, matmul operands in compute_dtype. The cache is
  heads-major (B×K×S×H) so both matmuls read it with batch dims leading, without a
  transposed copy: a decode step reads each layer's cache once. The G query heads of a
  kv head are folded into the matmul rows, so GQA reads each kv head once.
  """
  b, l, n, h = q_BxLxNxH.shape
  k = keys_BxKxSxH.shape[1]
  g = n // k
  dtype = jnp.dtype(compute_dtype)
  q_BxKxGLxH = q_BxLxNxH.reshape(b, l, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * l, h)
  scores_BxKxGLxS = jnp.einsum('bkqh,bksh->bkqs', q_BxKxGLxH.astype(dtype),
                               keys_BxKxSxH.astype(dtype), preferred_element_type=jnp.float32)
  mask_Bx1xGLxS = jnp.tile(mask_BxLxS[:, None], (1, 1, g, 1))
  scores_BxKxGLxS = jnp.where(mask_Bx1xGLxS, scores_BxKxGLxS / h ** 0.5, _MASKED)
  probs_BxKxGLxS = jax.nn.softmax(scores_BxKxGLxS, axis=-1)
  out_BxKxGLxH = jnp.einsum('bkqs,bksh->bkqh', probs_BxKxGLxS.astype(dtype),
                            values_BxKxSxH.astype(dtype), preferred_element_type=jnp.float32)
  return out_BxKxGLxH.reshape(b, k, g, l, h).transpose(0, 3, 1, 2, 4).reshape(b, l, n, h)


class Mlp(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_MxD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.hidden_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    dense = lambda x, w: kernels.dense(x, w, compute_dtype=cfg.compute_dtype)
    w_up = _param(self, 'up', (d, f), ('embed', 'mlp'), cfg.init_std, cfg.param_dtype)
    w_down = _param(self, 'down', (f, d), ('mlp', 'embed'), out_std, cfg.param_dtype)
    up_MxF = dense(x_MxD, w_up)
    if cfg.mlp == 'swiglu':
      w_gate = _param(self, 'gate', (d, f), ('embed', 'mlp'), cfg.init_std, cfg.param_dtype)
      hidden_MxF = nn.silu(dense(x_MxD, w_gate)) * up_MxF
    else:
      hidden_MxF = nn.gelu(up_MxF, approximate=True)
    hidden_MxF = _constrain(hidden_MxF, ('batch', 'act_mlp'))
    return dense(hidden_MxF, w_down)


class Block(nn.Module):
  """Pre-norm residual block, nn.scan's signature:
  (carry, broadcast[, scanned layer cache]) -> (carry, updated layer cache | None)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_MxD, aux, layer_cache=None):
    rope_tables_, segment_ids_BxL, prefix_BxL, decode = aux
    norm = lambda name: Norm(self.cfg.norm, self.cfg.norm_eps, name=name)
    attention_MxD, layer_cache = Attention(self.cfg, name='attention')(
        norm('attention_norm')(x_MxD), rope_tables_, segment_ids_BxL, prefix_BxL, layer_cache,
        decode)
    x_MxD = x_MxD + attention_MxD
    x_MxD = x_MxD + Mlp(self.cfg, name='mlp')(norm('mlp_norm')(x_MxD))
    return _constrain(x_MxD, ('batch', 'act_embed')), layer_cache


def _block_class(cfg: TransformerConfig):
  if cfg.remat == 'none':
    return Block
  policy = (jax.checkpoint_policies.checkpoint_dots if cfg.remat == 'dots'
            else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


@flax.struct.dataclass
class KVCache:
  """What decoding keeps of the tokens seen so far: S slots, filled from slot 0.

  layers: per layer {'key': B×K×S×H, 'value': B×K×S×H} (after rope, in compute_dtype,
    which is all attention reads of them; heads-major, see `cached_attention`):
    stacked on a leading layer axis when layers are scanned, a tuple of per-layer dicts
    when unrolled. Decoding is faster unrolled: a scanned stack slices (copies) every
    layer's weights and cache at every step (`sampling.py` unrolls).
  positions_BxS, segment_ids_BxS, prefix_BxS: each slot's token's position, segment id
    and prefix flag, so that a new token attends to the cache by the same rule as in
    training (`kernels.attention_mask`). Empty slots have segment 0 (padding), which no
    real token attends.
  index: int32 scalar, the first slot the next call writes.
  """
  layers: Any
  positions_BxS: jax.Array
  segment_ids_BxS: jax.Array
  prefix_BxS: jax.Array
  index: jax.Array


def init_cache(cfg: TransformerConfig, batch_size: int, num_slots: int) -> KVCache:
  """An empty cache of `num_slots` slots."""
  shape = (batch_size, cfg.kv_heads, num_slots, cfg.dim_per_head)
  zeros = lambda *lead: jnp.zeros(lead + shape, jnp.dtype(cfg.compute_dtype))
  if cfg.scan_layers:
    layers = dict(key=zeros(cfg.num_layers), value=zeros(cfg.num_layers))
  else:
    layers = tuple(dict(key=zeros(), value=zeros()) for _ in range(cfg.num_layers))
  slots_BxS = jnp.zeros((batch_size, num_slots), jnp.int32)
  return KVCache(layers=layers, positions_BxS=slots_BxS, segment_ids_BxS=slots_BxS,
                 prefix_BxS=slots_BxS.astype(bool), index=jnp.zeros((), jnp.int32))


class Transformer(nn.Module):
  """tokens, positions, segment ids, prefix flags (all B×L) -> (hidden B×L×D, scalar B×L | None).

  With `cache` (decoding) the L tokens are written at slots [cache.index, +L) and attend
  to every cached token (themselves included) by the training mask rule; the result is
  (hidden, scalar, updated cache).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, prefix_BxL,
               cache: Optional[KVCache] = None):
    cfg = self.cfg
    b, l = tokens_BxL.shape
    embed_VxD = _param(self, 'embed', (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                       cfg.init_std, cfg.param_dtype)
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(jnp.float32)
    if cfg.position == 'learned':
      pos_PxD = _param(self, 'position_embed', (cfg.max_len, cfg.d_model), (None, 'embed'),
                       cfg.init_std, cfg.param_dtype)
      x_BxLxD = x_BxLxD + jnp.take(pos_PxD, positions_BxL, axis=0)
    x_MxD = _constrain(x_BxLxD.reshape(b * l, cfg.d_model), ('batch', 'act_embed'))

    decode = None
    if cache is not None:  # the chunk's slot metadata, then one mask for all layers
      write = lambda all_BxS, chunk_BxL: jax.lax.dynamic_update_slice_in_dim(
          all_BxS, chunk_BxL.astype(all_BxS.dtype), cache.index, axis=1)
      cache = cache.replace(positions_BxS=write(cache.positions_BxS, positions_BxL),
                            segment_ids_BxS=write(cache.segment_ids_BxS, segment_ids_BxL),
                            prefix_BxS=write(cache.prefix_BxS, prefix_BxL))
      decode = (cache.index, kernels.attention_mask(
          segment_ids_BxL, prefix_BxL, q_positions=positions_BxL,
          kv_positions=cache.positions_BxS, kv_segment_ids=cache.segment_ids_BxS,
          kv_prefix=cache.prefix_BxS))
    rope_tables_ = None
    if cfg.position == 'rope':
      rope_tables_ = rope_tables(positions_BxL, cfg.dim_per_head, cfg.rope_theta)
    aux = (rope_tables_, segment_ids_BxL, prefix_BxL, decode)  # broadcast to every layer
    block = _block_class(cfg)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                       in_axes=nn.broadcast if cache is None else (nn.broadcast, 0),
                       length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      cache_args = () if cache is None else (cache.layers,)
      x_MxD, layer_caches = layers(cfg, name='layers')(x_MxD, aux, *cache_args)
    else:
      layer_caches = []
      for i in range(cfg.num_layers):
        cache_args = () if cache is None else (cache.layers[i],)
        x_MxD, layer_cache = block(cfg, name=f'layer_{i}')(x_MxD, aux, *cache_args)
        layer_caches.append(layer_cache)
      layer_caches = tuple(layer_caches)

    hidden_MxD = Norm(cfg.norm, cfg.norm_eps, name='final_norm')(x_MxD)
    if not cfg.tie_embeddings:
      _param(self, 'unembed', (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
             cfg.init_std, cfg.param_dtype)
    scalar_BxL = None
    if cfg.scalar_head:
      w_Dx1 = _param(self, 'scalar_head', (cfg.d_model, 1), ('embed', None), cfg.init_std,
                     jnp.float32)
      scalar_BxL = (hidden_MxD @ w_Dx1).reshape(b, l)
    hidden_BxLxD = hidden_MxD.reshape(b, l, cfg.d_model)
    if cache is None:
      return hidden_BxLxD, scalar_BxL
    return hidden_BxLxD, scalar_BxL, cache.replace(layers=layer_caches, index=cache.index + l)


def head_weights(params) -> jax.Array:
  """The V×D matrix whose product with the hidden states gives the logits."""
  return params['unembed'] if 'unembed' in params else params['embed']


def logits(params, hidden_BxLxD, compute_dtype='float32') -> jax.Array:
  """Full logits (float32). Training uses the fused loss instead; sampling uses this."""
  b, l, d = hidden_BxLxD.shape
  w_VxD = head_weights(params)
  out = kernels.dense(hidden_BxLxD.reshape(b * l, d), w_VxD.T, compute_dtype=compute_dtype)
  return out.reshape(b, l, -1).astype(jnp.float32)


def unstack_layers(params, num_layers: int):
  """Scanned params ('layers' stacked on axis 0) -> unrolled ('layer_0', ...)."""
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(num_layers):
    params[f'layer_{i}'] = jax.tree.map(lambda x: x[i], stacked)
  return params
