"""PPO for language models (RLHF), one module of pure, jittable functions.

One iteration (`make_ppo_iteration`) is the whole loop of Ziegler et al. 2019 /
Ouyang et al. 2022, inside one jit:

  rollout     sample N tokens per prompt from the policy π (`sampling.generate`);
  score       s = reward_fn(prompt, response): a reward model or any jittable function;
  old / ref   log π_old(a_j) and log π_ref(a_j) of every response token from the
              training forward (π_ref: the frozen initial policy), values V(s_j);
  rewards     r_j = −β·(log π_old(a_j) − log π_ref(a_j)) on every response token, plus
              s (minus a no-eos penalty if the row never emitted eos) on its last one;
  advantages  GAE: δ_j = r_j + γ·V_{j+1} − V_j (V after the last token = 0, terminal),
              A_j = δ_j + γλ·A_{j+1}, returns R_j = A_j + V_j; A whitened over the batch.
              Or GRPO (Shao et al. 2024): no value model; the k rows sampled for a
              prompt form a group and A = (s − mean_group s) / (std_group s + ε) on
              every token of a row, with the KL as a loss term β·k3 instead of a reward;
              RLOO (Ahmadian et al. 2024): A = s − mean of the other k − 1 scores, the
              sequence KL in the reward; Dr. GRPO (Liu et al. 2025): A = s − mean_group s,
              the policy loss summed over tokens / (rows × N) (no length normalisation).
              Each estimator is one record of ESTIMATORS;
  updates     `epochs` passes over the rows, shuffled, in `minibatches` minibatches:
              clipped surrogate  L_π = mean_t −min(ρ_t·A_t, clip(ρ_t, 1 ± ε)·A_t),
              ρ_t = π(a_t)/π_old(a_t), minus entropy_coef·entropy; clipped value loss
              L_V = ½·mean_t max((V − R)², (V_old + clip(V − V_old, ±c) − R)²);
  β           fixed, or Ziegler's adaptive controller (`update_beta`) on the observed
              per-sequence KL.

All means are over valid response tokens (`valid`: generated tokens up to and
including eos); nothing in the prompt or after eos enters any loss.

Sequence layout of the training forward (T = P + N): each row is its prompt,
right-aligned in P columns (pads before it, segment 0), then its N response columns
(tokens after eos replaced by pad, segment 0). So response column j is sequence
index P + j in every row, token a_j is predicted by the output at index P + j − 1, and
V(s_j), the value of the state before a_j, is the scalar head there too. Positions
count real tokens only (0 at a prompt's first token), as `sampling.generate` decodes
them, so the training forward reproduces the sampler's log-probs up to float noise.
log π_old is recomputed with the training forward itself, in minibatches of the update's
shape and in the first epoch's order, so the first minibatch starts at ratio 1 (to float
rounding of the differentiated forward); the sampler's log-probs are only reported
(`generate_logprob_gap`).

Prompt layout: left-aligned B×P with lengths, as `sampling.generate` takes them. For
GRPO the caller repeats each prompt `group_size` times consecutively
(`repeat_prompts`), so rows [g·k, (g+1)·k) are group g.

KL estimators (Schulman 2020, "Approximating KL divergence"), with
d = log π_ref − log π at tokens sampled from π: k1 = −d (unbiased, can be negative),
k3 = e^d − 1 − d (unbiased, always >= 0, lower variance).

On a (data, fsdp, tensor) mesh (`jit_on_mesh`, what experiments.rlhf runs) the same
iteration is compiled with the state sharded as the pretraining state and the batch split
over data×fsdp; each process passes its rows of the prompts. The rollout keys come from
the one replicated state key over the global batch (threefry, partitionable), so the
rollouts and every number after them are the same on any number of processes.

Big params (reference policy, reward model) should be arguments of the jitted program,
not constants closed over (jit would bake them into the compiled program): the
iteration takes `ref_params` and `reward_args` arguments for that.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research import model as model_lib
from research import reward_model
from research import sampling
from research import sharding

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO / GRPO hyper-parameters (defaults: Ouyang et al. 2022 / TRL, scaled down).

  beta: initial KL coefficient β (the state carries the current one).
  adaptive_kl: Ziegler's controller towards kl_target (per-sequence KL, nats) with
    horizon kl_horizon (in samples); False: β stays fixed.
  gamma, lam: GAE discount and λ.
  clip_eps: PPO ratio clip ε. value_clip: value clip c (0 disables the clip).
  value_coef: scale of the value loss (the value model has its own optimiser).
  entropy_coef: entropy bonus coefficient.
  epochs, minibatches: passes over each rollout and minibatches per pass (the batch
    must be divisible by minibatches).
  max_new_tokens: N. temperature: sampling temperature (1 = on-policy; log π is
    always the temperature-1 policy).
  no_eos_penalty: subtracted from the score of rows that never emitted eos (>= 0).
  advantage: an ESTIMATORS name: 'gae' (value model), 'grpo' (group-normalised scores),
    'rloo' (leave-one-out baseline), 'dr_grpo' (GRPO without std or length normalisation).
  group_size: k, rows per prompt for the group estimators (all but 'gae').
  whiten_advantages: whiten GAE advantages over the batch ('gae' only; GRPO's are
    already normalised per group).
  """
  beta: float = 0.05
  adaptive_kl: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10_000.0
  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  value_clip: float = 0.2
  value_coef: float = 0.1
  entropy_coef: float = 0.0
  epochs: int = 4
  minibatches: int = 1
  max_new_tokens: int = 32
  temperature: float = 1.0
  no_eos_penalty: float = 0.0
  advantage: str = 'gae'
  group_size: int = 1
  whiten_advantages: bool = True

  def __post_init__(self):
    if self.advantage not in ESTIMATORS:
      raise ValueError(f'ppo.advantage={self.advantage!r}: expected one of {sorted(ESTIMATORS)}')
    for name in ('epochs', 'minibatches', 'max_new_tokens', 'group_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'ppo.{name}={getattr(self, name)} must be >= 1')
    if self.estimator.groups and self.group_size < 2:
      raise ValueError(f'ppo.group_size={self.group_size}: {self.advantage} needs groups of >= 2 '
                       'samples')

  @property
  def estimator(self) -> 'Estimator':
    """The record of `advantage` (ESTIMATORS)."""
    return ESTIMATORS[self.advantage]

  @property
  def kl_controller(self) -> 'AdaptiveKL':
    return AdaptiveKL(adaptive=self.adaptive_kl, target=self.kl_target, horizon=self.kl_horizon)


# --------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------


def masked_mean(x, mask, axis=None):
  """Mean of x over True entries of mask (0 when there are none)."""
  m = mask.astype(F32)
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def masked_var(x, mask):
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(x - mean), mask)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x − mean) / std over valid entries (mean kept if not shift_mean); 0 outside mask."""
  mean = masked_mean(x, mask)
  out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)


def explained_variance(values, returns, mask):
  """1 − Var(R − V) / Var(R) over valid tokens (1: perfect, 0: no better than a constant)."""
  return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask), 1e-8)


def last_valid_index(mask_BxN):
  """Index of each row's last True (0 for a row with none)."""
  n = mask_BxN.shape[1]
  return jnp.where(jnp.any(mask_BxN, axis=1), n - 1 - jnp.argmax(mask_BxN[:, ::-1], axis=1), 0)


# --------------------------------------------------------------------------------------
# Sequence layout and the training forward
# --------------------------------------------------------------------------------------


def sequence_from_rollout(prompt_BxP, lengths_B, response_BxN, valid_BxN, pad_id=0):
  """Prompt right-aligned in P columns + response in N -> dict(tokens, positions, segment_ids).

  All B×(P+N) int32. Response column j is index P + j. Segment 1 for real tokens (the
  prompt's and valid response tokens), 0 for pads before the prompt and for response
  columns after eos (whose tokens become pad_id). Positions count real tokens from 0.
  """
  b, p = prompt_BxP.shape
  n = response_BxN.shape[1]
  lengths_B = lengths_B.astype(jnp.int32)
  pads_Bx1 = (p - lengths_B)[:, None]
  slot_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  prompt_positions = jnp.maximum(slot_BxP - pads_Bx1, 0)
  prompt_segments = (slot_BxP >= pads_Bx1).astype(jnp.int32)
  response_positions = lengths_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
  tokens = jnp.concatenate([sampling.right_align(prompt_BxP.astype(jnp.int32), lengths_B, pad_id),
                            jnp.where(valid_BxN, response_BxN.astype(jnp.int32), pad_id)], axis=1)
  return dict(tokens=tokens,
              positions=jnp.concatenate([prompt_positions, response_positions], axis=1),
              segment_ids=jnp.concatenate([prompt_segments, valid_BxN.astype(jnp.int32)], axis=1))


def _forward(params, model, seq):
  b, t = seq['tokens'].shape
  return model.apply({'params': params}, seq['tokens'], seq['positions'], seq['segment_ids'],
                     jnp.zeros((b, t), bool))


def response_logprobs_and_entropy(params, model, seq, p: int, n: int):
  """log π(a_j) of each response token and the policy's entropy there, both float32 B×N.

  `seq` from `sequence_from_rollout`; a_j (index P + j) is scored by the logits at index
  P + j − 1. Logits are computed for the N response positions only (B×N×V).
  """
  if seq['tokens'].shape[1] != p + n:
    raise ValueError(f"sequence width {seq['tokens'].shape[1]} != P + N = {p} + {n}")
  hidden_BxTxD, _ = _forward(params, model, seq)
  logits_BxNxV = model_lib.logits(params, hidden_BxTxD[:, p - 1:p + n - 1],
                                  model.cfg.compute_dtype)
  logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  logp_BxN = jnp.take_along_axis(logp_BxNxV, seq['tokens'][:, p:, None], axis=-1)[..., 0]
  entropy_BxN = -jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1)
  return logp_BxN, entropy_BxN


def response_values(value_params, value_model, seq, p: int, n: int):
  """V(s_j), the value of the state before response token j: the scalar at index P + j − 1."""
  _, scalar_BxT = _forward(value_params, value_model, seq)
  if scalar_BxT is None:
    raise ValueError('the value model needs scalar_head=True')
  return scalar_BxT[:, p - 1:p + n - 1]


# --------------------------------------------------------------------------------------
# Rewards, advantages, KL
# --------------------------------------------------------------------------------------


def token_rewards(score_B, logp_BxN, ref_logp_BxN, mask_BxN, beta, done_B, no_eos_penalty=0.0):
  """r_j = −β·(log π − log π_ref) on valid tokens; + score (− penalty if not done) on the last.

  The last valid token of each row gets `score − no_eos_penalty·(not done)`; rewards are
  0 outside mask. Returns float32 B×N.
  """
  n = mask_BxN.shape[1]
  kl_BxN = jnp.where(mask_BxN, logp_BxN - ref_logp_BxN, 0.0)
  final_B = score_B.astype(F32) - no_eos_penalty * (~done_B).astype(F32)
  last_BxN = jax.nn.one_hot(last_valid_index(mask_BxN), n, dtype=F32)
  rewards = -beta * kl_BxN + last_BxN * final_B[:, None]
  return jnp.where(mask_BxN, rewards, 0.0)


def gae(rewards_BxN, values_BxN, mask_BxN, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns) B×N.

  Reverse scan over the N columns: δ_j = r_j + γ·V_{j+1} − V_j, A_j = δ_j + γλ·A_{j+1},
  where V and A past a row's last valid token are 0 (the episode ended). R = A + V.
  Both are 0 outside mask (a mask is a prefix of each row).
  """
  m_BxN = mask_BxN.astype(bool)

  def step(carry, x):
    next_value_B, next_advantage_B = carry
    reward_B, value_B, valid_B = x
    delta_B = reward_B + gamma * next_value_B - value_B
    advantage_B = jnp.where(valid_B, delta_B + gamma * lam * next_advantage_B, 0.0)
    return (jnp.where(valid_B, value_B, 0.0), advantage_B), advantage_B

  b = rewards_BxN.shape[0]
  zeros_B = jnp.zeros((b,), F32)
  _, advantages_NxB = jax.lax.scan(
      step, (zeros_B, zeros_B),
      (rewards_BxN.T.astype(F32), values_BxN.T.astype(F32), m_BxN.T), reverse=True)
  advantages_BxN = advantages_NxB.T
  return advantages_BxN, jnp.where(m_BxN, advantages_BxN + values_BxN, 0.0)


def _groups(scores_B, group_size: int):
  """Scores float32 G×K (rows grouped consecutively k at a time) and a G×1 bool that is
  True where every score of the group is identical. Raises ValueError if B % k != 0."""
  b = scores_B.shape[0]
  if b % group_size:
    raise ValueError(f'batch {b} is not a multiple of group_size {group_size}')
  s_GxK = scores_B.astype(F32).reshape(b // group_size, group_size)
  same_Gx1 = jnp.max(s_GxK, axis=1, keepdims=True) == jnp.min(s_GxK, axis=1, keepdims=True)
  return s_GxK, same_Gx1


def _per_token(advantage_GxK, same_Gx1, mask_BxN):
  """A group of identical scores carries no signal: exactly 0 (not float residue over a
  ~0 std). Broadcast to every valid token of a row, 0 elsewhere; float32 B×N."""
  advantage_B = jnp.where(same_Gx1, 0.0, advantage_GxK).reshape(-1)
  return jnp.where(mask_BxN, advantage_B[:, None], 0.0)


def grpo_advantages(scores_B, group_size: int, mask_BxN, eps: float = 1e-6):
  """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2): A_i = (s_i − mean_group s) / (std_group s + eps).

  scores_B float B (rows grouped consecutively k = group_size at a time), mask_BxN bool
  -> float32 B×N. The std is the population std of the group. Broadcast to every valid
  token; 0 elsewhere. Each group's per-row advantages sum to 0; a group of identical
  scores gets exactly 0. Raises ValueError if B is not a multiple of k.
  """
  s_GxK, same_Gx1 = _groups(scores_B, group_size)
  mean_Gx1 = jnp.mean(s_GxK, axis=1, keepdims=True)
  std_Gx1 = jnp.std(s_GxK, axis=1, keepdims=True)
  return _per_token((s_GxK - mean_Gx1) / (std_Gx1 + eps), same_Gx1, mask_BxN)


def rloo_advantages(scores_B, group_size: int, mask_BxN):
  """RLOO (Ahmadian et al. 2024, eq. 5; Kool et al. 2019): A_i = s_i − 1/(k−1)·Σ_{j≠i} s_j,
  the leave-one-out baseline of the other k − 1 samples of the prompt.

  scores_B float B (groups of k = group_size consecutive rows, k >= 2), mask_BxN bool ->
  float32 B×N, broadcast to every valid token, 0 elsewhere. Identical scores: exactly 0.
  Raises ValueError if B is not a multiple of k.
  """
  s_GxK, same_Gx1 = _groups(scores_B, group_size)
  others_Gx1 = jnp.sum(s_GxK, axis=1, keepdims=True) - s_GxK
  return _per_token(s_GxK - others_Gx1 / (group_size - 1), same_Gx1, mask_BxN)


def dr_grpo_advantages(scores_B, group_size: int, mask_BxN):
  """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 3 / Fig. 1):
  A_i = s_i − mean_group s, GRPO without the division by the group's std.

  Same shapes, layout and errors as `grpo_advantages`; identical scores: exactly 0.
  (Dr. GRPO's other change, no length normalisation, is in the loss: `policy_loss`'s
  `normaliser`.)
  """
  s_GxK, same_Gx1 = _groups(scores_B, group_size)
  return _per_token(s_GxK - jnp.mean(s_GxK, axis=1, keepdims=True), same_Gx1, mask_BxN)


def repeat_prompts(prompt_BxP, lengths_B, group_size: int):
  """Each prompt `group_size` times consecutively (GRPO's layout)."""
  return (jnp.repeat(prompt_BxP, group_size, axis=0), jnp.repeat(lengths_B, group_size, axis=0))


def kl_k1(logp, ref_logp):
  """Per-token k1 = log π − log π_ref."""
  return logp - ref_logp


def kl_k3(logp, ref_logp):
  """Per-token k3 = e^d − 1 − d, d = log π_ref − log π (Schulman's, >= 0)."""
  d = ref_logp - logp
  return jnp.exp(d) - 1.0 - d


def kl_stats(logp_BxN, ref_logp_BxN, mask_BxN):
  """KL(π‖π_ref) estimates: per sequence (summed over its tokens, mean over rows) and per token.

  -> dict(kl_k1, kl_k3 (per sequence), kl_k1_token, kl_k3_token (mean over valid tokens)).
  """
  out = {}
  for name, fn in (('kl_k1', kl_k1), ('kl_k3', kl_k3)):
    per_token = jnp.where(mask_BxN, fn(logp_BxN, ref_logp_BxN), 0.0)
    out[name] = jnp.mean(jnp.sum(per_token, axis=1))
    out[name + '_token'] = masked_mean(per_token, mask_BxN)
  return out


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def policy_loss(logp_new, logp_old, advantages, mask, clip_eps, normaliser=None):
  """Clipped surrogate mean_t −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = exp(log π − log π_old)
  (Schulman et al. 2017, eq. 7). All B×N; mask bool.

  normaliser None: the mean over valid tokens; a number: the sum over valid tokens
  divided by it (Dr. GRPO's constant, rows × N, so no response length rescales its
  tokens' gradients; Liu et al. 2025 §3.1).
  -> (loss, metrics): clip_fraction (share of tokens with |ρ − 1| > ε), approx_kl
  (k3 estimate of KL(π_old‖π): mean (ρ − 1) − log ρ), ratio_max_dev (max |ρ − 1|).
  """
  log_ratio = jnp.where(mask, logp_new - logp_old, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  surrogate = -jnp.minimum(unclipped, clipped)
  if normaliser is None:
    loss = masked_mean(surrogate, mask)
  else:
    loss = jnp.sum(jnp.where(mask, surrogate, 0.0)) / normaliser
  metrics = dict(
      clip_fraction=masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(F32), mask),
      approx_kl=masked_mean((ratio - 1.0) - log_ratio, mask),
      ratio_max_dev=jnp.max(jnp.where(mask, jnp.abs(ratio - 1.0), 0.0)))
  return loss, metrics


def value_loss(v_new, v_old, returns, mask, clip):
  """½·mean_t max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) -> (loss, metrics).

  clip <= 0: no clipping (½·mean (V − R)²). metrics: value_clip_fraction (share of tokens
  where the clipped term is the larger one).
  """
  unclipped = jnp.square(v_new - returns)
  if clip > 0:
    v_clipped = v_old + jnp.clip(v_new - v_old, -clip, clip)
    clipped = jnp.square(v_clipped - returns)
  else:
    clipped = unclipped
  loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
  return loss, dict(value_clip_fraction=masked_mean((clipped > unclipped).astype(F32), mask))


# --------------------------------------------------------------------------------------
# KL controller
# --------------------------------------------------------------------------------------


def update_beta(beta, observed_kl, target, horizon, n_steps):
  """Ziegler et al. 2019's adaptive KL coefficient.

  e = clip(KL / target − 1, −0.2, 0.2), β ← β·(1 + e·n_steps / horizon): β grows when the
  observed KL is above target and shrinks below it. n_steps: samples in this update.
  """
  error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + error * n_steps / horizon)


@dataclasses.dataclass(frozen=True)
class AdaptiveKL:
  """The controller's config; `adaptive=False` keeps β fixed."""
  adaptive: bool = False
  target: float = 6.0
  horizon: float = 10_000.0

  def update(self, beta, observed_kl, n_steps):
    if not self.adaptive:
      return beta
    return update_beta(beta, observed_kl, self.target, self.horizon, n_steps)


# --------------------------------------------------------------------------------------
# Advantage estimators: one record each
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class AdvantageInputs:
  """What an estimator sees of a rollout: score_B, done_B (emitted eos), log π_old and
  log π_ref (float32 B×N), values_BxN (None without a value model), mask_BxN, β."""
  score_B: jax.Array
  done_B: jax.Array
  logp_BxN: jax.Array
  ref_logp_BxN: jax.Array
  values_BxN: Optional[jax.Array]
  mask_BxN: jax.Array
  beta: jax.Array


def _final_scores(x: AdvantageInputs, cfg) -> jax.Array:
  """score − no_eos_penalty for rows that never emitted eos (float32 B)."""
  return x.score_B - cfg.no_eos_penalty * (~x.done_B).astype(F32)


def _estimate_gae(x: AdvantageInputs, cfg):
  rewards = token_rewards(x.score_B, x.logp_BxN, x.ref_logp_BxN, x.mask_BxN, x.beta, x.done_B,
                          cfg.no_eos_penalty)
  advantages, returns = gae(rewards, x.values_BxN, x.mask_BxN, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    advantages = whiten(advantages, x.mask_BxN)
  return advantages, returns, rewards


def _estimate_grpo(x: AdvantageInputs, cfg):
  return grpo_advantages(_final_scores(x, cfg), cfg.group_size, x.mask_BxN), None, None


def _estimate_dr_grpo(x: AdvantageInputs, cfg):
  return dr_grpo_advantages(_final_scores(x, cfg), cfg.group_size, x.mask_BxN), None, None


def _estimate_rloo(x: AdvantageInputs, cfg):
  # Ahmadian et al. 2024 §3: the sequence reward is r(x, y) − β·log π(y|x)/π_ref(y|x)
  # (k1 summed over the response), then the leave-one-out baseline.
  kl_B = jnp.sum(jnp.where(x.mask_BxN, kl_k1(x.logp_BxN, x.ref_logp_BxN), 0.0), axis=1)
  final_B = _final_scores(x, cfg) - x.beta * kl_B
  return rloo_advantages(final_B, cfg.group_size, x.mask_BxN), None, None


@dataclasses.dataclass(frozen=True)
class Estimator:
  """An advantage estimator and what the iteration asks of it.

  estimate: (AdvantageInputs, PPOConfig) -> (advantages_BxN, returns_BxN or None,
    rewards_BxN or None), float32.
  value_model: it needs a value model (trained alongside, clipped value loss).
  groups: rows come in groups of cfg.group_size (>= 2) samples of one prompt.
  length_normalised: the policy loss is a mean over valid tokens; False: a sum over
    valid tokens divided by the constant rows × N (Dr. GRPO).
  kl_loss: the KL to the reference is a loss term β·k3; False: it is in the reward.
  """
  name: str
  estimate: Callable
  value_model: bool = False
  groups: bool = True
  length_normalised: bool = True
  kl_loss: bool = True


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator('gae', _estimate_gae, value_model=True, groups=False, kl_loss=False),
    Estimator('grpo', _estimate_grpo),
    Estimator('rloo', _estimate_rloo, kl_loss=False),
    Estimator('dr_grpo', _estimate_dr_grpo, length_normalised=False),
)}


# --------------------------------------------------------------------------------------
# State and the iteration
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class PPOState:
  """policy / value params and optimiser states (value ones None for GRPO), β, step, rng."""
  policy_params: Any
  policy_opt_state: Any
  value_params: Any
  value_opt_state: Any
  beta: jax.Array
  step: jax.Array
  rng: jax.Array


@flax.struct.dataclass
class Rollout:
  """One iteration's data (B rows, N response columns), in the prompts' order.

  logprobs_BxN: log π_old from the training forward; ref_logprobs_BxN: log π_ref;
  values_BxN, rewards_BxN, returns_BxN: None for GRPO.
  """
  prompt_BxP: jax.Array
  lengths_B: jax.Array
  generation: sampling.Generation
  scores_B: jax.Array
  logprobs_BxN: jax.Array
  ref_logprobs_BxN: jax.Array
  entropy_BxN: jax.Array
  values_BxN: Optional[jax.Array]
  rewards_BxN: Optional[jax.Array]
  advantages_BxN: jax.Array
  returns_BxN: Optional[jax.Array]


def init_ppo_state(policy_params, tx_policy, cfg: PPOConfig, rng, value_params=None,
                   tx_value=None) -> PPOState:
  """The initial state: β = cfg.beta, step 0. An estimator with a value model (GAE) needs
  value params and tx_value (ValueError otherwise)."""
  if cfg.estimator.value_model:
    if value_params is None or tx_value is None:
      raise ValueError(f'advantage={cfg.advantage!r} needs value_params and tx_value')
    value_opt_state = tx_value.init(value_params)
  else:
    value_params, value_opt_state = None, None
  return PPOState(policy_params=policy_params, policy_opt_state=tx_policy.init(policy_params),
                  value_params=value_params, value_opt_state=value_opt_state,
                  beta=jnp.asarray(cfg.beta, F32), step=jnp.zeros((), jnp.int32), rng=rng)


def make_ppo_iteration(policy_model, value_model, ref_params, reward_fn: Callable, tx_policy,
                       tx_value, cfg: PPOConfig, eos_id: int, *, pad_id: int = 0, top_k: int = 0,
                       top_p: float = 1.0):
  """-> pure `iteration(state, prompt_BxP, lengths_B, ref_params=None, reward_args=())`.

  Returns (state, metrics, Rollout). Suitable for `jax.jit` as a whole. The iteration
  runs four named stages: rollout -> advantages (the estimator `cfg.advantage` of
  ESTIMATORS) -> clipped updates over minibatches -> metrics; what differs between
  estimators (value model, groups, length normalisation, where the KL goes) is read
  from the estimator's record.

  Args:
    policy_model: the policy's Transformer (scalar_head False); the reference policy
      is the same model with `ref_params`.
    value_model: a Transformer with scalar_head=True (None for estimators without one).
    ref_params: the frozen initial policy. May be None here and given to each call
      instead (recommended beyond toy sizes: an argument, not a compiled-in constant).
    reward_fn: jittable `reward_fn(prompt_BxP, lengths_B, response_BxN, valid_BxN,
      *reward_args) -> score_B` (e.g. `reward_model.make_reward_fn(rm_model)` with
      reward_args=(rm_params, offset), or any toy function of the tokens).
    tx_policy, tx_value: optax optimisers (tx_value None without a value model).
    cfg: PPOConfig. eos_id: end-of-turn id (a row stops there). pad_id: written after
      eos. top_k, top_p: sampling filters (static).

  Prompts: left-aligned with lengths (>= 1), B divisible by cfg.minibatches; for group
  estimators each prompt repeated cfg.group_size times consecutively (`repeat_prompts`).
  Raises ValueError: a value-model estimator without a value model; at trace time, B
  not divisible by minibatches / group_size, or no reference params.

  `jax.jit(iteration, donate_argnums=0)` may donate the state, as long as the reference
  params are separate buffers (not the initial state's policy params themselves).
  """
  est = ESTIMATORS[cfg.advantage]
  if est.value_model and value_model is None:
    raise ValueError(f'advantage={cfg.advantage!r} needs a value model')
  n = cfg.max_new_tokens
  closed_ref_params = ref_params

  def iteration(state: PPOState, prompt_BxP, lengths_B, ref_params=None, reward_args=()):
    ref = closed_ref_params if ref_params is None else ref_params
    if ref is None:
      raise ValueError('no reference params: give them to make_ppo_iteration or the call')
    b, p = prompt_BxP.shape
    if b % cfg.minibatches:
      raise ValueError(f'batch {b} is not divisible by minibatches={cfg.minibatches}')
    if est.groups and b % cfg.group_size:
      raise ValueError(f'batch {b} is not a multiple of group_size={cfg.group_size}')
    mb = b // cfg.minibatches
    lengths_B = lengths_B.astype(jnp.int32)
    rng, r_generate, r_shuffle = jax.random.split(state.rng, 3)
    perms_ExB = jax.vmap(lambda k: jax.random.permutation(k, b))(
        jax.random.split(r_shuffle, cfg.epochs))
    chunk = lambda x, perm: x[perm].reshape(cfg.minibatches, mb, *x.shape[1:])

    def unchunk(x, perm):
      flat = x.reshape(b, *x.shape[2:])
      return jnp.zeros_like(flat).at[perm].set(flat)

    # 1. Rollout: sample, then old / reference log-probs and values by minibatches in the
    # first epoch's order, and the scores.
    gen = sampling.generate(state.policy_params, prompt_BxP, lengths_B, r_generate,
                            cfg=policy_model.cfg, max_new_tokens=n, eos_id=eos_id, pad_id=pad_id,
                            temperature=cfg.temperature, top_k=top_k, top_p=top_p)
    mask_BxN = gen.valid_BxN
    seq = sequence_from_rollout(prompt_BxP, lengths_B, gen.tokens_BxN, mask_BxN, pad_id)

    def rollout_forward(s):
      logp, entropy = response_logprobs_and_entropy(state.policy_params, policy_model, s, p, n)
      ref_logp, _ = response_logprobs_and_entropy(ref, policy_model, s, p, n)
      values = (response_values(state.value_params, value_model, s, p, n) if est.value_model
                else None)
      return logp, entropy, ref_logp, values

    out = jax.lax.map(rollout_forward, jax.tree.map(lambda x: chunk(x, perms_ExB[0]), seq))
    logp_old, entropy, ref_logp, values = jax.tree.map(lambda x: unchunk(x, perms_ExB[0]), out)
    score_B = reward_fn(prompt_BxP, lengths_B, gen.tokens_BxN, mask_BxN, *reward_args)
    score_B = jax.lax.stop_gradient(score_B.astype(F32))
    beta = state.beta

    # 2. Advantages, by the estimator's record.
    advantages, returns, rewards = est.estimate(
        AdvantageInputs(score_B=score_B, done_B=gen.done_B, logp_BxN=logp_old,
                        ref_logp_BxN=ref_logp, values_BxN=values, mask_BxN=mask_BxN,
                        beta=beta), cfg)

    # 3. Clipped updates: epochs x minibatches, rows shuffled every epoch.
    normaliser = None if est.length_normalised else float(mb * n)

    def policy_objective(params, batch):
      logp, ent = response_logprobs_and_entropy(params, policy_model, batch['seq'], p, n)
      mask = batch['mask']
      loss, metrics = policy_loss(logp, batch['logp_old'], batch['advantages'], mask,
                                  cfg.clip_eps, normaliser)
      mean_entropy = masked_mean(ent, mask)
      total = loss - cfg.entropy_coef * mean_entropy
      metrics = dict(metrics, policy_loss=loss, minibatch_entropy=mean_entropy)
      if est.kl_loss:  # KL to the reference as a loss term (DeepSeekMath), k3 per token
        kl = masked_mean(kl_k3(logp, batch['ref_logp']), mask)
        total = total + beta * kl
        metrics['kl_loss'] = kl
      return total, metrics

    def value_objective(params, batch):
      v = response_values(params, value_model, batch['seq'], p, n)
      loss, metrics = value_loss(v, batch['values'], batch['returns'], batch['mask'],
                                 cfg.value_clip)
      return cfg.value_coef * loss, dict(metrics, value_loss=loss)

    def minibatch_update(carry, batch):
      policy_params, policy_opt, value_params, value_opt = carry
      (_, metrics), grads = jax.value_and_grad(policy_objective, has_aux=True)(policy_params,
                                                                               batch)
      updates, policy_opt = tx_policy.update(grads, policy_opt, policy_params)
      policy_params = optax.apply_updates(policy_params, updates)
      metrics['policy_grad_norm'] = optax.tree.norm(grads)
      if est.value_model:
        (_, v_metrics), grads = jax.value_and_grad(value_objective, has_aux=True)(value_params,
                                                                                  batch)
        updates, value_opt = tx_value.update(grads, value_opt, value_params)
        value_params = optax.apply_updates(value_params, updates)
        metrics.update(v_metrics, value_grad_norm=optax.tree.norm(grads))
      return (policy_params, policy_opt, value_params, value_opt), metrics

    data = dict(seq=seq, mask=mask_BxN, logp_old=logp_old, ref_logp=ref_logp,
                advantages=advantages, values=values, returns=returns)

    def epoch(carry, perm):
      return jax.lax.scan(minibatch_update, carry, jax.tree.map(lambda x: chunk(x, perm), data))

    carry = (state.policy_params, state.policy_opt_state, state.value_params,
             state.value_opt_state)
    (policy_params, policy_opt, value_params, value_opt), per_update = jax.lax.scan(
        epoch, carry, perms_ExB)

    # 4. Metrics (of this rollout; update metrics averaged over every minibatch).
    kl = kl_stats(logp_old, ref_logp, mask_BxN)
    metrics = dict(
        score_mean=jnp.mean(score_B), score_std=jnp.std(score_B),
        kl_k1=kl['kl_k1'], kl_k3=kl['kl_k3'], kl_k1_token=kl['kl_k1_token'],
        kl_k3_token=kl['kl_k3_token'], entropy=masked_mean(entropy, mask_BxN),
        response_length=jnp.mean(gen.lengths_B.astype(F32)),
        fraction_done=jnp.mean(gen.done_B.astype(F32)), beta=beta,
        generate_logprob_gap=jnp.max(jnp.where(mask_BxN, jnp.abs(gen.logprobs_BxN - logp_old),
                                               0.0)),
        first_ratio_max_dev=per_update['ratio_max_dev'][0, 0])
    for name, value in per_update.items():
      if name != 'ratio_max_dev':
        metrics[name] = jnp.mean(value)
    if est.value_model:
      metrics.update(explained_variance=explained_variance(values, returns, mask_BxN),
                     value_mean=masked_mean(values, mask_BxN),
                     return_mean=masked_mean(returns, mask_BxN),
                     reward_sum=jnp.mean(jnp.sum(rewards, axis=1)))

    new_beta = cfg.kl_controller.update(beta, kl['kl_k1'], b)
    new_state = PPOState(policy_params=policy_params, policy_opt_state=policy_opt,
                         value_params=value_params, value_opt_state=value_opt,
                         beta=jnp.asarray(new_beta, F32), step=state.step + 1, rng=rng)
    rollout = Rollout(prompt_BxP=prompt_BxP, lengths_B=lengths_B, generation=gen,
                      scores_B=score_B, logprobs_BxN=logp_old, ref_logprobs_BxN=ref_logp,
                      entropy_BxN=entropy, values_BxN=values, rewards_BxN=rewards,
                      advantages_BxN=advantages, returns_BxN=returns)
    return new_state, metrics, rollout

  return iteration


def sequence_kl_and_entropy(params, ref_params, model, prompt_BxP, lengths_B, tokens_BxN,
                            valid_BxN, pad_id: int = 0):
  """Per-sequence KL(π ‖ π_ref) of sampled responses, and mean entropy per token.

  Returns (k1_B, k3_B, entropy_B), float32: k1 = Σ_t (log π − log π_ref) and k3 =
  Σ_t (r − 1 − log r), r = π_ref/π (Schulman 2020's estimators), summed over each
  row's valid tokens; entropy = mean over valid tokens of the policy's entropy (nats).
  An unbiased estimate of the sequence KL needs the responses sampled from π at
  temperature 1.
  """
  seq = sequence_from_rollout(prompt_BxP, lengths_B, tokens_BxN, valid_BxN, pad_id)
  p, n = prompt_BxP.shape[1], tokens_BxN.shape[1]
  logp, entropy = response_logprobs_and_entropy(params, model, seq, p, n)
  ref_logp, _ = response_logprobs_and_entropy(ref_params, model, seq, p, n)
  k1 = jnp.sum(jnp.where(valid_BxN, logp - ref_logp, 0.0), axis=1)
  k3 = jnp.sum(jnp.where(valid_BxN, kl_k3(logp, ref_logp), 0.0), axis=1)
  count = jnp.maximum(jnp.sum(valid_BxN, 1), 1)
  return k1, k3, jnp.sum(jnp.where(valid_BxN, entropy, 0.0), axis=1) / count


def state_tree(state: PPOState) -> dict:
  """The PPO state as a plain dict Orbax saves (rng as key data; no None entries)."""
  tree = dict(policy_params=state.policy_params, policy_opt_state=state.policy_opt_state,
              beta=state.beta, step=state.step, rng=jax.random.key_data(state.rng))
  if state.value_params is not None:
    tree.update(value_params=state.value_params, value_opt_state=state.value_opt_state)
  return tree


def state_from_tree(tree: dict) -> PPOState:
  return PPOState(policy_params=tree['policy_params'],
                      policy_opt_state=tree['policy_opt_state'],
                      value_params=tree.get('value_params'),
                      value_opt_state=tree.get('value_opt_state'), beta=tree['beta'],
                      step=tree['step'], rng=jax.random.wrap_key_data(tree['rng']))


def abstract_tree(tree):
  """ShapeDtypeStructs of a state tree, each with its leaf's sharding (where a restore
  puts it: a state placed on a mesh restores onto that mesh, whatever wrote it)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def param_shardings(model_cfg, mesh):
  """NamedShardings of a Transformer's params on `mesh`, from the logical-axis rules
  (research/sharding.py), exactly as the pretraining state shards them."""
  z = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(model_lib.Transformer(model_cfg).init, jax.random.key(0), z, z, z,
                            jnp.zeros((1, 8), bool))['params']
  return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)


def state_shardings(policy_cfg, value_cfg, tx_policy, tx_value, cfg: PPOConfig, mesh) -> PPOState:
  """A PPOState of NamedShardings on `mesh`: policy / value params and their optimiser
  states sharded by the logical rules (as the pretraining state: `embed` over fsdp,
  heads / MLP / vocabulary over tensor), β, step and rng replicated. `value_cfg` is read
  only for an estimator with a value model."""
  z = jnp.zeros((1, 8), jnp.int32)
  dummy = (z, z, z, jnp.zeros((1, 8), bool))

  def init():
    policy = model_lib.Transformer(policy_cfg).init(jax.random.key(0), *dummy)['params']
    value = (model_lib.Transformer(value_cfg).init(jax.random.key(0), *dummy)['params']
             if cfg.estimator.value_model else None)
    return init_ppo_state(policy, tx_policy, cfg, jax.random.key(0), value_params=value,
                          tx_value=tx_value)
  return sharding.logical_to_sharding(nn.get_partition_spec(jax.eval_shape(init)), mesh)


def check_mesh(policy_cfg, cfg: PPOConfig, batch_size: int, mesh) -> None:
  """Raises sharding.MeshError before compiling when `mesh` cannot run an iteration of
  `batch_size` rows: rows and update minibatches must split over data×fsdp, heads over
  tensor, every sharded parameter dimension over its mesh axes."""
  data = mesh.shape['data'] * mesh.shape['fsdp']
  minibatch = batch_size // cfg.minibatches
  if batch_size % data or minibatch % data:
    raise sharding.MeshError(
        f'ppo.batch_size={batch_size} ({cfg.minibatches} minibatches of {minibatch}) does not '
        f'split over data×fsdp = {data} of mesh {dict(mesh.shape)}')
  for name in ('num_heads', 'kv_heads'):
    if getattr(policy_cfg, name) % mesh.shape['tensor']:
      raise sharding.MeshError(f'model {name}={getattr(policy_cfg, name)} is not divisible by '
                               f'the mesh tensor axis {mesh.shape["tensor"]}')
  z = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(model_lib.Transformer(policy_cfg).init, jax.random.key(0), z, z, z,
                            jnp.zeros((1, 8), bool))['params']
  sharding.check_divisible(mesh, batch_size, nn.unbox(abstract), nn.get_partition_spec(abstract))


# Compile options for the small RL programs (tests, the tiny presets): compile time
# dominates there, and the unoptimised programs run fast enough.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


def _jit(fn, fast: bool):
  return jax.jit(fn, compiler_options=FAST_COMPILE if fast else None)


@dataclasses.dataclass
class RolloutPrograms:
  """The jitted pieces an RL run needs outside its iteration (cached: one compile per
  batch shape and model): sampling, proxy scores and KL for evaluations and pairs.

  generate(params, prompt, lengths, rng) -> Generation at temperature 1;
  kl(params, ref_params, prompt, lengths, tokens, valid) -> (k1, k3, entropy) per row;
  score(prompt, lengths, tokens, valid, rm_params, offset) -> proxy per row (None before
  the reward model exists).
  """
  generate: Callable
  kl: Callable
  score: Optional[Callable] = None

  @classmethod
  @functools.lru_cache(maxsize=8)
  def make(cls, policy_cfg, rm_cfg, n: int, stop_id: int, pad_id: int, close: bool, fast: bool):
    model = model_lib.Transformer(policy_cfg)
    generate = lambda params, prompt, lengths, rng: sampling.generate(
        params, prompt, lengths, rng, cfg=policy_cfg, max_new_tokens=n, eos_id=stop_id,
        pad_id=pad_id, temperature=1.0)
    kl = lambda params, ref, prompt, lengths, tokens, valid: sequence_kl_and_entropy(
        params, ref, model, prompt, lengths, tokens, valid, pad_id)
    score = None if rm_cfg is None else _jit(reward_model.make_reward_fn(
        model_lib.Transformer(rm_cfg), pad_id, stop_id, close), fast)
    return cls(generate=_jit(generate, fast), kl=_jit(kl, fast), score=score)


@functools.lru_cache(maxsize=4)
def jitted_iteration(policy_cfg, rm_cfg, cfg: PPOConfig, policy_lr: float, value_lr: float,
                  grad_clip: float, stop_id: int, pad_id: int, close: bool, fast: bool,
                  mesh=None):
  """-> (jitted `make_ppo_iteration` with Adam optimisers and the reward model's closing
  reward function, tx_policy, tx_value); cached so a process compiles it once. GRPO has
  no value model (tx_value None) in the group estimators. `fast` compiles with FAST_COMPILE.

  With a (data, fsdp, tensor) `mesh` the iteration runs on it, as the pretraining step
  does: the state in `state_shardings` (donated), the reference params in the policy's
  `param_shardings`, the reward args (rm params, offset) in the reward model's and
  replicated; prompts and every per-row output split over data×fsdp, metrics
  replicated. Each process passes its own rows of the prompts (`sharding.process_rows`;
  `sharding.global_batch` joins them), and the rollout keys are one replicated key
  drawn over the global batch, so the rollouts do not depend on the process count.
  Call it as `iteration(state, prompt_BxP, lengths_B, ref_params, (rm_params, offset))`.
  """
  no_value = not cfg.estimator.value_model
  tx_policy = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(policy_lr))
  tx_value = None if no_value else optax.chain(optax.clip_by_global_norm(grad_clip),
                                           optax.adam(value_lr))
  rm_model = model_lib.Transformer(rm_cfg)
  iteration = make_ppo_iteration(
      model_lib.Transformer(policy_cfg), None if no_value else rm_model, None,
      reward_model.make_reward_fn(rm_model, pad_id, stop_id, close), tx_policy, tx_value, cfg, stop_id,
      pad_id=pad_id)
  options = FAST_COMPILE if fast else None
  if mesh is None:
    return jax.jit(iteration, donate_argnums=0, compiler_options=options), tx_policy, tx_value
  return (jit_on_mesh(iteration, policy_cfg, rm_cfg, tx_policy, tx_value, cfg, mesh, options),
          tx_policy, tx_value)


def jit_on_mesh(iteration, policy_cfg, rm_cfg, tx_policy, tx_value, cfg: PPOConfig, mesh,
                compiler_options=None):
  """`make_ppo_iteration`'s `iteration` compiled over a (data, fsdp, tensor) mesh, as the
  pretraining step is: the state in `state_shardings` (donated), the reference params in
  the policy's `param_shardings`, reward args (rm params, offset) in the reward model's
  (`rm_cfg`) and replicated; prompts and every per-row output split over data×fsdp,
  metrics replicated. Returns `run(state, prompt_BxP, lengths_B, ref_params, reward_args)
  -> (state, metrics, Rollout)` where each process passes its own rows of the prompts
  (`sharding.process_rows`; `sharding.global_batch` joins them); `run.state_shardings`
  places a fresh state (`sharding.place`)."""

  def with_rules(state, prompt_BxP, lengths_B, ref_params, reward_args):
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return iteration(state, prompt_BxP, lengths_B, ref_params, reward_args)

  states = state_shardings(policy_cfg, rm_cfg, tx_policy, tx_value, cfg, mesh)
  rows = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(with_rules, donate_argnums=0, compiler_options=compiler_options,
                   in_shardings=(states, rows, rows, param_shardings(policy_cfg, mesh),
                                 (param_shardings(rm_cfg, mesh), replicated)),
                   out_shardings=(states, replicated, rows))

  def run(state, prompt_BxP, lengths_B, ref_params, reward_args):
    prompt_BxP, lengths_B = sharding.global_batch((prompt_BxP, lengths_B), mesh)
    with jax.set_mesh(mesh):
      return jitted(state, prompt_BxP, lengths_B, ref_params, tuple(reward_args))
  run.jitted, run.state_shardings = jitted, states
  return run
