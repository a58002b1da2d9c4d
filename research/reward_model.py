"""Reward model: a Transformer with a scalar head, trained on preference pairs.

The reward model is the language model's Transformer with `scalar_head=True`: one
D×1 projection of the final hidden states gives a scalar per position, and a
sequence's score is that scalar at its last real token (the only position that has
read the whole sequence under causal attention).

Training is Bradley-Terry (Christiano et al. 2017; Ouyang et al. 2022): for a pair
where `chosen` was preferred to `rejected`,

  P(chosen ≻ rejected) = σ(r(chosen) − r(rejected)),   loss = −log σ(r_c − r_r),

averaged over pairs. The loss only sees differences, so the scores' level is
arbitrary: `score_offset` (mean score on the training pairs) is saved with the model
by the caller and `normalized` subtracts it, so that downstream (PPO) rewards are
centred on 0.

Layout: every token array here is right-padded (real tokens first, pads after), with
lengths; segment id 1 marks real tokens, 0 padding; positions are 0..L-1; attention is
causal. Tokenising pairs (the chat template, end-of-turn tokens) is the caller's job:
score responses with the same template as the pairs were tokenised with.

A model from an SFT / pretraining checkpoint gets its head with `with_scalar_head`;
the same params (the trained reward model) usually initialise PPO's value model.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import evaluation
from research import model as model_lib
from research import train_step as train_lib


def with_scalar_head(params, cfg: model_lib.TransformerConfig, rng, std=None):
  """LM params + a freshly initialised scalar head -> (params, cfg with scalar_head=True).

  The head is normal with `std` (default 1/sqrt(d_model + 1), as in Ziegler et al.
  2019's reward head, which gives O(1) scores from the unit-RMS final hidden states);
  `std=0` is a zero head (every score 0 until trained). Existing params are kept as
  they are (the dict is copied, never modified); a head already present is replaced.
  """
  std = 1.0 / (cfg.d_model + 1) ** 0.5 if std is None else float(std)
  params = dict(params)
  params['scalar_head'] = std * jax.random.normal(rng, (cfg.d_model, 1), jnp.float32)
  return params, dataclasses.replace(cfg, scalar_head=True)


def sequence_scores(params, model: model_lib.Transformer, tokens_BxL, lengths_B):
  """Scores of right-padded sequences: the scalar head at each row's last real token.

  tokens_BxL: ids, pads after each row's `lengths_B` (>= 1) real tokens.
  Returns float32 B.
  """
  b, l = tokens_BxL.shape
  positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  segment_ids_BxL = (positions_BxL < lengths_B[:, None]).astype(jnp.int32)
  _, scalar_BxL = model.apply({'params': params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                              jnp.zeros((b, l), bool))
  if scalar_BxL is None:
    raise ValueError('sequence_scores needs a model with scalar_head=True (see with_scalar_head)')
  last_B = jnp.clip(lengths_B.astype(jnp.int32) - 1, 0, l - 1)
  return jnp.take_along_axis(scalar_BxL, last_B[:, None], axis=1)[:, 0]


def bradley_terry_loss(chosen_B, rejected_B):
  """Mean −log σ(r_c − r_r) -> (loss, metrics).

  metrics: accuracy (fraction of pairs with r_c > r_r, ties counting 1/2), margin
  (mean r_c − r_r), score_mean and score_std (over chosen and rejected together).
  """
  margin_B = chosen_B.astype(jnp.float32) - rejected_B.astype(jnp.float32)
  loss = -jnp.mean(jax.nn.log_sigmoid(margin_B))
  correct_B = jnp.where(margin_B > 0, 1.0, jnp.where(margin_B == 0, 0.5, 0.0))
  both = jnp.concatenate([chosen_B, rejected_B]).astype(jnp.float32)
  return loss, dict(loss=loss, accuracy=jnp.mean(correct_B), margin=jnp.mean(margin_B),
                    score_mean=jnp.mean(both), score_std=jnp.std(both))


def pair_scores(params, model, batch):
  """(chosen scores B, rejected scores B) of a pair batch, in one forward over 2B rows.

  batch: {chosen_tokens B×L, chosen_lengths B, rejected_tokens B×L', rejected_lengths B};
  the two sides may have different widths (the narrower one is padded).
  """
  chosen, rejected = batch['chosen_tokens'], batch['rejected_tokens']
  width = max(chosen.shape[1], rejected.shape[1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
  tokens = jnp.concatenate([pad(chosen), pad(rejected)])
  lengths = jnp.concatenate([batch['chosen_lengths'], batch['rejected_lengths']])
  scores = sequence_scores(params, model, tokens, lengths)
  b = chosen.shape[0]
  return scores[:b], scores[b:]


def make_reward_train_step(model, tx, schedule):
  """Pure step(state: train_step.TrainState, batch, rng) -> (state, metrics).

  batch: {chosen_tokens, chosen_lengths, rejected_tokens, rejected_lengths} (B×L, B):
  every leaf splits along its leading (pair) axis, so `train_step.jit_train_step(step,
  train_step.state_shardings(model, tx, mesh, B, L), mesh)` compiles it over a mesh.
  metrics: `bradley_terry_loss`'s, grad_norm, learning_rate.
  """

  def loss_fn(params, batch):
    chosen_B, rejected_B = pair_scores(params, model, batch)
    return bradley_terry_loss(chosen_B, rejected_B)

  def step(state: train_lib.TrainState, batch, rng):
    del rng  # deterministic: no dropout
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    return train_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def init_reward_state(params, tx) -> train_lib.TrainState:
  """A train state around given params (e.g. `with_scalar_head` of an SFT checkpoint).

  For a mesh, `jax.device_put` it onto `train_step.state_shardings(...)`.
  """
  return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params))


def score_offset(scores):
  """The offset saved with a reward model: its mean score on the training pairs."""
  return jnp.mean(jnp.asarray(scores, jnp.float32))


def normalized(score, offset):
  """Score with the saved offset removed (0 = an average training response)."""
  return score - offset


def pack_prompt_response(prompt_BxP, lengths_B, response_BxN, valid_BxN, pad_id=0):
  """Left-aligned prompts + responses -> right-padded prompt‖response rows B×(P+N), lengths.

  prompt_BxP: pads after each prompt's `lengths_B` tokens (as `sampling.generate` takes).
  response_BxN, valid_BxN: `sampling.Generation` tokens and mask (valid is a prefix of
  each row: the tokens up to and including eos).
  """
  b, p = prompt_BxP.shape
  n = response_BxN.shape[1]
  lengths_B = lengths_B.astype(jnp.int32)
  response_lengths_B = jnp.sum(valid_BxN, axis=1).astype(jnp.int32)
  idx_BxT = jnp.broadcast_to(jnp.arange(p + n, dtype=jnp.int32), (b, p + n))
  from_prompt = jnp.take_along_axis(prompt_BxP, jnp.clip(idx_BxT, 0, p - 1), axis=1)
  r_idx_BxT = idx_BxT - lengths_B[:, None]
  from_response = jnp.take_along_axis(response_BxN, jnp.clip(r_idx_BxT, 0, n - 1), axis=1)
  total_B = lengths_B + response_lengths_B
  tokens = jnp.where(idx_BxT < lengths_B[:, None], from_prompt,
                     jnp.where(idx_BxT < total_B[:, None], from_response, pad_id))
  return tokens.astype(jnp.int32), total_B


def score_rollout(params, model, prompt_BxP, lengths_B, response_BxN, valid_BxN, offset=0.0,
                  pad_id=0):
  """Normalised reward-model score of each prompt‖response (the PPO reward)."""
  tokens, total_B = pack_prompt_response(prompt_BxP, lengths_B, response_BxN, valid_BxN, pad_id)
  return normalized(sequence_scores(params, model, tokens, total_B), offset)


def make_reward_fn(model, pad_id: int = 0, stop_id: int | None = None, close: bool = True):
  """`reward_fn(prompt, lengths, response, valid, params, offset) -> score_B` for PPO:
  the reward model's normalised score of prompt ‖ response (the one reward function of
  the RLHF stage, its benchmark and the tests).

  With a `stop_id` and `close`, a response that did not end with the stop token is
  scored with one appended: the reward model always reads its score at a stop token, as
  on its training pairs (see `closed`). Pass the reward model's params and offset as the
  PPO iteration's `reward_args`, so they are arguments of the jitted program, not
  constants baked into it:

    reward_fn = reward_model.make_reward_fn(rm_model, pad_id, stop_id)
    iteration(state, prompts, lengths, reward_args=(rm_params, offset))
  """
  def reward_fn(prompt_BxP, lengths_B, response_BxN, valid_BxN, params: Any, offset=0.0):
    tokens_BxT, total_B = pack_prompt_response(prompt_BxP, lengths_B, response_BxN,
                                               valid_BxN, pad_id)
    if stop_id is not None and close:
      rows = jnp.arange(tokens_BxT.shape[0])
      tokens_BxT = jnp.pad(tokens_BxT, ((0, 0), (0, 1)), constant_values=pad_id)
      add_B = tokens_BxT[rows, total_B - 1] != stop_id
      tokens_BxT = tokens_BxT.at[rows, total_B].set(
          jnp.where(add_B, stop_id, tokens_BxT[rows, total_B]))
      total_B = total_B + add_B.astype(jnp.int32)
    return normalized(sequence_scores(params, model, tokens_BxT, total_B), offset)
  return reward_fn


def closed(prompt_ids, response_ids, stop_id: int, close: bool = True) -> list:
  """prompt ‖ response (‖ stop when the response does not end with it and `close`): the
  token list `make_reward_fn(..., stop_id=stop_id)` scores, for pairs built on the host."""
  seq = list(prompt_ids) + list(response_ids)
  if close and (not len(response_ids) or response_ids[-1] != stop_id):
    seq.append(stop_id)
  return seq


def score_pairs(score_fn, params, arrays: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores (float64 numpy) of every pair of `arrays` (preferences.ARRAY_KEYS), in
  fixed-size batches of `score_fn(params, batch) -> (chosen_B, rejected_B)`; the last
  batch is padded with pair 0 and the padding dropped."""
  n = len(arrays['chosen_lengths'])
  chosen, rejected = [], []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    idx = np.where(idx < n, idx, 0)
    c, r = jax.device_get(score_fn(params, {k: v[idx] for k, v in arrays.items()}))
    keep = min(batch_size, n - start)
    chosen.append(np.asarray(c[:keep], np.float64))
    rejected.append(np.asarray(r[:keep], np.float64))
  if not chosen:
    return np.zeros([0]), np.zeros([0])
  return np.concatenate(chosen), np.concatenate(rejected)


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict:
  """Accuracy (r_c > r_r) with its 95 % Wilson interval, ties, mean margin, Bradley-Terry
  loss, score mean/std of N pairs' scores (None values for N = 0)."""
  n = int(len(chosen))
  if n == 0:
    return dict(n=0, accuracy=None, interval=None, correct=0, ties=0, margin=None, loss=None,
                score_mean=None, score_std=None)
  margin = chosen - rejected
  correct = int(np.sum(margin > 0))
  both = np.concatenate([chosen, rejected])
  return dict(n=n, accuracy=correct / n, interval=list(evaluation.wilson_interval(correct, n)),
              correct=correct, ties=int(np.sum(margin == 0)), margin=float(np.mean(margin)),
              loss=float(np.mean(np.logaddexp(0.0, -margin))),
              score_mean=float(np.mean(both)), score_std=float(np.std(both)))


def longer_wins(arrays: dict) -> float | None:
  """Accuracy of "the longer sequence is preferred" (ties 1/2): a length-bias baseline."""
  if arrays is None or not len(arrays['chosen_lengths']):
    return None
  c, r = arrays['chosen_lengths'], arrays['rejected_lengths']
  return float(np.mean(np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0))))
