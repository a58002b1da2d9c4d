"""Timing helpers shared by the benchmarks: medians after warm-up, the machine's dot peak;
their command-line error path (one line, exit 2)."""
import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, repeats=5, warmup=1):
  """Median wall time of fn(*args) (blocked until ready), after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_flops_per_second(n=2048, dtype=jnp.float32, repeats=10) -> float:
  """FLOP/s of a jitted n×n float32 `jnp.dot`: the practical peak utilisation divides by."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  return 2 * n ** 3 / median_seconds(dot, a, b, repeats=repeats, warmup=2)


def compile_seconds(jitted, *args) -> float:
  start = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - start


# -- the one error path of the entry points (experiments.common.run_main), for benchmarks --


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose bad argument is one line `error: ...` on stderr and exit status 2, as
  at every entry point (argparse's own prints the usage first, often several lines)."""

  def error(self, message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def positive_int(text: str) -> int:
  """An argparse/flag type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: expected an integer >= 1') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected an integer >= 1')
  return value


def preset_config(module, name: str, flag: str = '--preset'):
  """`module.get_config(name)` (a configs/ module); an unknown preset is a UserError naming
  the flag and the presets there are."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  try:
    return module.get_config(name)
  except (ValueError, KeyError) as e:
    raise common.UserError(f'{flag}={name}: {e}') from None


def numbers(values, kind, flag: str) -> list:
  """[kind(v) for v in values] (a DEFINE_list flag's strings); a value that is not a positive
  number is a UserError naming the flag."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  try:
    out = [kind(v) for v in values]
  except ValueError:
    raise common.UserError(f'{flag}={",".join(values)}: expected positive numbers') from None
  if any(not x > 0 for x in out):
    raise common.UserError(f'{flag}={",".join(values)}: expected positive numbers')
  return out
