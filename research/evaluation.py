"""Evaluations of a pretrained model that are the same whatever its objective.

Every function takes params, the model config and numpy rows (int32 N×L `tokens`,
`segment_ids`, `positions`, as `data.PackedCorpus.rows`) and returns plain floats or
arrays. The jitted pieces are module-level with the config static, so one compile
serves every arm of a study.

  causal_loss            held-out next-token loss, causal attention (Wang et al. 2022)
  adapt_causal           a short causal-LM training budget from any checkpoint (MLM→CLM)
  cloze_accuracy         masked-token accuracy, bidirectional attention
  pseudo_log_likelihood  PLL-word-l2r (Kauf & Ivanova 2023)
  choice_accuracy        zero-shot multiple choice by (pseudo-)log-likelihood (PIQA)
  summarize / wilson_interval / paired_difference   seed statistics

A "readout" says which position's output predicts a token: 'inplace' (masked LM:
position i predicts token i) or 'next' (every other objective: position i-1 predicts
token i, the GPT-BERT MNTP convention for the hybrid). Each arm is read out the way
it was trained.

Dimension letters as in model.py: B batch, L length, D width, V vocabulary, N rows.
"""
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from research import model as model_lib
from research import objectives
from research import train_step as train_lib

READOUTS = ('inplace', 'next')


def _hidden(params, cfg, tokens_BxL, positions_BxL, segment_ids_BxL, bidirectional: bool):
  prefix_BxL = jnp.full(tokens_BxL.shape, bidirectional, bool)
  hidden_BxLxD, _ = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxL, positions_BxL, segment_ids_BxL, prefix_BxL)
  return hidden_BxLxD


def _log_probs_at(params, cfg, hidden_BxLxD, read_B, targets_B):
  """log p(target) from the output at position read_B of each row."""
  h_BxD = jnp.take_along_axis(hidden_BxLxD, read_B[:, None, None], axis=1)[:, 0]
  logits_BxV = model_lib.logits(params, h_BxD[:, None], cfg.compute_dtype)[:, 0]
  log_p_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  return jnp.take_along_axis(log_p_BxV, targets_B[:, None], axis=1)[:, 0]


def _check_readout(readout):
  if readout not in READOUTS:
    raise ValueError(f'readout {readout!r}: expected one of {READOUTS}')


# ----------------------------------------------------------------------------
# 1. Generation: causal next-token loss, before and after a causal adaptation.


@functools.partial(jax.jit, static_argnames=('cfg',))
def _causal_sums(params, batch, *, cfg):
  example = objectives.causal(batch, None, None)
  _, sums = train_lib.loss_sums(params, model_lib.Transformer(cfg), example, 0.0)
  return sums['loss_sum'], sums['tokens']


def causal_loss(params, cfg, batches: Iterable[dict]) -> float | None:
  """Mean next-token cross-entropy (nats/token) under causal attention; None when no
  token is scored (no batches), never 0.0."""
  total, count = 0.0, 0.0
  for batch in batches:
    loss, n = _causal_sums(params, batch, cfg=cfg)
    total, count = total + float(loss), count + float(n)
  return total / count if count else None


@functools.partial(jax.jit, static_argnames=('cfg', 'opt', 'z_loss'), donate_argnums=0)
def _adapt_step(state, batch, rng, *, cfg, opt, z_loss):
  tx, schedule = train_lib.make_optimizer(opt)
  step = train_lib.make_train_step(model_lib.Transformer(cfg), tx, schedule,
                                   objectives.get_objective('causal'), None, z_loss=z_loss)
  return step(state, batch, rng)


def adapt_causal(params, cfg, batches: Sequence[dict], opt: train_lib.OptimizerConfig,
                 z_loss: float = 0.0):
  """Params after len(batches) causal-LM steps with a fresh optimiser (Wang et al. 2022).

  Every arm gets the same batches and optimiser, so the budget is equal.
  """
  tx, _ = train_lib.make_optimizer(opt)
  params = jax.tree.map(jnp.array, params)  # a copy: the step donates its state
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  for batch in batches:
    state, _ = _adapt_step(state, batch, jax.random.key(0), cfg=cfg, opt=opt, z_loss=z_loss)
  return state.params


# ----------------------------------------------------------------------------
# 2. Cloze: masked-token accuracy and pseudo-log-likelihood.


@functools.partial(jax.jit, static_argnames=('cfg', 'ids', 'mask_rate'))
def _cloze_sums(params, batch, rng, read_next, *, cfg, ids, mask_rate):
  tokens, seg, pos = batch['tokens'], batch['segment_ids'], batch['positions']
  _, selected = objectives.bert_corrupt(tokens, seg, rng, ids, mask_rate)
  # A document's first token has no position before it to be read from by 'next':
  # never select it, so both readouts score the same tokens.
  selected = selected & (pos > 0)
  inputs = jnp.where(selected, ids.mask, tokens)  # evaluation masks all: no 80/10/10
  hidden_BxLxD = _hidden(params, cfg, inputs, pos, seg, bidirectional=True)
  pred_BxL = jnp.argmax(model_lib.logits(params, hidden_BxLxD, cfg.compute_dtype), axis=-1)
  # 'next': the output at i-1 predicts token i. A traced switch: one compile for both.
  shifted_BxL = jnp.concatenate([pred_BxL[:, :1], pred_BxL[:, :-1]], axis=1)
  correct = (jnp.where(read_next, shifted_BxL, pred_BxL) == tokens) & selected
  return jnp.sum(correct), jnp.sum(selected)


def cloze_accuracy(params, cfg, batches: Iterable[dict], ids: objectives.SpecialIds, *,
                   mask_rate: float = 0.15, readout: str = 'inplace', seed: int = 0) -> float:
  """Accuracy on `mask_rate` of tokens replaced by <mask>, bidirectional attention.

  The masked positions depend only on (seed, batch index), so every arm is scored
  on the same tokens.
  """
  _check_readout(readout)
  correct, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    c, n = _cloze_sums(params, batch, jax.random.fold_in(jax.random.key(seed), i),
                       readout == 'next', cfg=cfg, ids=ids, mask_rate=mask_rate)
    correct, count = correct + float(c), count + float(n)
  return correct / max(count, 1.0)


def word_starts(pieces: Sequence[str]) -> np.ndarray:
  """True where a sentencepiece piece begins a word.

  A word is a run of alphanumeric pieces with no space marker ('▁') inside;
  punctuation, byte pieces and specials are words of their own.
  """
  starts = np.zeros(len(pieces), bool)
  prev_alnum = False
  for i, piece in enumerate(pieces):
    body = piece.lstrip('\u2581')
    alnum = bool(body) and body[0].isalnum() and not piece.startswith('<')
    starts[i] = i == 0 or piece.startswith('\u2581') or not alnum or not prev_alnum
    prev_alnum = alnum and body[-1].isalnum()
  return starts


def pll_rows(tokens_L: np.ndarray, word_start_L: np.ndarray, score_L: np.ndarray,
             mask_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PLL-word-l2r inputs: one row per scored token t, with t and the later tokens of
  t's word masked (Kauf & Ivanova 2023), so a word's pieces are not given away.

  Returns (inputs N×L, target positions N, target tokens N).
  """
  tokens_L = np.asarray(tokens_L)
  word_L = np.cumsum(word_start_L) - 1
  t_N = np.flatnonzero(score_L)
  cols = np.arange(len(tokens_L))
  masked_NxL = (cols[None] >= t_N[:, None]) & (word_L[None] == word_L[t_N][:, None])
  inputs_NxL = np.where(masked_NxL, mask_id, tokens_L[None]).astype(np.int32)
  return inputs_NxL, t_N.astype(np.int32), tokens_L[t_N].astype(np.int32)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _pll_log_probs(params, inputs_BxL, segment_ids_BxL, read_B, targets_B, *, cfg):
  # read_B holds the position read for each row (the readout), so one compile serves both.
  positions_BxL = jnp.maximum(jnp.cumsum(segment_ids_BxL > 0, axis=1) - 1, 0)
  hidden_BxLxD = _hidden(params, cfg, inputs_BxL, positions_BxL, segment_ids_BxL, True)
  return _log_probs_at(params, cfg, hidden_BxLxD, read_B, targets_B)


def _pll_token_log_probs(params, cfg, rows, mask_id, readout, batch_size):
  """rows: list of (tokens_L, word_start_L, score_L, segment_L) -> log p per scored token
  (concatenated in row order) and the row index of each."""
  inputs, segs, reads, targets, owner = [], [], [], [], []
  for r, (tokens_L, starts_L, score_L, seg_L) in enumerate(rows):
    x_NxL, t_N, y_N = pll_rows(tokens_L, starts_L, score_L, mask_id)
    inputs.append(x_NxL)
    segs.append(np.broadcast_to(seg_L, x_NxL.shape))
    reads.append(t_N - (1 if readout == 'next' else 0))
    targets.append(y_N)
    owner.append(np.full(len(t_N), r))
  inputs_NxL, segs_NxL = np.concatenate(inputs), np.concatenate(segs).astype(np.int32)
  reads_N, targets_N = np.concatenate(reads).astype(np.int32), np.concatenate(targets)
  n = len(targets_N)
  out = np.zeros(n, np.float32)
  for s in range(0, n, batch_size):  # fixed-size chunks: one compile
    idx = np.arange(s, s + batch_size) % n
    lp = _pll_log_probs(params, inputs_NxL[idx], segs_NxL[idx], reads_N[idx], targets_N[idx],
                        cfg=cfg)
    k = min(batch_size, n - s)
    out[s:s + k] = np.asarray(lp)[:k]
  return out, np.concatenate(owner)


def pseudo_log_likelihood(params, cfg, tokens_NxL: np.ndarray, word_start_NxL: np.ndarray,
                          mask_id: int, *, readout: str = 'inplace',
                          batch_size: int = 64) -> float:
  """Mean PLL-word-l2r per token (nats, ≤ 0) of single-document rows.

  Tokens 1.. of each row are scored (token 0 has no position to be read from by the
  'next' readout), so both readouts score the same tokens.
  """
  _check_readout(readout)
  rows = []
  for tokens_L, starts_L in zip(tokens_NxL, word_start_NxL):
    score_L = np.arange(len(tokens_L)) > 0
    rows.append((tokens_L, starts_L, score_L, np.ones_like(tokens_L)))
  log_p, _ = _pll_token_log_probs(params, cfg, rows, mask_id, readout, batch_size)
  return float(np.mean(log_p))


# ----------------------------------------------------------------------------
# 4. Zero-shot multiple choice by log-likelihood.


def choice_rows(context: Sequence[int], choice: Sequence[int], max_len: int):
  """(tokens L, segment_ids L, score L) of context + choice, left-truncating the context.

  `score` marks the choice's tokens; the row is right-padded to max_len.
  """
  choice = [int(t) for t in choice][:max_len - 1]
  context = [int(t) for t in context]
  context = context[max(0, len(context) - (max_len - len(choice))):]
  ids = context + choice
  tokens_L = np.zeros(max_len, np.int32)
  tokens_L[:len(ids)] = ids
  seg_L = (np.arange(max_len) < len(ids)).astype(np.int32)
  score_L = (np.arange(max_len) >= len(context)) & (seg_L > 0)
  return tokens_L, seg_L, score_L


@functools.partial(jax.jit, static_argnames=('cfg',))
def _causal_token_log_probs(params, tokens_BxL, segment_ids_BxL, *, cfg):
  positions_BxL = jnp.maximum(jnp.cumsum(segment_ids_BxL > 0, axis=1) - 1, 0)
  hidden_BxLxD = _hidden(params, cfg, tokens_BxL, positions_BxL, segment_ids_BxL, False)
  log_p_BxLxV = jax.nn.log_softmax(model_lib.logits(params, hidden_BxLxD, cfg.compute_dtype))
  # log p(token i) read from position i-1; position 0 gets 0 (never scored).
  log_p_next = jnp.take_along_axis(log_p_BxLxV[:, :-1], tokens_BxL[:, 1:, None], axis=2)[..., 0]
  return jnp.concatenate([jnp.zeros_like(log_p_next[:, :1]), log_p_next], axis=1)


def choice_scores(params, cfg, rows, *, mode: str = 'causal', mask_id: int = 0,
                  word_start_fn=None, batch_size: int = 32) -> np.ndarray:
  """Summed log-likelihood of each row's scored tokens.

  rows: list of (tokens L, segment_ids L, score L), all the same L.
  mode 'causal': log p(choice | context) under causal attention, token by token.
  mode 'pll_inplace' / 'pll_next': PLL-word-l2r of the choice tokens given the context
  (masked arms); `word_start_fn(tokens_L) -> bool L` marks word starts.
  """
  if mode == 'causal':
    tokens_NxL = np.stack([r[0] for r in rows])
    seg_NxL = np.stack([r[1] for r in rows])
    score_NxL = np.stack([r[2] for r in rows])
    n = len(rows)
    out = np.zeros(n, np.float64)
    for s in range(0, n, batch_size):
      idx = np.arange(s, s + batch_size) % n
      lp_BxL = np.asarray(_causal_token_log_probs(params, tokens_NxL[idx], seg_NxL[idx],
                                                  cfg=cfg))
      k = min(batch_size, n - s)
      out[s:s + k] = (lp_BxL * score_NxL[idx])[:k].sum(axis=1)
    return out
  if mode not in ('pll_inplace', 'pll_next'):
    raise ValueError(f'mode {mode!r}: expected causal, pll_inplace or pll_next')
  readout = mode[len('pll_'):]
  pll = []
  for tokens_L, seg_L, score_L in rows:
    score_L = score_L & (np.arange(len(tokens_L)) > 0)
    pll.append((tokens_L, word_start_fn(tokens_L), score_L, seg_L))
  log_p, owner = _pll_token_log_probs(params, cfg, pll, mask_id, readout, batch_size)
  return np.bincount(owner, weights=log_p, minlength=len(rows))


def choice_accuracy(scores_NxC: np.ndarray, labels_N: np.ndarray) -> tuple[float, int]:
  """(accuracy, correct count) of picking the highest-scoring choice; ties count wrong."""
  scores_NxC = np.asarray(scores_NxC)
  best = np.argmax(scores_NxC, axis=1)
  unique = (scores_NxC == scores_NxC.max(axis=1, keepdims=True)).sum(axis=1) == 1
  correct = int(np.sum((best == np.asarray(labels_N)) & unique))
  return correct / max(len(labels_N), 1), correct


# ----------------------------------------------------------------------------
# Statistics over seeds.


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
  """mean, sample std and the Student-t interval of the mean over seeds."""
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  n = len(x)
  if n == 0:
    return dict(mean=float('nan'), std=float('nan'), lo=float('nan'), hi=float('nan'), n=0)
  mean = float(x.mean())
  if n == 1:
    return dict(mean=mean, std=float('nan'), lo=float('nan'), hi=float('nan'), n=1)
  std = float(x.std(ddof=1))
  half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / np.sqrt(n)
  return dict(mean=mean, std=std, lo=mean - half, hi=mean + half, n=n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
  """summarize(a - b) over paired seeds: the interval excludes 0 when the sign is clear."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'paired values differ in shape: {a.shape} vs {b.shape}')
  return summarize(a - b, confidence)


def accuracy_summary(correct: Sequence[bool]) -> dict:
  """{correct, total, accuracy, interval} of per-item results; on 0 items accuracy and
  interval are None (JSON null), never a 0.0 or NaN that reads like a measurement."""
  n, total = int(sum(bool(c) for c in correct)), len(correct)
  if not total:
    return dict(correct=0, total=0, accuracy=None, interval=None)
  return dict(correct=n, total=total, accuracy=n / total,
              interval=list(wilson_interval(n, total)))


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (accuracy on `total` items)."""
  if total <= 0:
    return float('nan'), float('nan')
  z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
  p = correct / total
  denom = 1 + z * z / total
  centre = (p + z * z / (2 * total)) / denom
  half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
  return float(centre - half), float(centre + half)


def make_heldout_loss_fn(model, objective, ids, z_loss: float = 0.0):
  """jitted (params, batch, rng) -> {'objective': (loss sum, tokens), 'causal': (...)}.

  Held-out loss sums of a batch of packed rows under the run's objective and under
  causal next-token prediction (z-loss excluded), for `heldout_losses`.
  """
  causal = objectives.get_objective('causal')

  @jax.jit
  def evaluate(params, batch, rng):
    out = {}
    for name, fn in (('objective', objective), ('causal', causal)):
      _, sums = train_lib.loss_sums(params, model, fn(batch, rng, ids), z_loss)
      out[name] = (sums['loss_sum'] - sums['z_loss_sum'], sums['tokens'])
    return out
  return evaluate


def heldout_losses(eval_fn, params, batches: Iterable[dict], max_batches: int = 0,
                   seed: int = 0) -> dict:
  """{'objective_loss', 'causal_loss'}: mean nats per scored token over `batches`
  (the first `max_batches`, 0 = all); batch i draws its corruption with key seed + i.
  Each is None when no token was scored (an empty validation split), never 0.0."""
  totals = {'objective': [0.0, 0.0], 'causal': [0.0, 0.0]}
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    for k, (loss, n) in eval_fn(params, batch, jax.random.key(seed + i)).items():
      totals[k][0] += float(loss)
      totals[k][1] += float(n)
  return {f'{k}_loss': loss / n if n else None for k, (loss, n) in totals.items()}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy (nats/token) of the token frequencies: the loss of a model that ignores
  context. A trained LM must end well below it."""
  p = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size).astype(np.float64)
  p = p[p > 0] / p.sum()
  return float(-(p * np.log(p)).sum())
