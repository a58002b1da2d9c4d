"""Cached decoding equals the full forward pass; eos, filters, seeds, fill-mask, meshes.

Tiny random models (float32). The sharded-params test runs
`python -m tests.test_sampling` in a subprocess with 8 fake CPU devices.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import model as model_lib
from research import sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 96  # divisible by the tensor axis of the sharded test
CFG = model_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_len=32, init_std=0.1)
PROMPT = np.array([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 13, 14, 15, 16]], np.int32)
LENGTHS = np.array([5, 2, 5], np.int32)
N = 8
WIDTH = PROMPT.shape[1] + N  # of every full-forward batch: one compile per config


def init_params(cfg, seed=0):
  """Random params drawn by numpy: compiling the model's init costs ~4 CPU-seconds."""
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                          jnp.zeros((1, 8), bool))['params']
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    noise = rng.normal(0.0, cfg.init_std, leaf.value.shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == 'scale' else noise
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, 'value'))


@functools.partial(jax.jit, static_argnames='cfg')
def full_logits(params, tokens_BxL, lengths_B, prefix_BxL, *, cfg):
  """Logits of the plain training-path forward over left-aligned rows (pads after)."""
  b, l = tokens_BxL.shape
  positions = jnp.broadcast_to(jnp.arange(l), (b, l))
  segment_ids = (positions < lengths_B[:, None]).astype(jnp.int32)
  hidden, _ = model_lib.Transformer(cfg).apply({'params': params}, tokens_BxL, positions,
                                               segment_ids, prefix_BxL)
  return model_lib.logits(params, hidden, cfg.compute_dtype)


def full_sequences(prompt, lengths, new_BxN):
  """Prompt followed by the new tokens, left-aligned in WIDTH columns; and their lengths."""
  b, n = new_BxN.shape
  seq = np.zeros((b, WIDTH), np.int32)
  for i, l in enumerate(lengths):
    seq[i, :l] = prompt[i, :l]
    seq[i, l:l + n] = new_BxN[i]
  return seq, lengths + n


@pytest.fixture(scope='module')
def params():
  return init_params(CFG)


def generate(params, seed=0, **kwargs):
  """`sampling.generate` on PROMPT; eos, pad and temperature are traced (no recompile)."""
  kwargs = dict(dict(eos_id=-1, pad_id=0, temperature=0.0), **kwargs)  # same kwargs: one jit
  return sampling.generate(params, PROMPT, LENGTHS, jax.random.key(seed), cfg=CFG,
                           max_new_tokens=N, **kwargs)


@pytest.fixture(scope='module')
def greedy(params):
  return generate(params)


@pytest.mark.parametrize('overrides,bidirectional', [
    (dict(), False),
    (dict(scan_layers=False, position='learned', mlp='swiglu', norm='layernorm',
          tie_embeddings=False), False),
    (dict(), True),
])
def test_cached_logits_equal_full_forward_at_every_step(overrides, bidirectional):
  cfg = dataclasses.replace(CFG, **overrides)
  params = init_params(cfg)
  fed = np.asarray(jax.random.randint(jax.random.key(3), (3, N - 1), 15, V), np.int32)
  prefill = jax.jit(sampling.prefill, static_argnames=('cfg', 'cache_len',
                                                       'bidirectional_prompt'))
  step = jax.jit(sampling.decode_step, static_argnames='cfg')
  logits, cache = prefill(params, PROMPT, LENGTHS, cfg=cfg, cache_len=PROMPT.shape[1] + N - 1,
                          bidirectional_prompt=bidirectional)
  cached = [logits]
  for t in range(N - 1):
    logits, cache = step(params, jnp.asarray(fed[:, t]), jnp.asarray(LENGTHS + t), cache, cfg=cfg)
    cached.append(logits)
  seq, seq_lengths = full_sequences(PROMPT, LENGTHS, fed)
  prefix = (np.arange(WIDTH)[None] < LENGTHS[:, None]) & bidirectional
  full = np.asarray(full_logits(params, seq, seq_lengths, prefix, cfg=cfg))
  for t, logits in enumerate(cached):
    expected = full[np.arange(3), LENGTHS - 1 + t]
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0,
                               err_msg=f'step {t}')


def assert_logprobs_are_the_uncached_models(params, out):
  """Each returned log-prob is the full forward's log-softmax (temperature 1) at the
  generated token, read from the position before it; 0 where not valid."""
  new = np.asarray(out.tokens_BxN)
  seq, seq_lengths = full_sequences(PROMPT, LENGTHS, new)
  full = np.asarray(full_logits(params, seq, seq_lengths, np.zeros(seq.shape, bool), cfg=CFG))
  step_logits = full[np.arange(3)[:, None], LENGTHS[:, None] - 1 + np.arange(N)]
  logp = np.asarray(jax.nn.log_softmax(step_logits, axis=-1))
  want = np.take_along_axis(logp, new[..., None], -1)[..., 0]
  valid = np.asarray(out.valid_BxN)
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.where(valid, want, 0.0), atol=1e-4)


def test_greedy_output_identical_with_and_without_cache(params, greedy):
  ref = np.asarray(sampling.greedy_uncached(params, PROMPT, LENGTHS, cfg=CFG, max_new_tokens=N))
  for i, l in enumerate(LENGTHS):
    np.testing.assert_array_equal(np.asarray(greedy.tokens_BxN[i]), ref[i, l:l + N])
  assert np.all(greedy.valid_BxN) and not np.any(greedy.done_B)
  np.testing.assert_array_equal(greedy.lengths_B, [N] * 3)
  assert_logprobs_are_the_uncached_models(params, greedy)


@pytest.mark.parametrize('temperature', [1.0, 1.5])
def test_sampled_logprobs_equal_the_uncached_forward(params, temperature):
  for seed in range(2):
    out = generate(params, seed, temperature=temperature)
    assert_logprobs_are_the_uncached_models(params, out)
  assert len(np.unique(np.asarray(out.tokens_BxN))) > 6  # it sampled


def test_complete_equals_uncached_greedy_cut_after_eos(params, greedy):
  ref = np.asarray(sampling.greedy_uncached(params, PROMPT, LENGTHS, cfg=CFG, max_new_tokens=N))
  tokens = np.asarray(greedy.tokens_BxN)
  eos = int(tokens[0, 3])  # row 0 stops at (or before) its 4th new token
  prompts = [list(PROMPT[i, :l]) for i, l in enumerate(LENGTHS)]
  # batch_size 2: two batches, the second padded with an empty row.
  out = sampling.complete(params, CFG, prompts, max_new_tokens=N, eos_id=eos, batch_size=2)
  assert len(out) == 3
  for i, l in enumerate(LENGTHS):
    want = [int(t) for t in ref[i, l:l + N]]
    if eos in want:
      want = want[:want.index(eos) + 1]  # eos included
    assert out[i] == want, (i, out[i], want)
  assert out[0][-1] == eos and len(out[0]) <= 4


@pytest.mark.slow
def test_mixed_prompt_lengths_batch_equals_one_by_one(params, greedy):
  for i, l in enumerate(LENGTHS):
    alone = sampling.generate(params, PROMPT[i:i + 1, :l], LENGTHS[i:i + 1], jax.random.key(0),
                              cfg=CFG, max_new_tokens=N, eos_id=-1, temperature=0.0)
    np.testing.assert_array_equal(alone.tokens_BxN[0], greedy.tokens_BxN[i])
    np.testing.assert_allclose(alone.logprobs_BxN[0], greedy.logprobs_BxN[i], atol=1e-5)


def test_eos_stops_a_sequence_and_pads_it(params, greedy):
  tokens = np.asarray(greedy.tokens_BxN)
  # The eos: a token some row first emits at a step t_stop >= 1 (else row 0's first).
  first_new = [(i, t) for i in range(3) for t in range(1, N) if tokens[i, t] not in tokens[i, :t]]
  row, t_stop = first_new[0] if first_new else (0, 0)
  eos = int(tokens[row, t_stop])
  out = generate(params, eos_id=eos)
  for i in range(3):
    hits = np.flatnonzero(tokens[i] == eos)
    stop = hits[0] + 1 if len(hits) else N
    np.testing.assert_array_equal(out.tokens_BxN[i, :stop], tokens[i, :stop])
    np.testing.assert_array_equal(out.tokens_BxN[i, stop:], 0)
    np.testing.assert_array_equal(out.valid_BxN[i], np.arange(N) < stop)
    np.testing.assert_array_equal(out.logprobs_BxN[i, stop:], 0.0)
    assert bool(out.done_B[i]) == bool(len(hits)) and int(out.lengths_B[i]) == stop
  assert int(out.lengths_B[row]) == t_stop + 1 and bool(out.done_B[row])


def test_filter_logits_keeps_top_k_and_the_nucleus():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=5)))
  order = np.argsort(-np.asarray(logits), axis=-1)
  for row, o in zip(kept, order):
    assert set(np.flatnonzero(row)) == set(o[:5])
  probs = np.asarray(jax.nn.softmax(logits))
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.7)))
  for row, o, p in zip(kept, order, probs):
    n = int(np.searchsorted(np.cumsum(p[o]), 0.7)) + 1  # smallest prefix with mass >= 0.7
    assert set(np.flatnonzero(row)) == set(o[:n])


def test_sampled_tokens_stay_in_top_k_and_top_p_and_logprobs_are_the_models(params):
  top_k, top_p, temperature = 4, 0.6, 0.7
  new, logprobs, step_logits = [], [], []
  for seed in range(3):  # 72 draws
    out = generate(params, seed, temperature=temperature, top_k=top_k, top_p=top_p)
    new.append(np.asarray(out.tokens_BxN))
    logprobs.append(np.asarray(out.logprobs_BxN))
    seq, seq_lengths = full_sequences(PROMPT, LENGTHS, new[-1])
    full = np.asarray(full_logits(params, seq, seq_lengths, np.zeros(seq.shape, bool), cfg=CFG))
    # The logits that predicted each new token.
    step_logits.append(full[np.arange(3)[:, None], LENGTHS[:, None] - 1 + np.arange(N)])
  new, logprobs, step_logits = map(np.concatenate, (new, logprobs, step_logits))
  # Log-probs are the model's at temperature 1, unfiltered.
  logp = np.asarray(jax.nn.log_softmax(step_logits, axis=-1))
  np.testing.assert_allclose(logprobs, np.take_along_axis(logp, new[..., None], -1)[..., 0],
                             atol=1e-4)
  # Support: among the top-k, and inside the nucleus of the tempered top-k distribution.
  chosen = np.take_along_axis(step_logits, new[..., None], -1)
  assert np.all((step_logits > chosen).sum(-1) < top_k)
  kth = -np.sort(-step_logits, axis=-1)[..., top_k - 1:top_k]
  top = np.asarray(jax.nn.softmax(np.where(step_logits >= kth, step_logits / temperature,
                                           -np.inf), axis=-1))
  assert np.all(np.where(step_logits > chosen, top, 0.0).sum(-1) < top_p)
  assert len(np.unique(new)) > 3  # it did sample, not argmax


def test_same_seed_same_samples(params):
  run = lambda seed: np.asarray(generate(params, seed, temperature=1.0).tokens_BxN)
  np.testing.assert_array_equal(run(1), run(1))
  assert np.any(run(1) != run(2))


MASK = 4
TEXT = np.zeros((3, WIDTH), np.int32)  # WIDTH columns: full_logits is already compiled
TEXT[0, :7] = [20, MASK, 22, 23, MASK, 25, MASK]
TEXT[1, :4] = [30, 31, MASK, 33]
TEXT[2, :10] = [MASK, 41, 42, 43, 44, MASK, MASK, MASK, 48, 49]
TEXT_LENGTHS = np.array([7, 4, 10], np.int32)
SUPPRESS = tuple(range(5))


def _bidirectional_logp(params):
  logits = full_logits(params, TEXT, TEXT_LENGTHS, np.ones(TEXT.shape, bool), cfg=CFG)
  logits = np.asarray(logits).copy()
  logits[..., list(SUPPRESS)] = -np.inf
  return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_fill_mask_one_pass_fills_every_mask(params):
  filled, logps = sampling.fill_mask(params, TEXT, TEXT_LENGTHS, cfg=CFG, mask_id=MASK,
                                     suppress_ids=SUPPRESS)
  filled, logps = np.asarray(filled), np.asarray(logps)
  is_mask = TEXT == MASK
  assert not np.any(filled == MASK)
  np.testing.assert_array_equal(filled[~is_mask], TEXT[~is_mask])
  logp = _bidirectional_logp(params)
  np.testing.assert_array_equal(filled[is_mask], logp.argmax(-1)[is_mask])
  np.testing.assert_allclose(logps[is_mask], logp.max(-1)[is_mask], atol=1e-5)


def test_fill_mask_iterative_unmasks_most_confident_first(params):
  filled, _ = sampling.fill_mask(params, TEXT, TEXT_LENGTHS, cfg=CFG, mask_id=MASK,
                                 suppress_ids=SUPPRESS, iterative=True)
  filled = np.asarray(filled)
  is_mask = TEXT == MASK
  assert not np.any(filled == MASK)
  np.testing.assert_array_equal(filled[~is_mask], TEXT[~is_mask])
  # The most confident mask of each row is filled first, from the masked text.
  logp = _bidirectional_logp(params)
  confidence = np.where(is_mask, logp.max(-1), -np.inf)
  first = confidence.argmax(-1)
  np.testing.assert_array_equal(filled[[0, 1, 2], first], logp.argmax(-1)[[0, 1, 2], first])
  # Row 1 has one mask: iterative and one pass agree there.
  assert filled[1, 2] == logp[1, 2].argmax()


@pytest.mark.slow
def test_generate_with_sharded_params_matches_one_device(params):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'tests.test_sampling'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  assert sharded['devices'] == 8 and sharded['sharded_leaves'] > 0
  single = generate(params, SHARDED_SEED, temperature=1.0)
  np.testing.assert_array_equal(sharded['tokens'], single.tokens_BxN)
  np.testing.assert_allclose(sharded['logprobs'], single.logprobs_BxN, atol=1e-5)


SHARDED_SEED = 5


@pytest.fixture(scope='module')
def pretrain_workdir(tmp_path_factory):
  from tests.test_pretrain import tiny_pretrain_workdir  # pylint: disable=g-import-not-at-top
  return tiny_pretrain_workdir(tmp_path_factory.mktemp('sample'), seq_len=32, d_model=32,
                               num_layers=1, steps=2)


@pytest.mark.slow
def test_sample_script_prints_greedy_continuations_and_fills(pretrain_workdir):
  from research import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  prompts = ['The nation', 'Peace and']
  cmd = [sys.executable, '-m', 'experiments.sample', f'--workdir={pretrain_workdir}',
         '--max_new_tokens=6', '--temperature=0', '--top_p=1',
         '--fill=the <mask> people', '--fill_mode=one_pass'] + [f'--prompt={p}' for p in prompts]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  params, config, tokenizer = checkpoint_lib.load_stage(pretrain_workdir)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  texts = sampling.greedy_texts(params, cfg, tokenizer, prompts, max_new_tokens=6)
  for p, text in zip(prompts, texts):
    assert f'{p!r} -> {text!r}' in out.stdout, (p, text, out.stdout)
  assert "'the <mask> people' -> '" in out.stdout, out.stdout
  # A folder without a checkpoint: one line on stderr, exit 2.
  bad = subprocess.run([sys.executable, '-m', 'experiments.sample',
                        f'--workdir={pretrain_workdir}/missing', '--prompt=x'], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and bad.stderr.startswith('error: '), bad.stderr[-2000:]


def _generate_sharded():
  """`generate` with params sharded over a (data 2, fsdp 2, tensor 2) mesh by the rules."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from research import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh((2, 2, 2))
  z = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(model_lib.Transformer(CFG).init, jax.random.key(0), z, z, z,
                            jnp.zeros((1, 8), bool))
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract)['params'], mesh)
  params = jax.device_put(init_params(CFG), shardings)
  with jax.set_mesh(mesh):
    out = generate(params, SHARDED_SEED, temperature=1.0)
  return dict(devices=jax.device_count(),
              sharded_leaves=sum(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(params)),
              tokens=np.asarray(out.tokens_BxN).tolist(),
              logprobs=np.asarray(out.logprobs_BxN).tolist())


if __name__ == '__main__':
  print(json.dumps(_generate_sharded()))
