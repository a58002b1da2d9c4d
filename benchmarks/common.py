"""Timing helpers shared by the benchmarks: medians after warm-up, the machine's dot peak."""
import statistics
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
