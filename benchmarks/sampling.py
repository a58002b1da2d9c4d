"""Decoding speed: KV-cached `generate` against the uncached greedy reference.

  python -m benchmarks.sampling [--preset=small] [--batch=8] [--new_tokens=256]

Random params of the preset's model (speed does not depend on training). Prompts have
mixed lengths up to --prompt_len. Both decoders run greedy with eos disabled, so every
row makes exactly --new_tokens tokens; their outputs are compared as a check. Prints
compile time, run time (median of --repeats after a warm-up; 1 run for the uncached
decoder, whose cost per token is one full forward pass over P + new_tokens positions),
tokens/s and the speedup. Nothing is asserted.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import common as bench
from configs import pretrain as pretrain_config
from experiments import common
from research import model as model_lib
from research import sampling

_PRESET = None
_BATCH = None
_PROMPT_LEN = None
_NEW_TOKENS = None
_REPEATS = None
_DTYPE = None
_UNCACHED = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _PRESET, _BATCH, _PROMPT_LEN, _NEW_TOKENS, _REPEATS, _DTYPE, _UNCACHED
  _PRESET = flags.DEFINE_string('preset', 'small', 'configs/pretrain.py preset.')
  _BATCH = flags.DEFINE_integer('batch', 8, 'Prompts decoded together.', lower_bound=1)
  _PROMPT_LEN = flags.DEFINE_integer('prompt_len', 16, 'Longest prompt; others are shorter.',
                                     lower_bound=1)
  _NEW_TOKENS = flags.DEFINE_integer('new_tokens', 256, 'Tokens generated per prompt.', lower_bound=1)
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs of the cached decoder.', lower_bound=1)
  _DTYPE = flags.DEFINE_enum('compute_dtype', '', ['', 'float32', 'bfloat16'],
                            'Override model.compute_dtype.')
  _UNCACHED = flags.DEFINE_bool('uncached', True, 'Also time the uncached reference (slow).')


def _timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def _compile(jitted, *args, **kwargs) -> float:
  start = time.perf_counter()
  jitted.lower(*args, **kwargs).compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  mc = dict(bench.preset_config(pretrain_config, _PRESET.value).model.to_dict())
  if _DTYPE.value:
    mc['compute_dtype'] = _DTYPE.value
  cfg = model_lib.TransformerConfig.from_dict(mc)
  b, p, n = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  z = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model_lib.Transformer(cfg).init)(jax.random.key(0), z, z, z,
                                                    jnp.zeros((1, 8), bool))['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  rng = np.random.default_rng(0)
  lengths = rng.integers(max(1, p // 2), p + 1, b).astype(np.int32)
  lengths[0] = p
  prompt = np.where(np.arange(p)[None] < lengths[:, None],
                    rng.integers(113, cfg.vocab_size, (b, p)), 0).astype(np.int32)
  print(f'preset {_PRESET.value}: {cfg.num_layers} layers, d {cfg.d_model}, vocab '
        f'{cfg.vocab_size}, {cfg.compute_dtype}; batch {b}, prompts of {lengths.min()}-{p} '
        f'tokens, {n} new tokens; device {jax.devices()[0].device_kind} '
        f'({os.cpu_count()} CPUs visible)')

  rows = []
  for name, kwargs in (('cached greedy', dict(temperature=0.0)),
                       ('cached top-p 0.9, T 0.8', dict(temperature=0.8, top_p=0.9))):
    kwargs = dict(cfg=cfg, max_new_tokens=n, eos_id=-1, pad_id=0, **kwargs)
    args = (params, prompt, lengths, jax.random.key(0))
    compile_s = _compile(sampling.generate, *args, **kwargs)
    out, _ = _timed(sampling.generate, *args, **kwargs)  # warm-up
    seconds = bench.median_seconds(lambda: sampling.generate(*args, **kwargs),
                                   repeats=_REPEATS.value, warmup=0)
    rows.append((name, compile_s, seconds))
    if name == 'cached greedy':
      cached_tokens = np.asarray(out.tokens_BxN)

  if _UNCACHED.value:
    kwargs = dict(cfg=cfg, max_new_tokens=n)
    compile_s = _compile(sampling.greedy_uncached, params, prompt, lengths, **kwargs)
    out, seconds = _timed(sampling.greedy_uncached, params, prompt, lengths, **kwargs)
    rows.append(('uncached greedy (reference)', compile_s, seconds))
    out = np.asarray(out)
    uncached_tokens = np.stack([out[i, l:l + n] for i, l in enumerate(lengths)])
    agree = float(np.mean(uncached_tokens == cached_tokens))

  print(f'{"decoder":30s} {"compile s":>10s} {"run s":>8s} {"tokens/s":>10s} {"ms/step":>8s}')
  for name, compile_s, seconds in rows:
    print(f'{name:30s} {compile_s:10.2f} {seconds:8.3f} {b * n / seconds:10,.0f} '
          f'{1e3 * seconds / n:8.2f}')
  if _UNCACHED.value:
    print(f'cached greedy is {rows[-1][2] / rows[0][2]:.1f}x faster than uncached; '
          f'greedy tokens agree at {100 * agree:.1f}% of positions')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
