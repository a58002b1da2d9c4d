"""Tool-use speed: resuming from the KV cache after a tool result vs re-prefilling, and
the latency of one calculator / search / python call.

  python -m benchmarks.tools [--preset=small] [--context=1000] [--result=50]

Random params of the preset's model with max_len raised to fit the context (speed does
not depend on training). One sequence of --context tokens is prefilled into the cache;
then a tool result of --result tokens comes back. The runtime's way
(`research/tools/runtime.py`): one cached step writes `<|/tool_call|>` + the result
block (--result + 4 tokens, padded to the chunk width) into the existing cache and
picks the next token. The alternative: prefill the whole context again (context +
block) and pick the next token from its logits. Both are timed here side by side
(median of --repeats after a warm-up, compile excluded) and the ratio printed; the goal
is >= 5x. Then the median latency of one `registry.run_call` per tool (the search
index is loaded from its disk cache, or built and cached on the first run). Nothing is
asserted.
"""
import json
import statistics
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
from research.tools import registry
from research.tools import runtime
from research.tools import search as search_lib

_PRESET = None
_CONTEXT = None
_RESULT = None
_REPEATS = None
_CALLS = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _PRESET, _CONTEXT, _RESULT, _REPEATS, _CALLS
  _PRESET = flags.DEFINE_string('preset', 'small', 'configs/pretrain.py preset.')
  _CONTEXT = flags.DEFINE_integer('context', 1000, 'Tokens in the cache when the call returns.',
                                  lower_bound=1)
  _RESULT = flags.DEFINE_integer('result', 50, 'Tokens of the tool result.', lower_bound=1)
  _REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs of each path.', lower_bound=1)
  _CALLS = flags.DEFINE_integer('calls', 50, 'Timed calls per tool.', lower_bound=1)


def _median(fn, repeats):
  """Median seconds of fn() (blocked until ready), after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def resume_vs_reprefill(cfg, params, context: int, result: int, repeats: int) -> dict:
  """Seconds to take a `result`-token tool result at `context` tokens, both ways."""
  params, cfg = sampling.unrolled(params, cfg)
  rng = np.random.default_rng(0)
  block = len(runtime.RESULT_PREFIX) + result + len(runtime.RESULT_SUFFIX) + 1
  width = runtime._chunk_width(block, 1 << 20)  # pylint: disable=protected-access
  prompt = rng.integers(10, cfg.vocab_size, (1, context)).astype(np.int32)
  lengths = np.array([context], np.int32)
  none, key, temp = np.full(1, -1, np.int32), jax.random.key(0), jnp.float32(0.0)
  slots = context + width * (repeats + 2)
  # The runtime's own jitted prefill and step (private: this times exactly what it runs).
  prefill, step = runtime._prefill, runtime._step  # pylint: disable=protected-access
  _, _, cache0 = prefill(params, prompt, lengths, none, key, temp, cfg=cfg, cache_len=slots,
                         top_k=0, top_p=1.0)
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :block] = rng.integers(10, cfg.vocab_size, block)
  positions = np.zeros((1, width), np.int32)
  positions[0, :block] = context + np.arange(block)
  segments = np.zeros((1, width), np.int32)
  segments[0, :block] = 1
  last = np.array([block - 1], np.int32)
  state = {'cache': cache0, 'step': 0}

  def resume():  # one cached step over the block, as the runtime does
    state['step'] += 1
    token, _, state['cache'] = step(
        params, state['cache'], tokens, positions, segments, last, none, key,
        np.int32(state['step']), temp, cfg=cfg, top_k=0, top_p=1.0)
    return token

  full = np.concatenate([prompt, tokens[:, :block]], axis=1)
  full_lengths = np.array([full.shape[1]], np.int32)

  def reprefill():  # the whole context again, then the next token
    token, _, _ = prefill(params, full, full_lengths, none, key, temp, cfg=cfg,
                          cache_len=full.shape[1], top_k=0, top_p=1.0)
    return token

  t_resume = _median(resume, repeats)
  t_full = _median(reprefill, repeats)
  return dict(resume_s=t_resume, reprefill_s=t_full, speedup=t_full / t_resume,
              block_tokens=block, chunk_width=width, context=context)


def tool_latency(calls: int) -> dict:
  """Median seconds of one run_call per tool (parse, schema, run, format)."""
  start = time.perf_counter()
  index = search_lib.corpus_index('sotu')
  load_s = time.perf_counter() - start
  tools = registry.default_tools(index)
  rng = np.random.default_rng(0)
  exprs = [f'{a} * {b} + {c} / 7' for a, b, c in rng.integers(1, 10_000, (calls, 3))]
  words = [w for p in index.passages[:200] for w in p.split()[:3]]
  queries = [' '.join(rng.choice(words, 3)) for _ in range(calls)]

  def median_of(texts):
    times = []
    for text in texts:
      t = time.perf_counter()
      registry.run_call(text, tools)
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  call = lambda name, args: '{"name": "%s", "arguments": %s}' % (name, args)
  return dict(
      search_index_s=load_s, search_from_cache=index.from_cache, passages=len(index),
      calculator_s=median_of([call('calculator', json.dumps({'expression': e})) for e in exprs]),
      search_s=median_of([call('search', json.dumps({'query': q})) for q in queries]),
      python_s=median_of([call('python', json.dumps({'code': 'print(6 * 7)'}))] * 5))


def main(argv):
  del argv
  config = bench.preset_config(pretrain_config, _PRESET.value)
  mc = dict(config.model.to_dict())
  mc['max_len'] = max(mc['max_len'], _CONTEXT.value + 128)
  cfg = model_lib.TransformerConfig.from_dict(mc)
  z = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model_lib.Transformer(cfg).init)(jax.random.key(0), z, z, z,
                                                    jnp.zeros((1, 8), bool))['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  print(f'model: preset {_PRESET.value}, {cfg.num_layers} layers, d {cfg.d_model}, '
        f'max_len {cfg.max_len}, {jax.devices()[0].platform}')
  r = resume_vs_reprefill(cfg, params, _CONTEXT.value, _RESULT.value, _REPEATS.value)
  print(f'tool result of {_RESULT.value} tokens at a {r["context"]}-token context '
        f'({r["block_tokens"]} tokens written, chunk width {r["chunk_width"]}):')
  print(f'  resume from the KV cache: {1e3 * r["resume_s"]:8.2f} ms')
  print(f'  re-prefill the context:   {1e3 * r["reprefill_s"]:8.2f} ms')
  print(f'  speedup: {r["speedup"]:.1f}x (goal >= 5x)')
  t = tool_latency(_CALLS.value)
  print(f'search index: {t["passages"]} sotu passages, '
        f'{"loaded from the disk cache" if t["search_from_cache"] else "built and cached"} '
        f'in {t["search_index_s"]:.2f} s')
  print(f'latency per call (median, run_call: parse + schema + run): calculator '
        f'{1e3 * t["calculator_s"]:.3f} ms, search {1e3 * t["search_s"]:.2f} ms, '
        f'python {1e3 * t["python_s"]:.1f} ms (a sandboxed subprocess)')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
