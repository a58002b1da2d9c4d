"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

A policy π is trained on preference pairs (x, y_c ≻ y_r) against a frozen reference
π_ref (the SFT model it starts from), with no reward model and no sampling:

  h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]
  DPO  L = −log σ(β·h)                  (Rafailov et al. 2023, eq. 7)
  IPO  L = (h − 1/(2β))²                (Azar et al. 2023, eq. 17, with τ = β)

The implicit reward of a reply is r̂(x, y) = β·(log π(y|x) − log π_ref(y|x)) (Rafailov
et al. eq. 5); held-out implicit-reward accuracy is the share of pairs with
r̂(x, y_c) > r̂(x, y_r).

Pairs are the arrays of `research.preferences` (chosen/rejected tokens B×L right-padded,
lengths B): whole chat renderings of prompt + reply. log π(y|x) sums the log-probs of
the tokens from the first index where the two sides differ (`response_starts`) to the
end: tokens before it (the shared prompt and any shared start of the replies) have the
same log-prob on both sides, so they cancel in h exactly and scoring from there equals
scoring the replies.

The reference log-probs are computed once, before training (`reference_logprobs`), and
travel with the pair arrays (keys REF_KEYS); the train step never sees the reference
params.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import model as model_lib
from research import train_step as train_lib

LOSSES = ('sigmoid', 'ipo')
REF_KEYS = ('ref_chosen_logp', 'ref_rejected_logp')
START_KEY = 'response_start'


def response_starts(arrays) -> np.ndarray:
  """First index where a pair's chosen and rejected tokens differ (>= 1), int32 N.

  arrays: {chosen_tokens N×L, chosen_lengths N, rejected_tokens N×L', rejected_lengths N}.
  A pair whose shorter side is a prefix of the other starts at that side's length (the
  first token only one side has); index 0 is never scored (nothing predicts it).
  """
  c, r = np.asarray(arrays['chosen_tokens']), np.asarray(arrays['rejected_tokens'])
  cl, rl = np.asarray(arrays['chosen_lengths']), np.asarray(arrays['rejected_lengths'])
  width = min(c.shape[1], r.shape[1])
  n = len(cl)
  shared = np.minimum(np.minimum(cl, rl), width)
  same_NxW = c[:, :width] == r[:, :width]
  same_NxW &= np.arange(width)[None, :] < shared[:, None]
  first = np.where(same_NxW.all(1), shared, np.argmin(same_NxW, axis=1)) if n else shared
  return np.maximum(first, 1).astype(np.int32)


def sequence_logprobs(params, model: model_lib.Transformer, tokens_BxL, lengths_B, start_B):
  """Σ_{t = start}^{length − 1} log π(token_t | tokens_<t), float32 B (causal forward).

  tokens_BxL int32, right-padded after lengths_B (>= 1) real tokens; start_B int32 >= 1.
  """
  b, l = tokens_BxL.shape
  positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  segment_ids_BxL = (positions_BxL < lengths_B[:, None]).astype(jnp.int32)
  hidden_BxLxD, _ = model.apply({'params': params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                                jnp.zeros((b, l), bool))
  logits_BxLxV = model_lib.logits(params, hidden_BxLxD[:, :-1], model.cfg.compute_dtype)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  # Output at t − 1 predicts token t (t = 1 .. L − 1).
  logp_BxT = jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  t_1xT = jnp.arange(1, l)[None, :]
  scored_BxT = (t_1xT >= start_B[:, None]) & (t_1xT < lengths_B[:, None])
  return jnp.sum(jnp.where(scored_BxT, logp_BxT, 0.0), axis=1)


def pair_logprobs(params, model, batch):
  """(log π(y_c|x) B, log π(y_r|x) B), float32, in one forward over 2B rows.

  batch: the pair arrays plus START_KEY (`response_starts`); the two sides may differ in
  width (the narrower is padded).
  """
  chosen, rejected = batch['chosen_tokens'], batch['rejected_tokens']
  width = max(chosen.shape[1], rejected.shape[1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
  tokens = jnp.concatenate([pad(chosen), pad(rejected)])
  lengths = jnp.concatenate([batch['chosen_lengths'], batch['rejected_lengths']])
  start = jnp.concatenate([batch[START_KEY], batch[START_KEY]])
  logp = sequence_logprobs(params, model, tokens, lengths, start)
  b = chosen.shape[0]
  return logp[:b], logp[b:]


def dpo_loss(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta: float,
             loss: str = 'sigmoid'):
  """DPO or IPO loss of a batch of pairs -> (loss, metrics). All inputs float B.

  h = (chosen − ref_chosen) − (rejected − ref_rejected) (log-prob ratios, nats);
  'sigmoid': mean −log σ(β·h) (Rafailov et al. 2023, eq. 7);
  'ipo': mean (h − 1/(2β))² (Azar et al. 2023, eq. 17; β plays τ).
  metrics: loss, accuracy (implicit reward β·h > 0, ties ½), margin (mean β·h),
  chosen_reward / rejected_reward (mean implicit rewards β·(log π − log π_ref)).
  Raises ValueError for an unknown loss or β <= 0.
  """
  if loss not in LOSSES:
    raise ValueError(f'dpo loss {loss!r}: expected one of {LOSSES}')
  if not beta > 0:
    raise ValueError(f'dpo beta={beta} must be > 0')
  chosen_reward_B = beta * (chosen_B - ref_chosen_B).astype(jnp.float32)
  rejected_reward_B = beta * (rejected_B - ref_rejected_B).astype(jnp.float32)
  margin_B = chosen_reward_B - rejected_reward_B
  if loss == 'sigmoid':
    value = -jnp.mean(jax.nn.log_sigmoid(margin_B))
  else:
    value = jnp.mean(jnp.square(margin_B / beta - 1.0 / (2.0 * beta)))
  correct_B = jnp.where(margin_B > 0, 1.0, jnp.where(margin_B == 0, 0.5, 0.0))
  return value, dict(loss=value, accuracy=jnp.mean(correct_B), margin=jnp.mean(margin_B),
                     chosen_reward=jnp.mean(chosen_reward_B),
                     rejected_reward=jnp.mean(rejected_reward_B))


def _batched_logprobs(logprob_fn: Callable, params, arrays: dict, batch_size: int):
  """(chosen N, rejected N) float32 log-probs of every pair, `batch_size` pairs at a time
  (the last batch padded by repeating its final row; the extra scores are dropped)."""
  n = len(arrays[START_KEY])
  chosen, rejected = [np.zeros((0,), np.float32)], [np.zeros((0,), np.float32)]
  for i in range(0, n, batch_size):
    idx = np.minimum(np.arange(i, i + batch_size), n - 1)
    c, r = logprob_fn(params, {k: v[idx] for k, v in arrays.items()})
    m = min(batch_size, n - i)
    chosen.append(np.asarray(c, np.float32)[:m])
    rejected.append(np.asarray(r, np.float32)[:m])
  return np.concatenate(chosen), np.concatenate(rejected)


def reference_logprobs(logprob_fn: Callable, ref_params, arrays: dict, batch_size: int) -> dict:
  """The pair arrays plus START_KEY and the reference log-probs (REF_KEYS, float32 N),
  computed once (before training) in batches of `batch_size` pairs.

  logprob_fn: jitted (params, batch) -> (chosen B, rejected B), e.g. of `pair_logprobs`.
  """
  out = {k: np.asarray(v) for k, v in arrays.items()}
  out[START_KEY] = response_starts(out)
  out['ref_chosen_logp'], out['ref_rejected_logp'] = _batched_logprobs(
      logprob_fn, ref_params, out, batch_size)
  return out


def make_dpo_train_step(model, tx, schedule, beta: float, loss: str = 'sigmoid'):
  """Pure step(state: train_step.TrainState, batch, rng) -> (state, metrics).

  batch: pair arrays with START_KEY and REF_KEYS (`reference_logprobs`), every leaf split
  along its leading (pair) axis, so `train_step.jit_train_step` compiles it over a mesh.
  The reference model is not an argument: its log-probs come with the batch.
  metrics: `dpo_loss`'s, grad_norm, learning_rate. Raises ValueError as `dpo_loss`.
  """
  dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta, loss)  # checks

  def loss_fn(params, batch):
    chosen_B, rejected_B = pair_logprobs(params, model, batch)
    return dpo_loss(chosen_B, rejected_B, batch['ref_chosen_logp'], batch['ref_rejected_logp'],
                    beta, loss)

  def step(state: train_lib.TrainState, batch, rng):
    del rng  # deterministic: no dropout
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
    return train_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def implicit_reward_accuracy(logprob_fn: Callable, params, arrays: dict, batch_size: int,
                             beta: float) -> dict:
  """Held-out metrics of a policy on pairs with reference log-probs (`reference_logprobs`):
  {accuracy, margin, n}, accuracy = share of pairs whose implicit reward prefers chosen
  (ties ½)."""
  n = len(arrays[START_KEY])
  if not n:
    return dict(accuracy=None, margin=None, n=0)
  chosen, rejected = _batched_logprobs(logprob_fn, params, arrays, batch_size)
  h = ((chosen - arrays['ref_chosen_logp']) - (rejected - arrays['ref_rejected_logp']))
  correct = np.where(h > 0, 1.0, np.where(h == 0, 0.5, 0.0))
  return dict(accuracy=float(correct.mean()), margin=float(beta * h.mean()), n=n)
