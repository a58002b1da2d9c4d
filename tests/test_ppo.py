"""PPO / GRPO: the pieces against hand or loop values, masking, and toy runs that learn.

Tiny random models (float32). The jitted iterations are compiled with XLA's backend
optimisation and CPU fusion emitters off (`FAST`): that cuts their compile time from
~20 s to ~5 s on the 2-core CPU, and the programs run in tens of milliseconds either way.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import model as model_lib
from research import ppo
from research import reward_model

V, P, N, B = 32, 4, 8, 32
EOS, TARGET = 1, 5
CFG = model_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2,
                                  max_len=32)
FAST = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


def init_params(cfg, seed=0):
  """Random params drawn by numpy (compiling the model's init costs CPU-seconds)."""
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                          jnp.zeros((1, 8), bool))['params']
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    noise = rng.normal(0.0, cfg.init_std, leaf.value.shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == 'scale' else noise
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, 'value'))


def prompts(seed=0, b=B):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, V, (b, P)).astype(np.int32)
  lengths = rng.integers(1, P + 1, b).astype(np.int32)
  prompt[np.arange(P)[None] >= lengths[:, None]] = 0
  return prompt, lengths


def toy_reward(prompt, lengths, response, valid, target):
  """Fraction of the response's tokens (eos included) equal to `target`."""
  del prompt, lengths
  return jnp.sum((response == target) & valid, 1) / jnp.maximum(jnp.sum(valid, 1), 1)


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    t_end = int(mask[i].sum())
    last = 0.0
    for t in reversed(range(t_end)):
      next_value = values[i, t + 1] if t + 1 < t_end else 0.0
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      last = delta + gamma * lam * last
      adv[i, t] = last
  return adv, np.where(mask, adv + values, 0.0)


def test_gae_matches_python_loop():
  rng = np.random.default_rng(0)
  b, n = 6, 9
  ends = np.array([9, 1, 5, 8, 3, 9])
  mask = np.arange(n)[None] < ends[:, None]
  rewards = rng.normal(size=(b, n)).astype(np.float32)
  values = rng.normal(size=(b, n)).astype(np.float32)
  fn = jax.jit(ppo.gae)
  for gamma, lam in ((1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)):
    adv, ret = fn(rewards, values, mask, gamma, lam)
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~mask] == 0)
  # γ = λ = 1: the advantage is the sum of future rewards minus the value.
  adv, _ = fn(rewards, values, mask, 1.0, 1.0)
  tail = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, np.where(mask, tail - values, 0), rtol=1e-5, atol=1e-5)


def test_policy_loss_against_hand_values():
  ratios = np.array([[1.5, 0.5, 1.1, 0.5, 3.0]], np.float32)
  adv = np.array([[1.0, 1.0, -2.0, -1.0, 7.0]], np.float32)
  mask = np.array([[True, True, True, True, False]])
  logp_old = np.array([[-1.0, -2.0, -0.5, -3.0, -1.0]], np.float32)
  logp_new = logp_old + np.log(ratios)
  # Per token −min(ρA, clip(ρ)A): −1.2 (clipped), −0.5, 2.2, 0.8 (clipped); masked one out.
  loss, metrics = ppo.policy_loss(logp_new, logp_old, adv, mask, 0.2)
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 2.2 + 0.8) / 4, rtol=1e-5)
  np.testing.assert_allclose(metrics['clip_fraction'], 3 / 4)
  r = ratios[0, :4]
  np.testing.assert_allclose(metrics['approx_kl'], np.mean((r - 1) - np.log(r)), rtol=1e-5)
  # Clipped tokens and the masked one get no gradient; others −ρA/4.
  grad = jax.grad(lambda lp: ppo.policy_loss(lp, logp_old, adv, mask, 0.2)[0])(logp_new)
  np.testing.assert_allclose(grad, [[0.0, -0.5 / 4, 2.2 / 4, 0.0, 0.0]], rtol=1e-5, atol=1e-7)


def test_value_loss_against_hand_values():
  v_old = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
  v_new = np.array([1.5, 0.9, -1.0, 0.1], np.float32)
  returns = np.array([2.0, 0.0, 0.0, 5.0], np.float32)
  mask = np.array([True, True, True, False])
  # max((v−R)², (v_clip−R)²): max(.25, .64), max(.81, .81), max(1, .04); 4th masked.
  loss, metrics = ppo.value_loss(v_new, v_old, returns, mask, 0.2)
  np.testing.assert_allclose(loss, 0.5 * (0.64 + 0.81 + 1.0) / 3, rtol=1e-5)
  np.testing.assert_allclose(metrics['value_clip_fraction'], 1 / 3, rtol=1e-6)
  loss, _ = ppo.value_loss(v_new, v_old, returns, mask, 0.0)  # no clip
  np.testing.assert_allclose(loss, 0.5 * (0.25 + 0.81 + 1.0) / 3, rtol=1e-5)


def test_token_rewards_kl_on_every_token_score_on_the_last():
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  rng = np.random.default_rng(0)
  logp = rng.normal(size=(3, 5)).astype(np.float32)
  ref = rng.normal(size=(3, 5)).astype(np.float32)
  score = np.array([2.0, -1.0, 0.5], np.float32)
  done = np.array([False, True, True])
  beta, penalty = 0.3, 4.0
  got = ppo.token_rewards(score, logp, ref, mask, beta, done, penalty)
  want = np.where(mask, -beta * (logp - ref), 0.0)
  want[0, 4] += 2.0 - penalty  # never reached eos
  want[1, 2] += -1.0
  want[2, 0] += 0.5
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_whiten_and_explained_variance():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (4, 6)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([6, 2, 4, 1])[:, None]
  w = np.asarray(ppo.whiten(x, mask))
  np.testing.assert_allclose(w[mask].mean(), 0, atol=1e-5)
  np.testing.assert_allclose(w[mask].std(), 1, atol=1e-4)
  assert np.all(w[~mask] == 0)
  np.testing.assert_allclose(ppo.explained_variance(x, x, mask), 1.0)
  np.testing.assert_allclose(ppo.explained_variance(np.zeros_like(x) + x[mask].mean(), x, mask),
                             0.0, atol=1e-5)


def test_grpo_advantages_sum_to_zero_per_group():
  rng = np.random.default_rng(0)
  k = 4
  scores = rng.normal(size=12).astype(np.float32)
  scores[8:] = 0.7  # a group of equal scores: all advantages 0, no NaN
  mask = np.arange(5)[None] < rng.integers(1, 6, 12)[:, None]
  adv = np.asarray(ppo.grpo_advantages(scores, k, mask))
  per_row = adv[:, 0]  # column 0 is always valid
  np.testing.assert_allclose(per_row.reshape(3, k).sum(1), 0, atol=1e-5)
  np.testing.assert_allclose(per_row[:4], (scores[:4] - scores[:4].mean()) /
                             (scores[:4].std() + 1e-6), rtol=1e-5)
  assert np.all(per_row[8:] == 0)
  np.testing.assert_array_equal(adv, np.where(mask, per_row[:, None], 0))
  prompt, lengths = ppo.repeat_prompts(np.array([[3, 4], [5, 0]]), np.array([2, 1]), 3)
  np.testing.assert_array_equal(prompt[:, 0], [3, 3, 3, 5, 5, 5])
  np.testing.assert_array_equal(lengths, [2, 2, 2, 1, 1, 1])


@pytest.mark.parametrize('estimator', ['grpo', 'rloo', 'dr_grpo'])
def test_identical_scores_in_a_group_give_exactly_zero_advantage(estimator):
  """Any group size 2..8, values whose float mean leaves a residue (0.1·3, 2.9·8, ...)."""
  fn = getattr(ppo, f'{estimator}_advantages')
  for k in range(2, 9):
    for v in (0.1, 0.7, 1 / 3, 2.9, 123.456, -5.3):
      scores = np.concatenate([np.full(k, v, np.float32), np.arange(k, dtype=np.float32)])
      adv = np.asarray(fn(scores, k, np.ones((2 * k, 3), bool)))
      assert np.all(adv[:k] == 0), (k, v, adv[:k, 0])
      assert np.all(adv[k:, 0] != 0) or k % 2  # the other group still has a signal


def test_rloo_advantages_against_hand_values():
  # Group [1, 2, 4]: 1 − (2+4)/2, 2 − (1+4)/2, 4 − (1+2)/2; group [0, 1, 0]: −½, 1, −½.
  scores = np.array([1, 2, 4, 0, 1, 0], np.float32)
  mask = np.array([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 0]], bool)
  adv = np.asarray(ppo.rloo_advantages(scores, 3, mask))
  want = np.array([-2.0, -0.5, 2.5, -0.5, 1.0, -0.5])
  np.testing.assert_allclose(adv, np.where(mask, want[:, None], 0.0), rtol=1e-6)
  # Pairs: each row's baseline is the other row's score.
  np.testing.assert_allclose(ppo.rloo_advantages(np.array([3., 5.]), 2, np.ones((2, 1), bool)),
                             [[-2.0], [2.0]])


def test_dr_grpo_advantages_against_hand_values():
  # Group [1, 2, 4] (mean 7/3): no division by the std; group [0, 1, 0] (mean 1/3).
  scores = np.array([1, 2, 4, 0, 1, 0], np.float32)
  adv = np.asarray(ppo.dr_grpo_advantages(scores, 3, np.ones((6, 2), bool)))
  want = np.array([-4 / 3, -1 / 3, 5 / 3, -1 / 3, 2 / 3, -1 / 3])
  np.testing.assert_allclose(adv, np.repeat(want[:, None], 2, 1), rtol=1e-6)


def test_dr_grpo_policy_loss_is_not_length_normalised():
  """Σ_valid −ρ·A / (rows × N) (Liu et al. 2025): a long row's tokens weigh as much per
  token as a short row's; the default is the mean over valid tokens."""
  logp = np.zeros((2, 4), np.float32)
  adv = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
  loss, _ = ppo.policy_loss(logp, logp, adv, mask, 0.2, normaliser=8.0)
  np.testing.assert_allclose(loss, -(4 * 1.0 + 2.0) / 8)
  loss, _ = ppo.policy_loss(logp, logp, adv, mask, 0.2)
  np.testing.assert_allclose(loss, -(4 * 1.0 + 2.0) / 5)
  records = ppo.ESTIMATORS
  assert not records['dr_grpo'].length_normalised
  assert all(records[n].length_normalised for n in ('gae', 'grpo', 'rloo'))
  assert [n for n, e in records.items() if e.value_model] == ['gae']
  with pytest.raises(ValueError, match='expected one of'):
    ppo.PPOConfig(advantage='reinforce')
  with pytest.raises(ValueError, match='groups'):
    ppo.PPOConfig(advantage='rloo', group_size=1)


def test_kl_estimators():
  logp = np.array([[-1.0, -2.0, -0.1], [-0.5, -3.0, -9.0]], np.float32)
  ref = np.array([[-1.5, -1.0, -0.1], [-0.7, -3.0, -1.0]], np.float32)
  mask = np.array([[True, True, True], [True, True, False]])
  d = ref - logp
  k3 = np.exp(d) - 1 - d
  assert np.all(k3 >= 0)
  np.testing.assert_allclose(ppo.kl_k3(logp, ref), k3, rtol=1e-6)
  np.testing.assert_allclose(ppo.kl_k1(logp, ref), logp - ref)
  stats = ppo.kl_stats(logp, ref, mask)
  np.testing.assert_allclose(stats['kl_k1'], np.mean([(-d[0]).sum(), (-d[1, :2]).sum()]),
                             rtol=1e-6)
  np.testing.assert_allclose(stats['kl_k3'], np.mean([k3[0].sum(), k3[1, :2].sum()]), rtol=1e-6)
  np.testing.assert_allclose(stats['kl_k3_token'], k3[mask].mean(), rtol=1e-6)


def test_update_beta_moves_towards_target_both_ways():
  up = float(ppo.update_beta(0.1, 9.0, 6.0, 100.0, 10))
  down = float(ppo.update_beta(0.1, 3.0, 6.0, 100.0, 10))
  assert up > 0.1 > down
  np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 10 / 100), rtol=1e-6)  # error clipped to 0.2
  np.testing.assert_allclose(down, 0.1 * (1 - 0.2 * 10 / 100), rtol=1e-6)
  np.testing.assert_allclose(ppo.update_beta(0.1, 6.6, 6.0, 100.0, 10), 0.1 * 1.01, rtol=1e-6)
  assert ppo.update_beta(0.1, 6.0, 6.0, 100.0, 10) == pytest.approx(0.1)
  fixed = ppo.PPOConfig(beta=0.1, adaptive_kl=False).kl_controller
  assert fixed.update(0.1, 100.0, 10) == 0.1
  adaptive = ppo.PPOConfig(adaptive_kl=True, kl_target=6.0, kl_horizon=100.0).kl_controller
  assert float(adaptive.update(0.1, 100.0, 10)) == pytest.approx(up)


def test_sequence_layout():
  prompt = np.array([[7, 8, 9], [5, 0, 0]], np.int32)
  lengths = np.array([3, 1], np.int32)
  response = np.array([[11, 12, 1, 0], [13, 14, 15, 16]], np.int32)
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  seq = ppo.sequence_from_rollout(prompt, lengths, response, valid)
  np.testing.assert_array_equal(seq['tokens'], [[7, 8, 9, 11, 12, 1, 0],
                                                [0, 0, 5, 13, 14, 15, 16]])
  np.testing.assert_array_equal(seq['segment_ids'], [[1, 1, 1, 1, 1, 1, 0],
                                                     [0, 0, 1, 1, 1, 1, 1]])
  pos, seg = np.asarray(seq['positions']), np.asarray(seq['segment_ids'])
  np.testing.assert_array_equal(np.where(seg > 0, pos, -1), [[0, 1, 2, 3, 4, 5, -1],
                                                             [-1, -1, 0, 1, 2, 3, 4]])
  assert ppo.last_valid_index(valid).tolist() == [2, 3]


def test_response_logprobs_match_a_plain_left_aligned_forward():
  """Column j of the PPO layout scores the same token as a plain left-aligned forward."""
  params = init_params(CFG, seed=3)
  prompt, lengths = prompts(seed=3, b=4)
  rng = np.random.default_rng(3)
  response = rng.integers(2, V, (4, N)).astype(np.int32)
  valid = np.arange(N)[None] < np.array([N, 3, 1, 6])[:, None]

  @functools.partial(jax.jit, compiler_options=FAST)
  def both(params):
    seq = ppo.sequence_from_rollout(prompt, lengths, response, valid)
    logp, entropy = ppo.response_logprobs_and_entropy(params, model_lib.Transformer(CFG), seq, P,
                                                      N)
    tokens, total = reward_model.pack_prompt_response(prompt, lengths, response, valid)
    t = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), (4, t))
    hidden, _ = model_lib.Transformer(CFG).apply(
        {'params': params}, tokens, positions, (positions < total[:, None]).astype(jnp.int32),
        jnp.zeros((4, t), bool))
    return logp, entropy, jax.nn.log_softmax(model_lib.logits(params, hidden), -1)

  logp, entropy, logp_all = jax.tree.map(np.asarray, both(params))
  for i in range(4):
    for j in range(int(valid[i].sum())):
      at = lengths[i] + j - 1
      np.testing.assert_allclose(logp[i, j], logp_all[i, at, response[i, j]], atol=2e-5)
      ent = -np.sum(np.exp(logp_all[i, at]) * logp_all[i, at])
      np.testing.assert_allclose(entropy[i, j], ent, atol=2e-5)


def test_nothing_in_the_prompt_pads_or_after_eos_reaches_any_loss():
  """Tokens of prompt pads / after eos and rollout data outside the mask: same loss and grads."""
  cfg = ppo.PPOConfig(entropy_coef=0.01)
  policy_model = model_lib.Transformer(CFG)
  params = init_params(CFG, seed=1)
  value_params, value_cfg = reward_model.with_scalar_head(params, CFG, jax.random.key(1))
  value_model = model_lib.Transformer(value_cfg)
  b = 6
  prompt, lengths = prompts(seed=1, b=b)
  rng = np.random.default_rng(1)
  response = rng.integers(2, V, (b, N)).astype(np.int32)
  ends = np.array([N, 2, 5, 1, 7, 3])
  valid = np.arange(N)[None] < ends[:, None]
  done = ends < N
  response[np.arange(b), ends - 1] = np.where(done, EOS, response[np.arange(b), ends - 1])
  seq = ppo.sequence_from_rollout(prompt, lengths, response, valid)
  data = dict(logp_old=rng.normal(-3, 0.3, (b, N)), ref_logp=rng.normal(-3, 0.3, (b, N)),
              values=rng.normal(size=(b, N)), score=rng.normal(size=b))
  data = {k: np.asarray(v, np.float32) for k, v in data.items()}

  @functools.partial(jax.jit, compiler_options=FAST)
  def loss_and_grads(policy_params, value_params, seq, data):
    mask = seq['segment_ids'][:, P:] > 0
    rewards = ppo.token_rewards(data['score'], data['logp_old'], data['ref_logp'], mask, 0.1,
                                jnp.asarray(done), 1.0)
    adv, returns = ppo.gae(rewards, data['values'], mask, 1.0, 0.95)
    adv = ppo.whiten(adv, mask)

    def total(pp, vp):
      logp, ent = ppo.response_logprobs_and_entropy(pp, policy_model, seq, P, N)
      pl, _ = ppo.policy_loss(logp, data['logp_old'], adv, mask, cfg.clip_eps)
      v = ppo.response_values(vp, value_model, seq, P, N)
      vl, _ = ppo.value_loss(v, data['values'], returns, mask, cfg.value_clip)
      return pl - cfg.entropy_coef * ppo.masked_mean(ent, mask) + cfg.value_coef * vl

    return jax.value_and_grad(total, argnums=(0, 1))(policy_params, value_params)

  base_loss, base_grads = loss_and_grads(params, value_params, seq, data)
  outside = np.asarray(seq['segment_ids']) == 0  # prompt pads and columns after eos
  assert outside[:, :P].any() and outside[:, P:].any()
  tokens = np.asarray(seq['tokens']).copy()
  tokens[outside] = rng.integers(2, V, outside.sum())
  perturbed = dict(seq, tokens=tokens)
  noisy = {k: (np.where(valid, v, rng.normal(size=v.shape).astype(np.float32) * 50)
               if v.ndim == 2 else v) for k, v in data.items()}
  loss, grads = loss_and_grads(params, value_params, perturbed, noisy)
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               base_grads)
  # A real response token does matter.
  tokens = np.asarray(seq['tokens']).copy()
  tokens[2, P + 1] = (tokens[2, P + 1] + 1) % V
  loss, _ = loss_and_grads(params, value_params, dict(seq, tokens=tokens), data)
  assert abs(float(loss) - float(base_loss)) > 1e-6


# --------------------------------------------------------------------------------------
# Whole iterations (jitted)
# --------------------------------------------------------------------------------------


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


@functools.lru_cache(maxsize=None)
def iteration_fn(advantage):
  """One compiled iteration per advantage kind; β is state, so every β shares it."""
  cfg = ppo.PPOConfig(epochs=4, minibatches=2, max_new_tokens=N, advantage=advantage,
                      group_size=4)
  value_model, tx_value = None, None
  if advantage == 'gae':
    value_model = model_lib.Transformer(dataclasses.replace(CFG, scalar_head=True))
    tx_value = TX
  iteration = ppo.make_ppo_iteration(model_lib.Transformer(CFG), value_model, None, toy_reward,
                                     TX, tx_value, cfg, EOS)
  return cfg, jax.jit(iteration, compiler_options=FAST)


def run(advantage, beta, iterations, seed=0):
  cfg, iteration = iteration_fn(advantage)
  params = init_params(CFG)
  value_params = None
  if advantage == 'gae':
    value_params, _ = reward_model.with_scalar_head(params, CFG, jax.random.key(1), std=0.0)
  state = ppo.init_ppo_state(params, TX, cfg, jax.random.key(seed), value_params=value_params,
                             tx_value=TX)
  state = state.replace(beta=jnp.float32(beta))
  prompt, lengths = prompts(seed)
  if ppo.ESTIMATORS[advantage].groups:
    prompt, lengths = ppo.repeat_prompts(prompt[:B // 4], lengths[:B // 4], 4)
  history = []
  for _ in range(iterations):
    state, metrics, rollout = iteration(state, prompt, lengths, params,
                                        reward_args=(jnp.int32(TARGET),))
    history.append(jax.tree.map(float, metrics))
  return state, history, rollout


@pytest.fixture(scope='module')
def gae_run():
  return run('gae', beta=0.02, iterations=16)


@pytest.fixture(scope='module')
def grpo_run():
  return run('grpo', beta=0.02, iterations=16)


def whiten_numpy(x, mask):
  m = x[mask].mean()
  return np.where(mask, (x - m) / np.sqrt(np.mean(np.square(x[mask] - m)) + 1e-8), 0.0)


def toy_reward_numpy(response, valid):
  return ((response == TARGET) & valid).sum(1) / np.maximum(valid.sum(1), 1)


@pytest.mark.slow
def test_ppo_raises_toy_reward(gae_run):
  _, history, rollout = gae_run
  first = history[0]
  # Old log-probs come from the update's own forward: the first ratio is 1.
  assert first['first_ratio_max_dev'] < 1e-5
  assert first['generate_logprob_gap'] < 1e-4  # and agree with the sampler's
  assert first['kl_k1'] == 0 and first['kl_k3'] == 0  # the policy starts at the reference
  start = first['score_mean']
  end = np.mean([h['score_mean'] for h in history[-2:]])
  assert start < 0.1
  assert end > max(start + 0.3, 5 * start), [h['score_mean'] for h in history]
  for name in ('explained_variance', 'value_loss', 'clip_fraction', 'approx_kl', 'entropy',
               'policy_loss', 'response_length', 'fraction_done', 'beta'):
    assert math.isfinite(history[-1][name]), name
  assert rollout.advantages_BxN.shape == (B, N)
  assert np.all(np.asarray(rollout.advantages_BxN)[~np.asarray(rollout.generation.valid_BxN)] == 0)


def test_huge_fixed_beta_keeps_the_policy_at_the_reference():
  _, free, _ = run('gae', beta=0.0, iterations=9)
  _, held, _ = run('gae', beta=1e3, iterations=9)
  assert all(h['beta'] == 1e3 for h in held)  # fixed β
  # KL of the policy after 8 updates (measured on the 9th rollout), per token.
  # It is not exactly 0: the first update, made before any KL was observed (the first
  # rollout is at the reference), moves the policy as freely as with β = 0.
  assert held[-1]['kl_k3_token'] < 0.15, [h['kl_k3_token'] for h in held]
  assert free[-1]['kl_k3_token'] > 8 * held[-1]['kl_k3_token']
  assert free[-1]['score_mean'] > held[-1]['score_mean'] + 0.2
  assert held[-1]['score_mean'] < 0.1


def test_gae_iteration_wires_rewards_advantages_and_metrics_as_by_hand(gae_run):
  """The last iteration's rollout (policy away from the reference, so the KL penalty is
  not 0) against the PPO recipe redone in numpy from its log-probs, values and tokens."""
  _, history, rollout = gae_run
  r = jax.tree.map(np.asarray, rollout)
  metrics, gen = history[-1], r.generation
  mask = gen.valid_BxN
  logp, ref, values = r.logprobs_BxN, r.ref_logprobs_BxN, r.values_BxN
  assert np.abs(logp - ref)[mask].max() > 1e-3 and mask.sum() > B
  np.testing.assert_allclose(r.scores_B, toy_reward_numpy(gen.tokens_BxN, mask), rtol=1e-6)
  # r_j = −β·(log π_old − log π_ref) on valid tokens, the score added on each row's last.
  beta = metrics['beta']
  rewards = np.where(mask, -beta * (logp - ref), 0.0)
  last = mask.sum(1) - 1
  rewards[np.arange(B), last] += r.scores_B  # no_eos_penalty = 0
  np.testing.assert_allclose(r.rewards_BxN, rewards, rtol=1e-5, atol=1e-7)
  advantages, returns = gae_loop(rewards, values, mask, 1.0, 0.95)
  np.testing.assert_allclose(r.returns_BxN, returns, rtol=1e-4, atol=1e-5)
  # Advantages whitened over the batch's valid tokens.
  np.testing.assert_allclose(r.advantages_BxN, whiten_numpy(advantages, mask), rtol=1e-4,
                             atol=1e-4)
  # Rollout metrics from the same arrays.
  kl1, k3 = np.where(mask, logp - ref, 0), np.where(mask, np.exp(ref - logp) - 1 - (ref - logp), 0)
  for name, want in (('kl_k1', kl1.sum(1).mean()), ('kl_k3', k3.sum(1).mean()),
                     ('kl_k1_token', kl1[mask].mean()), ('kl_k3_token', k3[mask].mean()),
                     ('score_mean', r.scores_B.mean()), ('entropy', r.entropy_BxN[mask].mean()),
                     ('response_length', mask.sum(1).mean()),
                     ('reward_sum', rewards.sum(1).mean()),
                     ('value_mean', values[mask].mean()), ('return_mean', returns[mask].mean()),
                     ('explained_variance',
                      1 - np.var((returns - values)[mask]) / np.var(returns[mask]))):
    np.testing.assert_allclose(metrics[name], want, rtol=2e-4, atol=1e-6, err_msg=name)


def test_grpo_raises_toy_reward(grpo_run):
  _, history, rollout = grpo_run
  start = history[0]['score_mean']
  end = np.mean([h['score_mean'] for h in history[-2:]])
  assert end > max(start + 0.3, 5 * start), [h['score_mean'] for h in history]
  assert rollout.values_BxN is None
  adv = np.asarray(rollout.advantages_BxN)[:, 0]
  np.testing.assert_allclose(adv.reshape(-1, 4).sum(1), 0, atol=1e-4)


def test_grpo_advantages_in_the_iteration_are_group_normalised_scores(grpo_run):
  _, history, rollout = grpo_run
  r = jax.tree.map(np.asarray, rollout)
  mask = r.generation.valid_BxN
  scores = toy_reward_numpy(r.generation.tokens_BxN, mask)
  np.testing.assert_allclose(r.scores_B, scores, rtol=1e-6)
  groups = scores.reshape(-1, 4)
  per_row = ((groups - groups.mean(1, keepdims=True)) /
             (groups.std(1, keepdims=True) + 1e-6)).reshape(-1)
  assert np.abs(per_row).max() > 0.1  # some group's scores differ
  np.testing.assert_allclose(r.advantages_BxN, np.where(mask, per_row[:, None], 0.0),
                             rtol=1e-5, atol=1e-5)
  logp, ref = r.logprobs_BxN, r.ref_logprobs_BxN
  k3 = np.exp(ref - logp) - 1 - (ref - logp)
  np.testing.assert_allclose(history[-1]['kl_k3_token'], k3[mask].mean(), rtol=2e-4)


def test_huge_fixed_beta_keeps_the_grpo_policy_at_the_reference(grpo_run):
  """GRPO's KL is a loss term β·k3 (not a reward): with a huge β it holds the policy."""
  _, free, _ = grpo_run  # β = 0.02
  _, held, _ = run('grpo', beta=1e3, iterations=9)
  assert all(h['beta'] == 1e3 for h in held)
  # As for PPO, the first update (the first rollout is at the reference, k3's gradient 0
  # there) moves the policy freely; later ones pull it back.
  assert held[-1]['kl_k3_token'] < 0.15, [h['kl_k3_token'] for h in held]
  assert free[8]['kl_k3_token'] > 4 * held[-1]['kl_k3_token'], (
      [h['kl_k3_token'] for h in free], [h['kl_k3_token'] for h in held])
  assert held[-1]['kl_loss'] < free[8]['kl_loss']


@pytest.mark.parametrize('estimator', ['rloo', 'dr_grpo'])
def test_rloo_and_dr_grpo_iterations_wire_their_advantages(estimator):
  """Two iterations (the second away from the reference): the rollout's advantages are the
  estimator's formula of its scores (RLOO: minus β·sequence k1), and the loss is finite."""
  _, history, rollout = run(estimator, beta=0.5, iterations=2)
  r = jax.tree.map(np.asarray, rollout)
  mask = r.generation.valid_BxN
  scores = toy_reward_numpy(r.generation.tokens_BxN, mask)
  np.testing.assert_allclose(r.scores_B, scores, rtol=1e-6)
  if estimator == 'rloo':
    kl = np.where(mask, r.logprobs_BxN - r.ref_logprobs_BxN, 0).sum(1)
    assert np.abs(kl).max() > 1e-4
    g = (scores - history[-1]['beta'] * kl).reshape(-1, 4)
    per_row = (g - (g.sum(1, keepdims=True) - g) / 3).reshape(-1)
  else:
    g = scores.reshape(-1, 4)
    per_row = (g - g.mean(1, keepdims=True)).reshape(-1)
  np.testing.assert_allclose(r.advantages_BxN, np.where(mask, per_row[:, None], 0.0),
                             rtol=1e-4, atol=1e-5)
  assert r.values_BxN is None and all(math.isfinite(h['policy_loss']) for h in history)


@pytest.mark.parametrize('estimator', ['grpo', 'dr_grpo', 'rloo'])
def test_group_estimators_apply_the_no_eos_penalty_before_the_baseline(estimator):
  """Equal scores, one row of the group without eos: with no_eos_penalty = 1 that row
  gets the only negative advantage; with 0 every advantage is 0."""
  n = 3
  mask = np.ones((4, n), bool)
  x = ppo.AdvantageInputs(score_B=jnp.full((4,), 0.7), done_B=jnp.array([True, True, False, True]),
                          logp_BxN=jnp.zeros((4, n)), ref_logp_BxN=jnp.zeros((4, n)),
                          values_BxN=None, mask_BxN=jnp.asarray(mask), beta=jnp.float32(0.0))
  for penalty in (0.0, 1.0):
    cfg = ppo.PPOConfig(advantage=estimator, group_size=4, no_eos_penalty=penalty)
    adv = np.asarray(ppo.ESTIMATORS[estimator].estimate(x, cfg)[0])[:, 0]
    if penalty == 0.0:
      np.testing.assert_allclose(adv, 0.0, atol=1e-6)
    else:
      assert adv[2] < 0 and all(a > 0 for i, a in enumerate(adv) if i != 2), adv
