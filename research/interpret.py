"""Looking inside a model: the logit lens and per-head attention maps of one text.

  lens = logit_lens(params, cfg, tokens_T)        # (L+1)×T×V log-probs
  maps = attention_maps(params, cfg, tokens_T)    # L×N×T×T attention weights

One causal forward pass with Flax's `capture_intermediates` over the unrolled layers
(`sampling.unrolled`) gives every layer's residual stream and attention input. The
logit lens (nostalgebraist 2020) reads each residual stream through the final norm and
the output head, as if the model ended there; row 0 is the embeddings, row L is the
model's own output. Attention weights are recomputed from each layer's normalised input
with its query/key weights (rope, GQA and the causal mask as in model.py).
"""
import numpy as np
import jax
import jax.numpy as jnp

from research import model as model_lib
from research import sampling


def _forward(params, cfg, tokens_T):
  params, cfg = sampling.unrolled(params, cfg)
  tokens_1xT = jnp.asarray(tokens_T, jnp.int32)[None]
  t = tokens_1xT.shape[1]
  positions_1xT = jnp.arange(t)[None]
  (hidden_1xTxD, _), state = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_1xT, positions_1xT, jnp.ones((1, t), jnp.int32),
      jnp.zeros((1, t), bool), capture_intermediates=True, mutable=['intermediates'])
  return params, cfg, hidden_1xTxD, state['intermediates']


def _check(tokens_T, cfg):
  tokens_T = np.asarray(tokens_T)
  if tokens_T.ndim != 1 or not len(tokens_T):
    raise ValueError(f'tokens: expected a non-empty 1-D sequence, got shape {tokens_T.shape}')
  if cfg.position == 'learned' and len(tokens_T) > cfg.max_len:
    raise ValueError(f'{len(tokens_T)} tokens exceed the {cfg.max_len} learned positions')


def logit_lens(params, cfg, tokens_T) -> np.ndarray:
  """Next-token log-probs read from every layer: float32 (L+1)×T×V.

  Row 0 reads the token embeddings, row i the residual stream after layer i (through
  the final norm and output head); row L equals the model's log-softmax output.
  Raises ValueError for an empty or 2-D `tokens_T`.
  """
  _check(tokens_T, cfg)
  params, cfg, _, inter = _forward(params, cfg, tokens_T)
  t = len(tokens_T)
  embed = jnp.take(params['embed'], jnp.asarray(tokens_T), axis=0).astype(jnp.float32)
  if cfg.position == 'learned':
    embed = embed + params['position_embed'][:t]
  streams = [embed] + [inter[f'layer_{i}']['__call__'][0][0] for i in range(cfg.num_layers)]
  norm = model_lib.Norm(cfg.norm)
  out = []
  for x_TxD in streams:
    h = norm.apply({'params': params['final_norm']}, x_TxD.reshape(t, -1))
    out.append(jax.nn.log_softmax(model_lib.logits(params, h[None], cfg.compute_dtype)[0]))
  return np.asarray(jnp.stack(out), np.float32)


def attention_maps(params, cfg, tokens_T) -> np.ndarray:
  """Attention weights of every layer and query head: float32 L×N×T×T, rows (queries)
  summing to 1 over keys 0..query (causal). Raises ValueError as `logit_lens`."""
  _check(tokens_T, cfg)
  params, cfg, _, inter = _forward(params, cfg, tokens_T)
  t = len(tokens_T)
  n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  tables = None
  if cfg.position == 'rope':
    tables = model_lib.rope_tables(jnp.arange(t)[None], h, cfg.rope_theta)
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  maps = []
  for i in range(cfg.num_layers):
    x_TxD = inter[f'layer_{i}']['attention_norm']['__call__'][0].reshape(t, -1)
    w = params[f'layer_{i}']['attention']
    q = (x_TxD @ w['query'].astype(jnp.float32)).reshape(1, t, n, h)
    key = (x_TxD @ w['key'].astype(jnp.float32)).reshape(1, t, k, h)
    if tables is not None:
      q, key = model_lib.rope(q, tables), model_lib.rope(key, tables)
    key = jnp.repeat(key, n // k, axis=2)  # query head j reads kv head j // (n / k)
    scores_NxTxT = jnp.einsum('qnh,knh->nqk', q[0], key[0]) / h ** 0.5
    maps.append(jax.nn.softmax(jnp.where(causal_TxT, scores_NxTxT, -jnp.inf), axis=-1))
  return np.asarray(jnp.stack(maps), np.float32)


def attention_outputs(params, cfg, tokens_T, maps_LxNxTxT) -> tuple[list, list]:
  """(attention outputs recomputed from `maps` with each layer's value/out weights, the
  model's own attention outputs), each a list of T×D per layer: equal when the maps are
  the model's (a check of `attention_maps`)."""
  params, cfg, _, inter = _forward(params, cfg, tokens_T)
  t = len(tokens_T)
  n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  mine, theirs = [], []
  for i in range(cfg.num_layers):
    x_TxD = inter[f'layer_{i}']['attention_norm']['__call__'][0].reshape(t, -1)
    w = params[f'layer_{i}']['attention']
    v = jnp.repeat((x_TxD @ w['value']).reshape(t, k, h), n // k, axis=1)
    out_TxNxH = jnp.einsum('nqk,knh->qnh', jnp.asarray(maps_LxNxTxT[i]), v)
    mine.append(np.asarray(out_TxNxH.reshape(t, n * h) @ w['out']))
    theirs.append(np.asarray(inter[f'layer_{i}']['attention']['__call__'][0][0]))
  return mine, theirs
