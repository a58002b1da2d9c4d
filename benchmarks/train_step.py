"""Train-step speed for a config: parameters, compile time, step time, tokens/s, utilisation.

  python -m benchmarks.train_step [--preset=small] [--compile_layers=4,24] [--objective=causal]
                                  [--override=model.num_layers=2,data.batch_size=4]

Utilisation is achieved FLOP/s ('palm' convention: every matmul including the LM head,
research/flops.py) over the FLOP/s of a float32 2048² jnp.dot measured in the same run:
the practical peak of this machine.
On a GPU/TPU it also prints MFU against the named bf16 peak of the device.
"""
import statistics
import time

import jax
import numpy as np
from absl import flags

from benchmarks import common as bench
from configs import pretrain as pretrain_config
from experiments import common
from research import flops as flops_lib
from research import model as model_lib
from research import objectives
from research import sharding
from research import train_step as train_lib

_PRESET = None
_OBJECTIVE = None
_DTYPE = None
_STEPS = None
_COMPILE_LAYERS = None
_OVERRIDE = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _PRESET, _OBJECTIVE, _DTYPE, _STEPS, _COMPILE_LAYERS, _OVERRIDE
  _PRESET = flags.DEFINE_string('preset', 'small', 'configs/pretrain.py preset.')
  _OBJECTIVE = flags.DEFINE_string('objective', 'causal', 'Objective name.')
  _DTYPE = flags.DEFINE_enum('compute_dtype', '', ['', 'float32', 'bfloat16'],
                            'Override model.compute_dtype.')
  _STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median reported).', lower_bound=1)
  _COMPILE_LAYERS = flags.DEFINE_list('compile_layers', ['4', '24'],
                                      'Depths whose compile time is compared (empty: skip).')
  _OVERRIDE = flags.DEFINE_list('override', [],
                                'Config overrides KEY=VALUE (as --config.KEY=VALUE of the '
                                'experiments), e.g. a shrunken preset for a smoke run.')

IDS = None


def build(config, num_layers=None):
  mc = dict(config.model.to_dict())
  if num_layers:
    # The depth comparison is about the scanned stack (what deep models use): compile time
    # should not grow with the number of layers. Presets that unroll (small, bench) are
    # scanned here.
    mc['num_layers'] = num_layers
    mc['scan_layers'] = True
  if _DTYPE.value:
    mc['compute_dtype'] = _DTYPE.value
  cfg = model_lib.TransformerConfig.from_dict(mc)
  model = model_lib.Transformer(cfg)
  b, l = config.data.batch_size, config.data.seq_len
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(**config.optimizer))
  shardings = train_lib.state_shardings(model, tx, mesh, b, l)
  ids = objectives.SpecialIds(pad=0, mask=4, vocab_size=cfg.vocab_size,
                              special=tuple(range(1, 113)), sentinels=tuple(range(5, 105)))
  step = train_lib.jit_train_step(
      train_lib.make_train_step(model, tx, schedule, objectives.get_objective(_OBJECTIVE.value),
                                ids), shardings, mesh)
  state = train_lib.make_train_state(model, tx, mesh, jax.random.key(0), b, l)
  rng = np.random.default_rng(0)
  batch = dict(tokens=rng.integers(113, cfg.vocab_size, (b, l)).astype(np.int32),
               segment_ids=np.ones((b, l), np.int32),
               positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)))
  return cfg, step, state, batch, mesh


def compile_time(config, num_layers):
  _, step, state, batch, mesh = build(config, num_layers)
  with jax.set_mesh(mesh):
    return bench.compile_seconds(step.jitted, state, batch, jax.random.key(0))


def main(argv):
  del argv
  config = bench.preset_config(pretrain_config, _PRESET.value)
  for item in _OVERRIDE.value:
    key, _, value = item.partition('=')
    common.apply_override(config, key, value)
  cfg, step, state, batch, mesh = build(config)
  b, l = batch['tokens'].shape
  counts = flops_lib.param_counts(cfg)
  flops_per_token = flops_lib.train_flops_per_token(cfg, l, 'palm')
  with jax.set_mesh(mesh):
    compile_s = bench.compile_seconds(step.jitted, state, batch, jax.random.key(0))
  rng = jax.random.key(1)
  state, m = step(state, batch, rng)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  peak = bench.matmul_flops_per_second()
  tps = b * l / step_s
  achieved = tps * flops_per_token
  print(f'preset {_PRESET.value} ({cfg.compute_dtype}, objective {_OBJECTIVE.value}), '
        f'device {jax.devices()[0].device_kind}')
  print(f'parameters: {counts["total"] / 1e6:.2f}M total, '
        f'{counts["non_embedding"] / 1e6:.2f}M non-embedding')
  print(f'FLOP per token (palm convention: every matmul): {flops_per_token / 1e6:.1f}M')
  print(f'compile: {compile_s:.1f} s')
  print(f'step: {step_s * 1e3:.0f} ms (median of {_STEPS.value}), {tps:,.0f} tokens/s')
  print(f'achieved: {achieved / 1e9:.1f} GFLOP/s; float32 2048² jnp.dot: {peak / 1e9:.1f} GFLOP/s')
  device_peak = common.device_peak_flops()
  if device_peak:
    print(f'MFU against {device_peak / 1e12:.0f} TFLOP/s bf16 peak: {achieved / device_peak:.3f}')
  if _COMPILE_LAYERS.value:
    secs = {int(n): compile_time(config, int(n)) for n in _COMPILE_LAYERS.value}
    shallow, deep = min(secs), max(secs)
    print('compile seconds by depth: ' + ', '.join(f'{n} layers {s:.1f}' for n, s in secs.items())
          + f' (ratio {secs[deep] / secs[shallow]:.2f})')
  print(f'utilisation {achieved / peak:.3f}')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
