"""Where a PPO iteration's time goes: sampling, reward-model scoring, forwards + updates.

  python -m benchmarks.ppo [--config=default] [--repeats=5]

Random params of the tiny model (speed does not depend on training) at the shapes of a
configs/rlhf.py preset (batch, prompt width, new tokens, epochs × minibatches; the
reward/value model is the same Transformer with a scalar head). Times, as medians of
--repeats runs after compile and a warm-up run:

  iteration  the whole jitted `ppo.make_ppo_iteration` (what experiments.rlhf runs);
  sampling   a jitted `sampling.generate` alone on the same batch (the rollout);
  scoring    a jitted reward-model forward on that rollout (`reward_model.make_reward_fn`, as the RLHF stage);
  update     the remainder: old / reference / value forwards, GAE and the
             epochs × minibatches policy and value updates;
  gold       VADER on the batch's decoded-size texts (Python, outside jit), if installed.

Then rollout tokens/s (batch × new tokens / sampling seconds) next to the cached decoder
measured the way benchmarks/sampling.py measures it (greedy, eos off, --decode_batch rows,
prompts up to 16 tokens, --decode_tokens new tokens), same model, same run. eos is
disabled in the rollout too, so every row makes all its tokens. Nothing is asserted.
"""
import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from benchmarks import common as bench
from configs import pretrain as pretrain_config
from configs import rlhf as rlhf_config
from experiments import common
from experiments import rlhf
from research import rl_tasks
from research import model as model_lib
from research import ppo
from research import reward_model
from research import sampling
from research import sharding

_CONFIG = None
_PRESET = None
_REPEATS = None
_DECODE_BATCH = None
_DECODE_TOKENS = None
_MESH = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _CONFIG, _PRESET, _REPEATS, _DECODE_BATCH, _DECODE_TOKENS, _MESH
  _CONFIG = flags.DEFINE_string('config', 'default', 'configs/rlhf.py preset (its PPO shapes).')
  _PRESET = flags.DEFINE_string('preset', 'tiny', 'configs/pretrain.py preset (the model).')
  _REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs of each program.', lower_bound=1)
  _DECODE_BATCH = flags.DEFINE_integer('decode_batch', 8, 'Rows of the sampling-benchmark decode.',
                                       lower_bound=1)
  _DECODE_TOKENS = flags.DEFINE_integer('decode_tokens', 256, 'New tokens of that decode.',
                                        lower_bound=1)
  _MESH = flags.DEFINE_string('mesh', '', "'' : plain jax.jit (no mesh); 'D,F,T': the iteration "
                              'compiled on a (data, fsdp, tensor) mesh as experiments.rlhf runs it '
                              '(ppo.jit_on_mesh; 1,1,1 is the one-device stage path)')


def _params(cfg, seed=0):
  """Random params drawn by numpy (the model's init would cost a compile)."""
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                          jnp.zeros((1, 8), bool))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(0.0, cfg.init_std, leaf.value.shape).astype(np.float32)
    return jnp.asarray(noise + 1.0 if path[-1].key == 'scale' else noise)
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, 'value'))


def _prompts(b, p, vocab, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, p // 4), p + 1, b).astype(np.int32)
  lengths[0] = p
  prompt = np.where(np.arange(p)[None] < lengths[:, None],
                    rng.integers(113, vocab, (b, p)), 0).astype(np.int32)
  return prompt, lengths


def _median(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  rc = bench.preset_config(rlhf_config, _CONFIG.value, '--config')
  pc = rc.ppo
  cfg = model_lib.TransformerConfig.from_dict(
      bench.preset_config(pretrain_config, _PRESET.value).model.to_dict())
  b, p, n = pc.batch_size, rc.data.max_prompt_tokens, pc.max_new_tokens
  ppo_cfg = rlhf.ppo_config(rc.to_dict())
  grpo = ppo_cfg.advantage == 'grpo'
  params = _params(cfg)
  rm_params, rm_cfg = reward_model.with_scalar_head(params, cfg, jax.random.key(1))
  rm_params = jax.tree.map(jnp.copy, rm_params)
  prompt, lengths = _prompts(b, p, cfg.vocab_size)
  if grpo:
    prompt, lengths = ppo.repeat_prompts(prompt[:b // ppo_cfg.group_size],
                                         lengths[:b // ppo_cfg.group_size], ppo_cfg.group_size)
  eos = -1  # every row makes all n tokens
  print(f'model {_PRESET.value}: {cfg.num_layers} layers, d {cfg.d_model}, vocab '
        f'{cfg.vocab_size}, {cfg.compute_dtype}; rlhf config {_CONFIG.value}: batch {b}, prompts '
        f'of {int(lengths.min())}-{p} tokens, {n} new tokens, {ppo_cfg.advantage}, '
        f'{ppo_cfg.epochs} epochs × {ppo_cfg.minibatches} minibatches; device '
        f'{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs visible)')

  # The whole iteration.
  tx = optax.chain(optax.clip_by_global_norm(pc.grad_clip), optax.adam(pc.policy_lr))
  tx_value = None if grpo else optax.chain(optax.clip_by_global_norm(pc.grad_clip),
                                           optax.adam(pc.value_lr))
  rm_model = model_lib.Transformer(rm_cfg)
  # The reward function the RLHF stage runs: responses closed by the stop token (a real
  # id here, while sampling never stops early: eos -1).
  reward_fn = reward_model.make_reward_fn(rm_model, 0, stop_id=3, close=rc.score_with_stop)
  pure = ppo.make_ppo_iteration(model_lib.Transformer(cfg), None if grpo else rm_model, None,
                                reward_fn, tx, tx_value, ppo_cfg, eos)
  state = ppo.init_ppo_state(jax.tree.map(jnp.copy, params), tx, ppo_cfg, jax.random.key(0),
                             value_params=None if grpo else jax.tree.map(jnp.copy, rm_params),
                             tx_value=tx_value)
  args = (prompt, lengths, params)
  kwargs = dict(reward_args=(rm_params, 0.0))
  if _MESH.value:
    mesh = sharding.make_mesh([int(x) for x in _MESH.value.split(',')],
                              jax.devices()[:int(np.prod([int(x) for x in _MESH.value.split(',')]))])
    run = ppo.jit_on_mesh(pure, cfg, rm_cfg, tx, tx_value, ppo_cfg, mesh)
    iteration = run.jitted
    state = sharding.place(state, run.state_shardings)
    args = (*sharding.global_batch((prompt, lengths), mesh),
            sharding.place(params, ppo.param_shardings(cfg, mesh)),
            (sharding.place(rm_params, ppo.param_shardings(rm_cfg, mesh)), 0.0))
    kwargs = {}
    print(f'mesh {dict(mesh.shape)}: the iteration as experiments.rlhf compiles it')
  else:
    iteration = jax.jit(pure, donate_argnums=0)
  start = time.perf_counter()
  with (jax.set_mesh(mesh) if _MESH.value else contextlib.nullcontext()):
    compiled = iteration.lower(state, *args, **kwargs).compile()
  compile_iteration = time.perf_counter() - start
  holder = {'state': state}

  def one_iteration():
    holder['state'], metrics, _ = compiled(holder['state'], *args, **kwargs)
    return metrics
  jax.block_until_ready(one_iteration())  # warm-up
  t_iteration = _median(one_iteration, _REPEATS.value)

  # Sampling alone, scoring alone.
  generate = jax.jit(lambda params, prompt, lengths, rng: sampling.generate(
      params, prompt, lengths, rng, cfg=cfg, max_new_tokens=n, eos_id=eos, temperature=1.0))
  compile_generate = bench.compile_seconds(generate, params, prompt, lengths, jax.random.key(0))
  gen = jax.block_until_ready(generate(params, prompt, lengths, jax.random.key(0)))
  t_sample = _median(lambda: generate(params, prompt, lengths, jax.random.key(1)), _REPEATS.value)
  score = jax.jit(lambda rm_params, prompt, lengths, tokens, valid: reward_fn(
      prompt, lengths, tokens, valid, rm_params))
  score_args = (rm_params, prompt, lengths, gen.tokens_BxN, gen.valid_BxN)
  jax.block_until_ready(score(*score_args))
  t_score = _median(lambda: score(*score_args), _REPEATS.value)
  t_update = t_iteration - t_sample - t_score

  t_gold = None
  try:
    gold = rl_tasks.make_gold('vader')
    words = ('the nation shall prosper in peace and our great people will not fear the war '
             'that threatens trade').split()
    rng = np.random.default_rng(0)
    texts = [' '.join(rng.choice(words, size=int(0.75 * n))) for _ in range(b)]
    t_gold = bench.median_seconds(lambda: gold(texts), repeats=_REPEATS.value)
  except Exception:  # pylint: disable=broad-except
    pass

  # The sampling benchmark's cached decode, same model.
  dp, db, dn = 16, _DECODE_BATCH.value, _DECODE_TOKENS.value
  d_prompt, d_lengths = _prompts(db, dp, cfg.vocab_size, seed=1)
  d_lengths = np.maximum(d_lengths, dp // 2)
  d_prompt = np.where(np.arange(dp)[None] < d_lengths[:, None], d_prompt, 0).astype(np.int32)
  decode = lambda: sampling.generate(params, d_prompt, d_lengths, jax.random.key(0), cfg=cfg,
                                     max_new_tokens=dn, eos_id=-1, pad_id=0, temperature=0.0)
  jax.block_until_ready(decode())
  t_decode = bench.median_seconds(decode, repeats=_REPEATS.value, warmup=0)

  print(f'compile: iteration {compile_iteration:.1f}s, generate {compile_generate:.1f}s')
  print(f'{"per iteration (median of " + str(_REPEATS.value) + ")":40s} {"seconds":>8s} '
        f'{"share":>6s}')
  for name, t in (('sampling (jitted generate alone)', t_sample),
                  ('scoring (reward-model forward)', t_score),
                  ('update (forwards + epochs of updates)', t_update),
                  ('whole jitted iteration', t_iteration)):
    print(f'{name:40s} {t:8.3f} {100 * t / t_iteration:5.1f}%')
  if t_gold is not None:
    print(f'{"gold: VADER on the batch (Python)":40s} {t_gold:8.3f} '
          f'{100 * t_gold / t_iteration:5.1f}% (outside the iteration)')
  print(f'rollout: {b * n / t_sample:,.0f} tokens/s ({b} rows × {n} tokens, temperature 1, '
        f'{1e3 * t_sample / n:.1f} ms/step)')
  print(f'cached decode as benchmarks.sampling: {db * dn / t_decode:,.0f} tokens/s ({db} rows × '
        f'{dn} tokens, greedy, {1e3 * t_decode / dn:.1f} ms/step)')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
