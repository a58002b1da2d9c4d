"""Greedy decoding speed: our jitted KV-cache `generate` against transformers' `generate`.

  python -m benchmarks.sampling_vs_hf [--preset=small] [--batch=8] [--prompt_len=64]
                                      [--new_tokens=256] [--reps=3] [--torch_threads=1,2]

The preset's model (random init; speed does not depend on training) is exported with
the HF bridge (research/hf.py: `hf_config` + `to_hf_state_dict`, the same conversion as
experiments/export_hf.py, in memory) and loaded into transformers' own class (Arcee for
the GELU presets), float32, eager. Both decode the same batch of full-length prompts
greedily with no end-of-sequence stop, so every row makes exactly --new_tokens tokens;
transformers with `cache_implementation='static'` (a preallocated KV cache). Calls
alternate, --reps times after a warm-up (ours also after compiling); printed: medians
as new tokens/s (batch * new_tokens / seconds), the ratio, and the fraction of
generated tokens on which the two agree (float32 on both sides: expect 100%, a rare
near-tie may flip one argmax and the rest of its row). transformers runs at each of
--torch_threads (default 1 and all CPUs; see benchmarks/peer_torch.py on why) and its
best is the figure compared.
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks import common as bench
from configs import pretrain as pretrain_config
from experiments import common
from research import hf
from research import model as model_lib
from research import sampling


def hf_model(params, model_dict):
  """Our params -> a transformers CausalLM in float32 eval mode (in memory)."""
  config_dict = hf.hf_config(model_dict)
  config_dict.pop(hf.RESEARCH_KEY)
  config_dict.pop('architectures')
  # Rotary positions have no table: a longer limit only silences transformers' warning
  # when prompt + new tokens exceed the preset's max_len (64 + 256 > 256 for `small`).
  config_dict['max_position_embeddings'] = max(config_dict['max_position_embeddings'], 4096)
  config = transformers.AutoConfig.for_model(config_dict.pop('model_type'), **config_dict)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  state = hf.to_hf_state_dict(jax.tree.map(np.asarray, params), model_dict)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=False)
  assert not unexpected and set(missing) <= {'lm_head.weight'}, (missing, unexpected)
  model.tie_weights()
  model.generation_config.eos_token_id = None  # no stop: every row makes all tokens
  model.generation_config.pad_token_id = 0
  return model.eval()


def main():
  parser = bench.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--batch', type=bench.positive_int, default=8)
  parser.add_argument('--prompt_len', type=bench.positive_int, default=64)
  parser.add_argument('--new_tokens', type=bench.positive_int, default=256)
  parser.add_argument('--reps', type=bench.positive_int, default=3)
  parser.add_argument('--torch_threads', default=f'1,{os.cpu_count()}')
  args = parser.parse_args()
  try:
    threads = sorted({bench.positive_int(n) for n in args.torch_threads.split(',')})
  except argparse.ArgumentTypeError as e:
    parser.error(f'--torch_threads={args.torch_threads}: {e}')
  model_dict = dict(bench.preset_config(pretrain_config, args.preset).model.to_dict())
  cfg = model_lib.TransformerConfig.from_dict(model_dict)
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  z = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model_lib.Transformer(cfg).init)(jax.random.key(0), z, z, z,
                                                    jnp.zeros((1, 8), bool))['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  theirs_model = hf_model(params, model_dict)
  prompt = np.random.default_rng(0).integers(113, cfg.vocab_size, (b, p)).astype(np.int32)
  lengths = np.full((b,), p, np.int32)
  prompt_t = torch.from_numpy(prompt.astype(np.int64))

  kwargs = dict(cfg=cfg, max_new_tokens=n, eos_id=-1, pad_id=0, temperature=0.0)
  start = time.perf_counter()
  sampling.generate.lower(params, prompt, lengths, jax.random.key(0), **kwargs).compile()
  compile_s = time.perf_counter() - start

  def ours():
    out = sampling.generate(params, prompt, lengths, jax.random.key(0), **kwargs)
    return np.asarray(out.tokens_BxN)

  @torch.inference_mode()
  def theirs(n_threads):
    torch.set_num_threads(n_threads)
    out = theirs_model.generate(prompt_t, attention_mask=torch.ones_like(prompt_t),
                                max_new_tokens=n, do_sample=False,
                                cache_implementation='static')
    return out[:, p:].numpy()

  print(f'preset {args.preset}: {cfg.num_layers} layers, d {cfg.d_model}, vocab '
        f'{cfg.vocab_size}, {cfg.compute_dtype}; batch {b}, {p}-token prompts, {n} new '
        f'tokens, greedy; transformers {transformers.__version__} '
        f'({type(theirs_model).__name__}, static cache, eager, torch '
        f'{torch.__version__}, threads {threads}); jax {jax.__version__}; '
        f'ours compiled in {compile_s:.1f} s')
  fns = dict(ours=ours, **{f'theirs@{k}': (lambda k=k: theirs(k)) for k in threads})
  outs = {name: fn() for name, fn in fns.items()}  # warm-up
  times = {k: [] for k in fns}
  for _ in range(args.reps):
    for name, fn in fns.items():
      t = time.perf_counter()
      outs[name] = fn()
      times[name].append(time.perf_counter() - t)
  rate = {k: b * n / statistics.median(v) for k, v in times.items()}
  print('transformers at ' + ', '.join(f'{k} thread(s) {rate[f"theirs@{k}"]:,.0f}'
                                       for k in threads) + ' new tokens/s')
  best = max(threads, key=lambda k: rate[f'theirs@{k}'])
  rate['theirs'], times['theirs'], outs['theirs'] = (rate[f'theirs@{best}'],
                                                     times[f'theirs@{best}'],
                                                     outs[f'theirs@{best}'])
  agree = float(np.mean(outs['ours'] == outs['theirs']))
  rows_equal = int(np.sum(np.all(outs['ours'] == outs['theirs'], axis=1)))
  print(f'ours (jitted KV cache)       {rate["ours"]:8,.0f} new tokens/s  '
        f'(median of {args.reps}: {statistics.median(times["ours"]):.2f} s)')
  print(f'transformers (static cache)  {rate["theirs"]:8,.0f} new tokens/s  '
        f'({best} thread(s); median of {args.reps}: {statistics.median(times["theirs"]):.2f} s)')
  print(f'ours / transformers {rate["ours"] / rate["theirs"]:.2f}; tokens agree at '
        f'{100 * agree:.1f}% of positions, {rows_equal}/{b} rows identical')


if __name__ == '__main__':
  common.exit_on_user_error(main)()
