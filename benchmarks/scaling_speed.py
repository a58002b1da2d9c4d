"""Train-step speed of every shape of a scaling sweep, and the sweep's predicted wall time.

  python -m benchmarks.scaling_speed [--preset=cpu] [--steps=5] [--overhead_s=20]

For each (d_model, num_layers) of configs/scaling.py's ladder: median step time on random
tokens, tokens/s, FLOP/s under the sweep's convention. The prediction sums, over the
planned runs, D / tokens-per-second plus a fixed per-run overhead (compile, corpus
packing, the final whole-split evaluation, checkpoints), which --overhead_s sets.
"""
import jax
import numpy as np
from absl import flags

from benchmarks import common as bench
from configs import scaling as scaling_config
from experiments import common
from experiments import scaling
from research import flops as flops_lib
from research import model as model_lib
from research import objectives
from research import sharding
from research import train_step as train_lib

_PRESET = None
_STEPS = None
_OVERHEAD = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _PRESET, _STEPS, _OVERHEAD
  _PRESET = flags.DEFINE_string('preset', 'cpu', 'configs/scaling.py preset.')
  _STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per shape (median reported).', lower_bound=1)
  _OVERHEAD = flags.DEFINE_float('overhead_s', 20.0, 'Seconds per run besides its steps.')


def step_seconds(config, model_cfg, repeats):
  b, l = config.base.data.batch_size, config.base.data.seq_len
  model = model_lib.Transformer(model_cfg)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(
      **config.base.optimizer.to_dict()))
  shardings = train_lib.state_shardings(model, tx, mesh, b, l)
  ids = objectives.SpecialIds(pad=0, mask=4, vocab_size=model_cfg.vocab_size,
                              special=tuple(range(1, 113)), sentinels=tuple(range(5, 105)))
  step = train_lib.jit_train_step(
      train_lib.make_train_step(model, tx, schedule, objectives.get_objective('causal'), ids,
                                z_loss=config.base.train.z_loss), shardings, mesh)
  state = train_lib.make_train_state(model, tx, mesh, jax.random.key(0), b, l)
  rng = np.random.default_rng(0)
  batch = dict(tokens=rng.integers(369, model_cfg.vocab_size, (b, l)).astype(np.int32),
               segment_ids=np.ones((b, l), np.int32),
               positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)))
  holder = [state]

  def one():
    holder[0], m = step(holder[0], batch, jax.random.key(1))
    return m
  return bench.median_seconds(one, repeats=repeats, warmup=2)


def main(argv):
  del argv
  config = bench.preset_config(scaling_config, _PRESET.value)
  runs = scaling.plan(config)
  b, l = config.base.data.batch_size, config.base.data.seq_len
  convention = config.sweep.convention
  print(f'preset {_PRESET.value}, device {jax.devices()[0].device_kind}, batch {b}, T {l}, '
        f'FLOP convention {convention}')
  print(f'float32 2048² jnp.dot: {bench.matmul_flops_per_second() / 1e9:.1f} GFLOP/s (load '
        'from other processes lowers it)')
  tps = {}
  for d, layers in config.sweep.shapes:  # all of the ladder, to help choose budgets
    m = scaling.model_config(config, d, layers)
    s = step_seconds(config, m, _STEPS.value)
    tps[(d, layers)] = b * l / s
    fpt = flops_lib.train_flops_per_token(m, l, convention)
    print(f'd {d:4d} L {layers:2d}: N {flops_lib.scaling_params(m, convention):>10,} '
          f'({convention} count), {s * 1e3:7.1f} ms/step, {tps[(d, layers)]:9,.0f} tokens/s, '
          f'{tps[(d, layers)] * fpt / 1e9:6.1f} GFLOP/s', flush=True)
  total = 0.0
  for c in sorted({r.budget for r in runs}):
    secs = sum(r.tokens / tps[(r.model.d_model, r.model.num_layers)] + _OVERHEAD.value
               for r in runs if r.budget == c)
    total += secs
    print(f'budget {c:.3g}: {secs / 60:5.1f} min for {sum(r.budget == c for r in runs)} runs')
  print(f'predicted sweep: {total / 60:.1f} min for {len(runs)} runs '
        f'({_OVERHEAD.value:.0f} s overhead each)')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
