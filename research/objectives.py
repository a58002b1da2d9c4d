"""Pretraining objectives: one pure function each, one shared loss.

Every objective maps a packed token batch
  {'tokens', 'segment_ids', 'positions'}  (int32, B×L; segment 0 = padding)
and an rng to the model's inputs and what to score:
  {'inputs', 'positions', 'segment_ids', 'prefix', 'targets', 'weights'}
`prefix` (bool B×L) sets the attention pattern (see model.py): all False is causal,
all True bidirectional. `weights` (float32 B×L) is 1 where `targets` is scored. All
objectives share one loss (the fused `kernels.lm_head_loss` of the hidden states, in
`train_step.loss_sums`), so comparing objectives changes only this file.

Everything here runs under jit, on device, from the step's rng: corruption is
deterministic given (seed, step) and costs no host time.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The token ids objectives need (from the tokenizer)."""
  pad: int
  mask: int
  vocab_size: int
  special: tuple[int, ...]  # never masked or used as a random replacement
  sentinels: tuple[int, ...]

  @classmethod
  def from_tokenizer(cls, tok) -> 'SpecialIds':
    return cls(pad=tok.pad_id, mask=tok.mask_id, vocab_size=tok.vocab_size,
               special=tuple(int(i) for i in np.flatnonzero(tok.is_special_mask(
                   np.arange(tok.vocab_size)))),
               sentinels=tuple(tok.sentinel_ids))


def _next_token_targets(tokens_BxL, segment_ids_BxL):
  """Targets shifted left by one; weight 1 where the next token is in the same document."""
  targets = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
  next_seg = jnp.concatenate([segment_ids_BxL[:, 1:], jnp.zeros_like(segment_ids_BxL[:, :1])],
                             axis=1)
  weights = (segment_ids_BxL > 0) & (next_seg == segment_ids_BxL)
  return targets, weights


def _is_special(tokens, ids: SpecialIds):
  special = jnp.asarray(ids.special, dtype=tokens.dtype)
  return jnp.isin(tokens, special) | (tokens == ids.pad)


def causal(batch, rng, ids: SpecialIds):
  del rng, ids
  targets, weights = _next_token_targets(batch['tokens'], batch['segment_ids'])
  return dict(inputs=batch['tokens'], positions=batch['positions'],
              segment_ids=batch['segment_ids'], prefix=jnp.zeros_like(batch['tokens'], bool),
              targets=targets, weights=weights.astype(jnp.float32))


def bert_corrupt(tokens_BxL, segment_ids_BxL, rng, ids: SpecialIds, mask_rate):
  """BERT recipe: select `mask_rate` of ordinary tokens; 80% -> <mask>, 10% random, 10% kept.

  Returns (corrupted tokens, selected bool). Pad and special tokens are never selected,
  and random replacements are drawn from ordinary tokens only.
  """
  r_select, r_kind, r_random = jax.random.split(rng, 3)
  eligible = (segment_ids_BxL > 0) & ~_is_special(tokens_BxL, ids)
  selected = eligible & (jax.random.uniform(r_select, tokens_BxL.shape) < mask_rate)
  kind = jax.random.uniform(r_kind, tokens_BxL.shape)
  ordinary = np.setdiff1d(np.arange(ids.vocab_size), np.asarray(ids.special + (ids.pad,)))
  random_tokens = jnp.asarray(ordinary, tokens_BxL.dtype)[
      jax.random.randint(r_random, tokens_BxL.shape, 0, len(ordinary))]
  corrupted = jnp.where(selected & (kind < 0.8), ids.mask, tokens_BxL)
  corrupted = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, corrupted)
  return corrupted, selected


def masked(batch, rng, ids: SpecialIds, mask_rate=0.15):
  """Masked LM: predict the selected tokens in place, bidirectional attention."""
  corrupted, selected = bert_corrupt(batch['tokens'], batch['segment_ids'], rng, ids, mask_rate)
  return dict(inputs=corrupted, positions=batch['positions'], segment_ids=batch['segment_ids'],
              prefix=jnp.ones_like(batch['tokens'], bool), targets=batch['tokens'],
              weights=selected.astype(jnp.float32))


def _segment_lengths(segment_ids_BxL):
  """Length of each token's segment, per token (B×L)."""
  def one_row(seg_L):
    counts = jax.ops.segment_sum(jnp.ones_like(seg_L), seg_L, num_segments=seg_L.shape[0] + 1)
    return counts[seg_L]
  return jax.vmap(one_row)(segment_ids_BxL)


def prefix_lm(batch, rng, ids: SpecialIds):
  """Prefix LM: each document splits at a uniform random point; the part before it is
  seen bidirectionally and not scored, the rest is predicted causally."""
  del ids
  tokens, seg, pos = batch['tokens'], batch['segment_ids'], batch['positions']
  # One uniform draw per (row, segment id), looked up by each token's segment.
  u_BxL = jax.random.uniform(rng, tokens.shape)
  frac = jnp.take_along_axis(u_BxL, seg, axis=1)
  seg_len = _segment_lengths(seg)
  split = jnp.clip(jnp.floor(frac * seg_len).astype(jnp.int32), 1, jnp.maximum(seg_len - 1, 1))
  prefix = (pos < split) & (seg > 0)
  targets, weights = _next_token_targets(tokens, seg)
  weights = weights & (pos + 1 >= split)  # score only predictions of suffix tokens
  return dict(inputs=tokens, positions=pos, segment_ids=seg, prefix=prefix, targets=targets,
              weights=weights.astype(jnp.float32))


def span_lengths(length: int, noise_rate: float, mean_span: float) -> tuple[int, int, int]:
  """(source length, noise tokens, spans) so that corrupted input + targets fit `length`.

  Decoder-only span corruption turns `src` tokens into
  [src - noise + spans input tokens] + [noise + spans target tokens] = src + 2·spans.
  """
  src = length
  while True:
    noise = max(1, int(round(src * noise_rate)))
    spans = max(1, int(round(noise / mean_span)))
    if src + 2 * spans <= length:
      return src, noise, spans
    src -= 1


def _random_partition(rng, total, parts):
  """Random split of `total` items into `parts` non-empty runs -> run id per item (T5)."""
  first_of_run = jnp.arange(total - 1) < parts - 1
  first_of_run = jax.random.permutation(rng, first_of_run)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(first_of_run.astype(jnp.int32))])


def span_corruption(batch, rng, ids: SpecialIds, noise_rate=0.15, mean_span=3.0):
  """T5 span corruption in decoder-only form: [corrupted input | sentinel-delimited targets].

  Works on each row's first `src` tokens as one stream (T5 also concatenates
  documents before corrupting); the corrupted input is a bidirectional prefix and the
  targets after it are predicted causally. The row's last L - src tokens are not used.
  """
  tokens = batch['tokens']
  b, l = tokens.shape
  src, noise, spans = span_lengths(l, noise_rate, mean_span)
  if spans > len(ids.sentinels):
    raise ValueError(f'span corruption of length {l} needs {spans} sentinels, the tokenizer '
                     f'has {len(ids.sentinels)}')
  sentinels = jnp.asarray(ids.sentinels, tokens.dtype)

  def one_row(tokens_L, seg_L, rng):
    r_noise, r_keep = jax.random.split(rng)
    noise_run = _random_partition(r_noise, noise, spans)  # span index of each noise token
    keep_run = _random_partition(r_keep, src - noise, spans)
    # Interleave: keep-run 0, noise-run 0, keep-run 1, ... ; sort items by (run, kind).
    order_key = jnp.concatenate([2 * keep_run, 2 * noise_run + 1])
    is_noise_item = jnp.concatenate([jnp.zeros(src - noise, bool), jnp.ones(noise, bool)])
    is_noise = is_noise_item[jnp.argsort(order_key, stable=True)]
    span_id = jnp.cumsum(is_noise & ~jnp.concatenate([jnp.zeros(1, bool), is_noise[:-1]])) - 1
    starts = is_noise & ~jnp.concatenate([jnp.zeros(1, bool), is_noise[:-1]])
    x = tokens_L[:src]
    # Corrupted input: kept tokens, one sentinel per span (replacing its first token).
    in_tok = jnp.where(starts, sentinels[span_id], x)
    in_keep = ~is_noise | starts
    in_pos = jnp.cumsum(in_keep) - 1
    n_in = src - noise + spans
    # Targets: for each span, its sentinel then its tokens.
    tgt_keep = is_noise
    tgt_pos = n_in + jnp.cumsum(tgt_keep) - 1 + span_id + 1  # +span_id+1 leaves room for sentinels
    out = jnp.full((l,), ids.pad, tokens.dtype)
    out = out.at[jnp.where(in_keep, in_pos, l)].set(in_tok, mode='drop')
    out = out.at[jnp.where(tgt_keep, tgt_pos, l)].set(x, mode='drop')
    out = out.at[jnp.where(starts, tgt_pos - 1, l)].set(sentinels[span_id], mode='drop')
    n_total = src + 2 * spans
    idx = jnp.arange(l)
    seg = (idx < n_total).astype(jnp.int32)
    prefix = idx < n_in
    # Predict every target token: the output at position i predicts token i+1.
    weights = (idx >= n_in - 1) & (idx < n_total - 1)
    targets = jnp.concatenate([out[1:], jnp.full((1,), ids.pad, tokens.dtype)])
    del seg_L
    return out, seg, idx, prefix, targets, weights

  out, seg, pos, prefix, targets, weights = jax.vmap(one_row)(
      tokens, batch['segment_ids'], jax.random.split(rng, b))
  return dict(inputs=out, positions=pos.astype(jnp.int32), segment_ids=seg, prefix=prefix,
              targets=targets, weights=weights.astype(jnp.float32))


def hybrid(batch, rng, ids: SpecialIds, causal_fraction=0.5, mask_rate=0.15):
  """GPT-BERT hybrid (Charpentier & Samuel 2024): each row is either causal LM or masked
  next-token prediction (MNTP: BERT corruption, bidirectional attention, the masked
  token at i+1 predicted from position i, so both modes share the shifted output)."""
  r_mode, r_mask = jax.random.split(rng)
  tokens, seg = batch['tokens'], batch['segment_ids']
  b = tokens.shape[0]
  is_causal_B = jax.random.uniform(r_mode, (b,)) < causal_fraction
  corrupted, selected = bert_corrupt(tokens, seg, r_mask, ids, mask_rate)
  targets, next_ok = _next_token_targets(tokens, seg)
  selected_next = jnp.concatenate([selected[:, 1:], jnp.zeros_like(selected[:, :1])], axis=1)
  c = is_causal_B[:, None]
  return dict(inputs=jnp.where(c, tokens, corrupted), positions=batch['positions'],
              segment_ids=seg, prefix=jnp.broadcast_to(~c, tokens.shape) & (seg > 0),
              targets=targets,
              weights=jnp.where(c, next_ok, next_ok & selected_next).astype(jnp.float32))


def supervised(batch, rng, ids: SpecialIds):
  """Fine-tuning on chosen tokens (SFT): next-token prediction scored only where the
  target token is marked in `batch['loss_mask']` (assistant turns, research/chat.py)."""
  example = causal(batch, rng, ids)
  mask = batch['loss_mask'] > 0
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return dict(example, weights=example['weights'] * next_mask.astype(jnp.float32))


def get_objective(name: str, **kwargs) -> Callable:
  """Objective by config name -> fn(batch, rng, ids)."""
  fns = {'causal': causal, 'masked': masked, 'prefix': prefix_lm, 'span': span_corruption,
         'hybrid': hybrid, 'supervised': supervised}
  if name not in fns:
    raise ValueError(f'objective {name!r}: expected one of {sorted(fns)}')
  fn = fns[name]
  return lambda batch, rng, ids: fn(batch, rng, ids, **kwargs)
