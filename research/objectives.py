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

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The token ids objectives need (from the tokenizer)."""
  pad: int
  mask: int
  vocab_size: int
  special: tuple[int, ...]  # never masked or used as a random replacement
  sentinels: tuple[int, ...]
  modes: tuple[int, ...] = ()  # UL2's [R], [S], [X] (spare sentinel slots, tokenizer.py)

  @classmethod
  def from_tokenizer(cls, tok) -> 'SpecialIds':
    return cls(pad=tok.pad_id, mask=tok.mask_id, vocab_size=tok.vocab_size,
               special=tuple(int(i) for i in np.flatnonzero(tok.is_special_mask(
                   np.arange(tok.vocab_size)))),
               sentinels=tuple(tok.sentinel_ids), modes=tuple(tok.ul2_mode_ids))


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


UL2_DENOISERS = ('R', 'S', 'X')


def _prefix_stream(tokens_BxM, seg_BxM, rng):
  """S-denoiser on a row read as one stream (as span corruption reads it): a uniform split
  k in [1, M − 1]; tokens before k are a bidirectional prefix, the rest predicted causally."""
  b, m = tokens_BxM.shape
  split_Bx1 = jnp.clip(jnp.floor(jax.random.uniform(rng, (b,)) * m).astype(jnp.int32),
                       1, m - 1)[:, None]
  idx_1xM = jnp.arange(m)[None, :]
  next_real = jnp.concatenate([seg_BxM[:, 1:] > 0, jnp.zeros((b, 1), bool)], axis=1)
  targets = jnp.concatenate([tokens_BxM[:, 1:], jnp.zeros_like(tokens_BxM[:, :1])], axis=1)
  weights = (idx_1xM >= split_Bx1 - 1) & (idx_1xM < m - 1) & next_real
  return dict(inputs=tokens_BxM, positions=jnp.broadcast_to(idx_1xM, (b, m)).astype(jnp.int32),
              segment_ids=(seg_BxM > 0).astype(jnp.int32),
              prefix=jnp.broadcast_to(idx_1xM < split_Bx1, (b, m)), targets=targets,
              weights=weights.astype(jnp.float32))


def ul2(batch, rng, ids: SpecialIds, mix_r=0.4, mix_s=0.2, mix_x=0.4, r_noise_rate=0.15,
        r_mean_span=3.0, x_noise_rate=0.5, x_mean_span=32.0):
  """UL2's mixture of denoisers (Tay et al. 2022, §3.1), decoder-only, one denoiser per row.

  Each row draws R, S or X with probabilities (mix_r, mix_s, mix_x) (normalised; three
  scalars so a config's JSON round trip compares equal on resume) and starts with that
  denoiser's mode token (§3.1.3, `ids.modes`), a bidirectional input token, then:
    R  regular span corruption (T5; `span_corruption` with r_noise_rate, r_mean_span);
    S  sequential denoising: prefix LM on the row read as one stream;
    X  extreme span corruption (x_noise_rate, x_mean_span: long spans or a high rate).
  The remaining L − 1 columns are the denoiser's output on the row's first L − 1 tokens
  (rows read as one stream, as `span_corruption` reads them), shifted right by one.
  Sentinels are `ids.sentinels` minus the mode ids. Returns the module's dict (B×L).
  Raises ValueError without 3 mode ids, for mixture weights that are negative or sum to
  0, or when a span denoiser needs more sentinels than there are.
  """
  if len(ids.modes) != 3:
    raise ValueError(f'ul2 needs the 3 mode ids [R], [S], [X], got {ids.modes}')
  mixture = np.asarray([mix_r, mix_s, mix_x], np.float64)
  if np.any(mixture < 0) or mixture.sum() <= 0:
    raise ValueError(f'ul2 mixture {tuple(mixture)}: expected 3 weights >= 0 (R, S, X)')
  tokens, seg = batch['tokens'], batch['segment_ids']
  b, l = tokens.shape
  r_mode, r_r, r_s, r_x = jax.random.split(rng, 4)
  span_ids = dataclasses.replace(ids, sentinels=tuple(s for s in ids.sentinels
                                                      if s not in ids.modes))
  stream = dict(tokens=tokens[:, :l - 1], segment_ids=seg[:, :l - 1],
                positions=batch['positions'][:, :l - 1])
  outs = (span_corruption(stream, r_r, span_ids, r_noise_rate, r_mean_span),
          _prefix_stream(stream['tokens'], stream['segment_ids'], r_s),
          span_corruption(stream, r_x, span_ids, x_noise_rate, x_mean_span))
  mode_B = jax.random.choice(r_mode, 3, (b,), p=jnp.asarray(mixture / mixture.sum(), F32))
  pick = lambda key: sum(jnp.where((mode_B == i).reshape((b,) + (1,) * (o[key].ndim - 1)),
                                   o[key], jnp.zeros_like(o[key]))
                         for i, o in enumerate(outs))
  ex = {k: pick(k).astype(outs[0][k].dtype) for k in outs[0]}
  mode_Bx1 = jnp.asarray(ids.modes, tokens.dtype)[mode_B][:, None]
  ones_Bx1 = jnp.ones((b, 1), jnp.int32)
  return dict(
      inputs=jnp.concatenate([mode_Bx1, ex['inputs']], axis=1),
      positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
      segment_ids=jnp.concatenate([ones_Bx1, ex['segment_ids'].astype(jnp.int32)], axis=1),
      prefix=jnp.concatenate([jnp.ones((b, 1), bool), ex['prefix'].astype(bool)], axis=1),
      # The mode token's output would predict the first input token: not scored.
      targets=jnp.concatenate([ex['inputs'][:, :1], ex['targets']], axis=1),
      weights=jnp.concatenate([jnp.zeros((b, 1), jnp.float32), ex['weights']], axis=1))


def supervised(batch, rng, ids: SpecialIds):
  """Fine-tuning on chosen tokens (SFT): next-token prediction scored only where the
  target token is marked in `batch['loss_mask']` (assistant turns, research/chat.py)."""
  example = causal(batch, rng, ids)
  mask = batch['loss_mask'] > 0
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return dict(example, weights=example['weights'] * next_mask.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Objective:
  """One objective and everything the rest of the code asks of it by name.

  fn: `fn(batch, rng, ids, **kwargs)` -> model inputs and targets (module docstring).
  keys: the config keys (`objective.<key>`) it takes, as keyword arguments of fn; a
    config's other keys are not passed to it.
  readout: 'next' (the output at i predicts token i+1) or 'inplace' (the output at a
    masked position predicts the token there): how evaluations read its predictions.
  attention: 'causal' if it never trains with bidirectional attention, else
    'bidirectional': how a whole-sequence reader (a classifier) attends natively.
  bidirectional_prompt: generation reads the prompt as a bidirectional prefix (as trained).
  bidirectional_fill: fills masks with bidirectional attention (trained on <mask> inputs
    read bidirectionally); otherwise from their left context.
  can_generate: it trains left-to-right continuation, so sampling text from it makes sense.
  """
  name: str
  fn: Callable
  keys: tuple[str, ...] = ()
  readout: str = 'next'
  attention: str = 'causal'
  bidirectional_prompt: bool = False
  bidirectional_fill: bool = False
  can_generate: bool = True

  def make(self, **kwargs) -> Callable:
    """-> fn(batch, rng, ids) with `kwargs` bound. Raises ValueError for a key it does not take."""
    unknown = sorted(set(kwargs) - set(self.keys))
    if unknown:
      raise ValueError(f'objective {self.name!r} takes {list(self.keys)}, not {unknown}')
    fn = self.fn
    return lambda batch, rng, ids: fn(batch, rng, ids, **kwargs)

  def from_config(self, objective_config) -> Callable:
    """-> fn(batch, rng, ids) with this objective's keys read from `objective_config`
    (a dict with 'name' and any keys); keys it does not take are ignored. A key it takes
    and the config lacks keeps the function's default."""
    return self.make(**{k: objective_config[k] for k in self.keys if k in objective_config})


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective('causal', causal),
    Objective('masked', masked, keys=('mask_rate',), readout='inplace',
              attention='bidirectional', bidirectional_fill=True, can_generate=False),
    Objective('prefix', prefix_lm, attention='bidirectional', bidirectional_prompt=True),
    Objective('span', span_corruption, keys=('noise_rate', 'mean_span'),
              attention='bidirectional', bidirectional_prompt=True),
    Objective('hybrid', hybrid, keys=('causal_fraction', 'mask_rate'),
              attention='bidirectional', bidirectional_fill=True),
    Objective('ul2', ul2, keys=('mix_r', 'mix_s', 'mix_x', 'r_noise_rate', 'r_mean_span', 'x_noise_rate',
                                'x_mean_span'),
              attention='bidirectional', bidirectional_prompt=True),
    Objective('supervised', supervised),
)}


def get(name: str) -> Objective:
  """The record of objective `name`. Raises ValueError for an unknown name."""
  if name not in OBJECTIVES:
    raise ValueError(f'objective {name!r}: expected one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def get_objective(name: str, **kwargs) -> Callable:
  """Objective by config name -> fn(batch, rng, ids). Raises ValueError for an unknown
  name or a keyword the objective does not take."""
  return get(name).make(**kwargs)


def from_config(objective_config) -> Callable:
  """fn(batch, rng, ids) of a config's `objective` section ({'name': ..., keys...})."""
  return get(objective_config['name']).from_config(objective_config)
