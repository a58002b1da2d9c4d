"""Downstream classification: the era of a State of the Union passage.

The task (`make_era_task`): each speech's year falls into one of C era bins whose
edges are year quantiles over all speeches (so the bins hold about as many speeches
each); passages are non-overlapping windows of L tokens; every class gets the same
number of passages (the smallest class's count, capped), drawn round-robin over the
class's speeches so a few long speeches do not dominate. Train passages come from the
pretraining train split and test passages from held-out speeches: disjoint speeches.

Two ways to use a pretrained model, with equal budgets (steps × batch):
  finetune      all weights + a linear head on mean-pooled final hidden states;
  linear_probe  the same head on frozen mean-pooled features.

Dimension letters as in model.py, plus N passages and C classes.
"""
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import model as model_lib
from research import train_step as train_lib

ATTENTIONS = ('causal', 'bidirectional')


@dataclasses.dataclass(frozen=True)
class EraTask:
  """Balanced era-classification passages; *_speech holds each passage's speech index."""
  edges: tuple[int, ...]  # C-1 year thresholds: class k is edges[k-1] <= year < edges[k]
  train_tokens: np.ndarray  # N×L int32
  train_labels: np.ndarray  # N int32
  train_speech: np.ndarray  # N int, index into the train speeches
  test_tokens: np.ndarray
  test_labels: np.ndarray
  test_speech: np.ndarray  # index into the test speeches

  @property
  def num_classes(self) -> int:
    return len(self.edges) + 1

  def class_names(self, first_year: int, last_year: int) -> list[str]:
    bounds = [first_year, *self.edges, last_year + 1]
    return [f'{bounds[k]}-{bounds[k + 1] - 1}' for k in range(self.num_classes)]


def era_edges(years: Sequence[int], num_bins: int) -> tuple[int, ...]:
  """Year thresholds splitting the speeches into `num_bins` bins of near-equal count."""
  years = np.sort(np.asarray(years))
  if num_bins < 2 or len(set(years.tolist())) < num_bins:
    raise ValueError(f'era bins: need at least {num_bins} distinct years, '
                     f'got {len(set(years.tolist()))}')
  cuts = [int(years[int(round(k * len(years) / num_bins))]) for k in range(1, num_bins)]
  if len(set(cuts)) != len(cuts):
    raise ValueError(f'era bins: quantile edges {cuts} are not distinct')
  return tuple(cuts)


def era_labels(years: Sequence[int], edges: Sequence[int]) -> np.ndarray:
  return np.searchsorted(np.asarray(edges), np.asarray(years), side='right').astype(np.int32)


def _windows(tokens: Sequence[int], length: int) -> list[np.ndarray]:
  tokens = np.asarray(tokens, np.int32)
  return [tokens[s:s + length] for s in range(0, len(tokens) - length + 1, length)]


def balanced_passages(token_lists: Sequence[Sequence[int]], labels: Sequence[int],
                      num_classes: int, length: int, per_class: int, seed: int):
  """Exactly `per_class` windows per class (fewer when a class runs out: then all
  classes get the smallest class's count). -> (tokens N×L, labels N, speech N)."""
  rng = np.random.default_rng(seed)
  pools = []
  for k in range(num_classes):
    speeches = [i for i, y in enumerate(labels) if y == k]
    rng.shuffle(speeches)
    per_speech = []
    for i in speeches:
      w = _windows(token_lists[i], length)
      order = rng.permutation(len(w))
      per_speech.append([(i, w[j]) for j in order])
    # Round-robin over speeches: the r-th window of every speech before any (r+1)-th.
    pool = [ws[r] for r in range(max((len(ws) for ws in per_speech), default=0))
            for ws in per_speech if r < len(ws)]
    pools.append(pool)
  n = min(per_class, min(len(p) for p in pools))
  if n == 0:
    raise ValueError(f'era task: a class has no passage of {length} tokens')
  tokens, out_labels, speech = [], [], []
  for k, pool in enumerate(pools):
    for i, w in pool[:n]:
      tokens.append(w)
      out_labels.append(k)
      speech.append(i)
  return (np.stack(tokens).astype(np.int32), np.asarray(out_labels, np.int32),
          np.asarray(speech))


def make_era_task(train_tokens: Sequence[Sequence[int]], train_years: Sequence[int],
                  test_tokens: Sequence[Sequence[int]], test_years: Sequence[int], *,
                  num_bins: int, length: int, train_per_class: int, test_per_class: int,
                  seed: int = 0) -> EraTask:
  """The era task from tokenized train speeches and (disjoint) held-out test speeches."""
  edges = era_edges(list(train_years) + list(test_years), num_bins)
  tr = balanced_passages(train_tokens, era_labels(train_years, edges), num_bins, length,
                         train_per_class, seed)
  te = balanced_passages(test_tokens, era_labels(test_years, edges), num_bins, length,
                         test_per_class, seed + 1)
  return EraTask(edges, *tr, *te)


def majority_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
  """Test accuracy of always predicting the most frequent train class."""
  majority = np.bincount(train_labels).argmax()
  return float(np.mean(np.asarray(test_labels) == majority))


# ----------------------------------------------------------------------------
# Models on pooled features.


def _rows(tokens_BxL):
  b, l = tokens_BxL.shape
  return (jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
          jnp.ones((b, l), jnp.int32))


def pooled_features(params, cfg, tokens_BxL, attention: str):
  """Mean over positions of the final hidden states (B×D)."""
  if attention not in ATTENTIONS:
    raise ValueError(f'attention {attention!r}: expected one of {ATTENTIONS}')
  positions_BxL, segment_ids_BxL = _rows(tokens_BxL)
  prefix_BxL = jnp.full(tokens_BxL.shape, attention == 'bidirectional', bool)
  hidden_BxLxD, _ = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxL, positions_BxL, segment_ids_BxL, prefix_BxL)
  return jnp.mean(hidden_BxLxD, axis=1)


def init_head(d_model: int, num_classes: int) -> dict:
  return dict(w=jnp.zeros((d_model, num_classes), jnp.float32),
              b=jnp.zeros((num_classes,), jnp.float32))


def _head_logits(head, features_BxD):
  return features_BxD @ head['w'] + head['b']


def _optimizer(learning_rate: float, steps: int, weight_decay: float):
  # The shared schedule (research/train_step.py): step 0 already has a nonzero rate.
  schedule = train_lib.make_schedule(train_lib.OptimizerConfig(
      learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
      total_steps=max(steps, 2), final_lr_fraction=0.1))
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))


def _xent(logits_BxC, labels_B):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B))


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """steps×batch indices: a fresh seeded permutation of the N passages each epoch."""
  rng = np.random.default_rng(seed)
  per_epoch = max(1, n // batch_size)
  epochs = -(-steps // per_epoch)
  order = np.concatenate([rng.permutation(n)[:per_epoch * batch_size] for _ in range(epochs)])
  return order[:steps * batch_size].reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=('cfg', 'attention', 'lr', 'steps', 'wd'),
                   donate_argnums=(0, 1))
def _finetune_step(weights, opt_state, tokens_BxL, labels_B, *, cfg, attention, lr, steps, wd):
  def loss_fn(w):
    return _xent(_head_logits(w['head'], pooled_features(w['params'], cfg, tokens_BxL,
                                                         attention)), labels_B)
  loss, grads = jax.value_and_grad(loss_fn)(weights)
  updates, opt_state = _optimizer(lr, steps, wd).update(grads, opt_state, weights)
  return optax.apply_updates(weights, updates), opt_state, loss


def _batched(fn, x_NxL, batch_size):
  n = len(x_NxL)
  out = []
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size) % n  # fixed batch shape: one compile
    out.append(np.asarray(fn(x_NxL[idx]))[:min(batch_size, n - s)])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=('cfg', 'attention'))
def _features(params, tokens_BxL, *, cfg, attention):
  return pooled_features(params, cfg, tokens_BxL, attention)


def finetune(params, cfg, task: EraTask, *, steps: int, batch_size: int, learning_rate: float,
             attention: str, seed: int, weight_decay: float = 0.01) -> float:
  """Test accuracy after full fine-tuning (all weights + head)."""
  weights = dict(params=jax.tree.map(jnp.array, params),
                 head=init_head(cfg.d_model, task.num_classes))
  opt_state = _optimizer(learning_rate, steps, weight_decay).init(weights)
  for idx in _batch_indices(len(task.train_labels), batch_size, steps, seed):
    weights, opt_state, _ = _finetune_step(
        weights, opt_state, task.train_tokens[idx], task.train_labels[idx], cfg=cfg,
        attention=attention, lr=learning_rate, steps=steps, wd=weight_decay)
  feats = lambda x: _features(weights['params'], x, cfg=cfg, attention=attention)
  logits_NxC = _head_logits(weights['head'], _batched(feats, task.test_tokens, batch_size))
  return float(np.mean(np.argmax(logits_NxC, -1) == task.test_labels))


@functools.partial(jax.jit, static_argnames=('lr', 'steps', 'wd'), donate_argnums=(0, 1))
def _probe_step(head, opt_state, features_BxD, labels_B, *, lr, steps, wd):
  loss, grads = jax.value_and_grad(lambda h: _xent(_head_logits(h, features_BxD), labels_B))(head)
  updates, opt_state = _optimizer(lr, steps, wd).update(grads, opt_state, head)
  return optax.apply_updates(head, updates), opt_state, loss


def linear_probe(params, cfg, task: EraTask, *, steps: int, batch_size: int,
                 learning_rate: float, attention: str, seed: int,
                 weight_decay: float = 0.01) -> float:
  """Test accuracy of a linear head trained on frozen pooled features."""
  feats = lambda x: _features(params, x, cfg=cfg, attention=attention)
  train_NxD = _batched(feats, task.train_tokens, batch_size)
  test_NxD = _batched(feats, task.test_tokens, batch_size)
  # Standardised with train statistics: the probe's step size then means the same
  # thing for every arm, whatever the scale of its features.
  mean_D, std_D = train_NxD.mean(0), train_NxD.std(0) + 1e-6
  train_NxD, test_NxD = (train_NxD - mean_D) / std_D, (test_NxD - mean_D) / std_D
  head = init_head(cfg.d_model, task.num_classes)
  opt_state = _optimizer(learning_rate, steps, weight_decay).init(head)
  for idx in _batch_indices(len(task.train_labels), batch_size, steps, seed):
    head, opt_state, _ = _probe_step(head, opt_state, train_NxD[idx], task.train_labels[idx],
                                     lr=learning_rate, steps=steps, wd=weight_decay)
  pred_N = np.asarray(jnp.argmax(_head_logits(head, test_NxD), -1))
  return float(np.mean(pred_N == task.test_labels))
