"""Training throughput at the `bench` shapes, float32 and bfloat16, with a breakdown.

  python -m benchmarks.throughput            # no arguments needed
  python -m benchmarks.throughput --plain    # also the same step on plain JAX ops (before)

Shapes (configs/pretrain.py:bench): 6 layers, d 384, 6 heads, T 256, vocab 8192, batch 8,
GELU 4x, tied embeddings; 89.7 MFLOP per trained token (6N + 12·L·d·T). Each figure is
the median of several calls after compile, timed round-robin with a float32 2048² jnp.dot
in the same run (the machine is shared; only side-by-side ratios mean anything).
"Utilisation" is achieved FLOP/s over that dot's FLOP/s.

Breakdown: forward (loss), backward (value_and_grad minus forward), optimiser (AdamW
update); and per component, forward+backward of all layers' attention, all layers' MLP
(two dense + GELU), and the fused LM-head loss, measured in isolation at the same shapes.
`--plain` swaps research.kernels' functions for their plain reference versions at trace
time, giving the "before" figures of a straightforward JAX step.
"""
import contextlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common as bench
from configs import pretrain as pretrain_config
from experiments import common
from research import flops as flops_lib
from research import kernels
from research import model as model_lib
from research import objectives
from research import train_step as train_lib


@contextlib.contextmanager
def plain_kernels(enabled: bool):
  """Temporarily route the model through the plain reference ops (for 'before' figures)."""
  saved = (kernels.dense, kernels.attention, kernels.lm_head_loss)
  if enabled:
    kernels.dense = kernels.dense_reference
    kernels.attention = lambda *a, impl='auto', **kw: kernels.attention_reference(*a, **kw)
    kernels.lm_head_loss = lambda *a, chunk_size=None, **kw: kernels.lm_head_loss_reference(
        *a, **kw)
  try:
    yield
  finally:
    kernels.dense, kernels.attention, kernels.lm_head_loss = saved


def round_robin(fns: dict, reps: int, with_min: bool = False) -> dict:
  """Median seconds of each zero-argument fn, interleaved so drift hits all alike.

  with_min: also the fastest call of each, as '<name>_min' (see `main`).
  """
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  out = {k: statistics.median(v) for k, v in times.items()}
  if with_min:
    out.update({f'{k}_min': min(v) for k, v in times.items()})
  return out


def build(compute_dtype: str):
  config = pretrain_config.get_config('bench')
  mc = config.model.to_dict()
  mc['compute_dtype'] = compute_dtype
  cfg = model_lib.TransformerConfig.from_dict(mc)
  model = model_lib.Transformer(cfg)
  b, l = config.data.batch_size, config.data.seq_len
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(**config.optimizer))
  ids = objectives.SpecialIds(pad=0, mask=4, vocab_size=cfg.vocab_size,
                              special=tuple(range(1, 113)), sentinels=tuple(range(5, 105)))
  rng = np.random.default_rng(0)
  batch = dict(tokens=jnp.asarray(rng.integers(113, cfg.vocab_size, (b, l)), jnp.int32),
               segment_ids=jnp.ones((b, l), jnp.int32),
               positions=jnp.tile(jnp.arange(l, dtype=jnp.int32), (b, 1)))
  _, init = train_lib.abstract_train_state(model, tx, b, l)
  state = jax.jit(lambda r: nn.unbox(init(r)))(jax.random.key(0))
  example = objectives.causal(batch, None, ids)
  step = jax.jit(train_lib.make_train_step(model, tx, schedule, objectives.get_objective('causal'),
                                           ids), donate_argnums=0)
  return cfg, model, tx, state, batch, example, step


def measure(compute_dtype: str, reps: int, plain: bool) -> dict:
  with plain_kernels(plain):
    cfg, model, tx, state, batch, example, step = build(compute_dtype)
    b, l = batch['tokens'].shape
    # The step donates its state: the other measurements use their own copies.
    params = jax.tree.map(jnp.copy, state.params)
    opt_state = jax.tree.map(jnp.copy, state.opt_state)
    loss = jax.jit(lambda p: train_lib.loss_sums(p, model, example, 0.0)[0])
    grad = jax.jit(jax.value_and_grad(lambda p: train_lib.loss_sums(p, model, example, 0.0)[0]))
    grads = grad(params)[1]
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))

    # Components at the same shapes, all layers' worth.
    d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.hidden_dim
    key = jax.random.split(jax.random.key(1), 8)
    x = jax.random.normal(key[0], (b * l, d)) * 0.1
    q = jax.random.normal(key[1], (b, l, n, h))
    k_ = jax.random.normal(key[2], (b, l, n, h))
    v = jax.random.normal(key[3], (b, l, n, h))
    seg, prefix = jnp.ones((b, l), jnp.int32), jnp.zeros((b, l), bool)
    w_up = jax.random.normal(key[4], (d, f)) * 0.02
    w_down = jax.random.normal(key[5], (f, d)) * 0.02
    emb = jax.random.normal(key[6], (cfg.vocab_size, d)) * 0.02
    tgt = batch['tokens'].reshape(-1)
    wts = jnp.ones((b * l,))
    cd = cfg.compute_dtype

    def attn_loss(q, k, v):
      return jnp.sum(kernels.attention(q, k, v, seg, prefix, compute_dtype=cd) ** 2)

    def mlp_loss(x, w1, w2):
      hid = jax.nn.gelu(kernels.dense(x, w1, compute_dtype=cd), approximate=True)
      return jnp.sum(kernels.dense(hid, w2, compute_dtype=cd) ** 2)

    def head_loss(x, w):
      return kernels.lm_head_loss(x, w, tgt, wts, compute_dtype=cd)[0]

    attn = jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2)))
    mlp = jax.jit(jax.grad(mlp_loss, argnums=(0, 1, 2)))
    head = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    a, bb = jax.random.normal(key[7], (2048, 2048)), jax.random.normal(key[0], (2048, 2048))
    dot = jax.jit(jnp.dot)

    holder = [state]

    def train():
      holder[0], m = step(holder[0], batch, jax.random.key(0))
      return m

    t = round_robin(dict(step=train, forward=lambda: loss(params),
                         forward_backward=lambda: grad(params),
                         optimiser=lambda: update(grads, opt_state, params),
                         attention=lambda: attn(q, k_, v), mlp=lambda: mlp(x, w_up, w_down),
                         lm_head=lambda: head(x, emb), dot=lambda: dot(a, bb)), reps,
                    with_min=True)
  flops_per_token = flops_lib.train_flops_per_token(cfg, l, 'palm')
  t['tokens_per_second'] = b * l / t['step']
  t['achieved'] = t['tokens_per_second'] * flops_per_token
  t['dot_flops'] = 2 * 2048 ** 3 / t['dot']
  t['utilisation_of_mins'] = (b * l / t['step_min'] * flops_per_token) / (2 * 2048 ** 3 / t['dot_min'])
  t['layers'] = cfg.num_layers
  return t


def report(name: str, t: dict) -> None:
  L = t['layers']
  print(f'\n{name}: {t["tokens_per_second"]:,.0f} tokens/s, step {t["step"] * 1e3:.0f} ms, '
        f'{t["achieved"] / 1e9:.1f} GFLOP/s achieved; float32 2048² dot '
        f'{t["dot_flops"] / 1e9:.1f} GFLOP/s in the same run')
  print(f'  forward {t["forward"] * 1e3:6.0f} ms   backward '
        f'{(t["forward_backward"] - t["forward"]) * 1e3:6.0f} ms   optimiser '
        f'{t["optimiser"] * 1e3:6.0f} ms   (step {t["step"] * 1e3:.0f} ms)')
  print(f'  fwd+bwd in isolation: attention {t["attention"] * L * 1e3:6.0f} ms ({L} layers)   '
        f'MLP {t["mlp"] * L * 1e3:6.0f} ms ({L} layers)   LM head {t["lm_head"] * 1e3:6.0f} ms')


def main():
  parser = bench.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--plain', action='store_true', help='also the plain-JAX step (before)')
  parser.add_argument('--reps', type=bench.positive_int, default=7)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind}, bf16 dots native: '
        f'{kernels.bf16_dots_native()}')
  results = {}
  for dtype in ('float32', 'bfloat16'):
    if args.plain:
      report(f'{dtype}, plain JAX ops (before)', measure(dtype, args.reps, plain=True))
    results[dtype] = measure(dtype, args.reps, plain=False)
    report(f'{dtype}, research.kernels', results[dtype])
  # On a shared host the 2048^2 dot's speed swings more than the step's (seen here: 93 to
  # 140 GFLOP/s within an hour), and the ratio with it.  The fastest step over the fastest
  # dot is the steadier estimate of what a quiet machine gives; the figure (the
  # last two lines) is the ratio of medians.
  print()
  for dtype, t in results.items():
    print(f'{dtype}: fastest step / fastest dot {t["utilisation_of_mins"]:.3f}')
  for dtype, t in results.items():
    print(f'{dtype} utilisation {t["achieved"] / t["dot_flops"]:.3f}')


if __name__ == '__main__':
  common.exit_on_user_error(main)()
