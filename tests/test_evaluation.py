"""Every evaluation on a tiny random model against a brute-force recomputation (the
model's forward called directly, plain log-softmax, one row per scored token); the era
task's bins are balanced and its train/test passages come from disjoint speeches."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from research import classification
from research import data as data_lib
from research import evaluation
from research import model as model_lib
from research import objectives
from research import train_step as train_lib

V, L, B = 256, 24, 4
IDS = objectives.SpecialIds(pad=0, mask=4, vocab_size=V, special=tuple(range(1, 45)),
                            sentinels=tuple(range(5, 40)))
CFG = model_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, max_len=L)
PIECES = [f'<{i}>' for i in range(45)] + [('\u2581' if i % 3 == 0 else '') + f'w{i}'
                                           for i in range(45, V)]


@pytest.fixture(scope='module')
def params():
  z = np.zeros((1, L), np.int32)
  init = jax.jit(lambda r: model_lib.Transformer(CFG).init(r, z, z, z, z.astype(bool)))
  return nn.unbox(init(jax.random.key(0))['params'])


def _rows(n=B, seed=0):
  rng = np.random.default_rng(seed)
  token_lists = [list(rng.integers(45, V, int(rng.integers(10, 40)))) for _ in range(3 * n)]
  return data_lib.pack_token_lists(token_lists, L)


def _batches():
  return list(data_lib.eval_batches(_rows(), B, 0, 1))[:2]


def _word_starts(tokens):
  return evaluation.word_starts([PIECES[int(t)] for t in tokens])


_forward = jax.jit(lambda params, tokens, positions, segment_ids, prefix: model_lib.Transformer(
    CFG).apply({'params': params}, tokens, positions, segment_ids, prefix)[0])


def _log_probs(params, tokens_NxL, segment_ids_NxL, bidirectional, positions_NxL=None):
  """Plain log-softmax of the tied head over the model's forward (float64, N×L×V), run
  16 rows at a time (one compile). Positions count each row's real tokens from 0."""
  tokens_NxL, segment_ids_NxL = np.asarray(tokens_NxL), np.asarray(segment_ids_NxL)
  if positions_NxL is None:
    positions_NxL = np.maximum(np.cumsum(segment_ids_NxL > 0, axis=1) - 1, 0)
  n = len(tokens_NxL)
  out = []
  for s in range(0, n, 16):
    idx = np.arange(s, s + 16) % n
    hidden = _forward(params, tokens_NxL[idx], positions_NxL[idx], segment_ids_NxL[idx],
                      np.full(tokens_NxL[idx].shape, bidirectional))
    logits = np.einsum('nld,vd->nlv', np.asarray(hidden, np.float64),
                       np.asarray(params['embed'], np.float64))
    logits -= logits.max(-1, keepdims=True)
    out.append((logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[:min(16, n - s)])
  return np.concatenate(out)


def _pll_brute_force(params, tokens_L, segment_ids_L, starts_L, scored_L, readout):
  """PLL-word-l2r log-probs of the scored tokens, one masked copy of the row per token:
  the token and the later pieces of its word masked, read at t or t-1."""
  word_L = np.cumsum(starts_L) - 1
  rows, reads = [], []
  for t in np.flatnonzero(scored_L):
    row = np.array(tokens_L)
    row[(np.arange(len(row)) >= t) & (word_L == word_L[t])] = IDS.mask
    rows.append(row)
    reads.append(t - 1 if readout == 'next' else t)
  logp = _log_probs(params, np.stack(rows), np.broadcast_to(segment_ids_L, (len(rows),
                                                                           len(tokens_L))), True)
  return np.array([logp[k, at, tokens_L[t]]
                   for k, (at, t) in enumerate(zip(reads, np.flatnonzero(scored_L)))])


def test_causal_loss_before_and_after_adaptation_is_finite(params):
  embed = np.array(params['embed'])
  before = evaluation.causal_loss(params, CFG, _batches())
  assert np.isfinite(before) and abs(before - np.log(V)) < 0.5  # a random model: ~uniform
  opt = train_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4)
  adapted = evaluation.adapt_causal(params, CFG, _batches() * 2, opt)
  assert jax.tree.structure(adapted) == jax.tree.structure(params)
  after = evaluation.causal_loss(adapted, CFG, _batches())
  assert np.isfinite(after) and after < before  # trained on these very batches
  np.testing.assert_array_equal(np.asarray(params['embed']), embed)  # not donated away


def test_causal_loss_equals_brute_force(params):
  total, count = 0.0, 0
  for batch in _batches():
    tokens, seg = batch['tokens'], batch['segment_ids']
    logp = _log_probs(params, tokens, seg, False, batch['positions'])
    for r, i in np.ndindex(tokens.shape[0], tokens.shape[1] - 1):
      if seg[r, i] > 0 and seg[r, i + 1] == seg[r, i]:  # next token of the same document
        total, count = total - logp[r, i, tokens[r, i + 1]], count + 1
  assert count > 50
  np.testing.assert_allclose(evaluation.causal_loss(params, CFG, _batches()), total / count,
                             rtol=1e-5)


@pytest.mark.parametrize('readout', evaluation.READOUTS)
def test_cloze_accuracy_is_a_fraction(params, readout):
  acc = evaluation.cloze_accuracy(params, CFG, _batches(), IDS, mask_rate=0.3, readout=readout)
  assert 0.0 <= acc <= 1.0


def test_cloze_accuracy_equals_brute_force_for_each_readout(params):
  """A random model is right ~never; so the answers are planted: a masked token becomes
  the model's own in-place prediction (at two positions in three) or its prediction
  from the position before (the others). The masked inputs, hence every prediction, stay the same,
  so each readout must score exactly its own share. The special tokens' embeddings are
  shrunk: a random tied model otherwise predicts <mask> at a <mask>."""
  params = dict(params, embed=params['embed'].at[:45].multiply(0.01))
  planted, want = [], {'inplace': [0, 0], 'next': [0, 0]}
  for i, batch in enumerate(_batches()):
    tokens, seg, pos = (np.array(batch[k]) for k in ('tokens', 'segment_ids', 'positions'))
    key = jax.random.fold_in(jax.random.key(0), i)  # cloze_accuracy's seed 0, batch i
    _, selected = objectives.bert_corrupt(tokens, seg, key, IDS, 0.3)
    selected = np.asarray(selected) & (pos > 0)
    pred = _log_probs(params, np.where(selected, IDS.mask, tokens), seg, True, pos).argmax(-1)
    for r, t in zip(*np.nonzero(selected)):
      guess = pred[r, t] if t % 3 else pred[r, t - 1]
      if guess >= 45:  # an ordinary token: still selectable, so the same tokens are masked
        tokens[r, t] = guess
    for r, t in zip(*np.nonzero(selected)):
      for readout, at in (('inplace', t), ('next', t - 1)):
        want[readout][0] += int(pred[r, at] == tokens[r, t])
        want[readout][1] += 1
    planted.append(dict(batch, tokens=tokens))
  accuracy = {k: c / n for k, (c, n) in want.items()}
  assert accuracy['inplace'] > 0.5 and accuracy['next'] > 0.2, accuracy
  assert accuracy['inplace'] - accuracy['next'] > 0.1, accuracy
  for readout in evaluation.READOUTS:
    got = evaluation.cloze_accuracy(params, CFG, planted, IDS, mask_rate=0.3, readout=readout)
    assert got == pytest.approx(accuracy[readout], abs=1e-9), readout


def test_word_starts_and_pll_rows_mask_the_rest_of_the_word():
  pieces = ['The', '\u2581Con', 'gress', ',', '\u2581we', '<0x0A>', 'shall']
  np.testing.assert_array_equal(evaluation.word_starts(pieces),
                                [True, True, False, True, True, True, True])
  tokens = np.arange(50, 57)
  inputs, pos, targets = evaluation.pll_rows(tokens, evaluation.word_starts(pieces),
                                             np.ones(7, bool), mask_id=4)
  assert inputs.shape == (7, 7) and list(pos) == list(range(7)) and list(targets) == list(tokens)
  assert list(inputs[1]) == [50, 4, 4, 53, 54, 55, 56]  # 'Con' masks 'gress' too (l2r)
  assert list(inputs[2]) == [50, 51, 4, 53, 54, 55, 56]  # 'gress' sees 'Con'


@pytest.mark.parametrize('readout', evaluation.READOUTS)
def test_pseudo_log_likelihood_is_finite_and_negative(params, readout):
  tokens = np.random.default_rng(1).integers(45, V, (3, L)).astype(np.int32)
  starts = np.stack([_word_starts(t) for t in tokens])
  pll = evaluation.pseudo_log_likelihood(params, CFG, tokens, starts, IDS.mask, readout=readout,
                                         batch_size=16)
  assert np.isfinite(pll) and -np.log(V) - 1 < pll < 0
  # Brute force: every token but the first of each row, read at t or t-1.
  want = np.concatenate([_pll_brute_force(params, t, np.ones(L, np.int32), s,
                                          np.arange(L) > 0, readout)
                         for t, s in zip(tokens, starts)])
  np.testing.assert_allclose(pll, want.mean(), rtol=1e-5)


@pytest.mark.parametrize('mode', ['causal', 'pll_inplace', 'pll_next'])
def test_choice_scores_have_one_finite_score_per_row(params, mode):
  rng = np.random.default_rng(2)
  rows = [evaluation.choice_rows(rng.integers(45, V, 30), rng.integers(45, V, n), max_len=L)
          for n in (3, 5, 8, 2)]
  tokens, seg, score = rows[0]
  assert tokens.shape == seg.shape == score.shape == (L,)
  assert score.sum() == 3 and seg.sum() == L  # the context is left-truncated to fit
  short = evaluation.choice_rows([50, 51], [60], max_len=L)
  assert list(short[0][:4]) == [50, 51, 60, 0] and list(np.flatnonzero(short[2])) == [2]
  scores = evaluation.choice_scores(params, CFG, rows, mode=mode, mask_id=IDS.mask,
                                    word_start_fn=_word_starts, batch_size=3)
  assert scores.shape == (4,) and np.all(np.isfinite(scores)) and np.all(scores < 0)
  acc, correct = evaluation.choice_accuracy(scores.reshape(2, 2), np.array([0, 1]))
  assert 0 <= acc <= 1 and correct in (0, 1, 2)
  # Brute force: the summed log-probs of each row's scored (choice) tokens.
  want = []
  for tokens, seg, score in rows:
    if mode == 'causal':  # token i from position i-1, causal attention
      logp = _log_probs(params, tokens[None], seg[None], False)[0]
      want.append(sum(logp[i - 1, tokens[i]] for i in np.flatnonzero(score)))
    else:
      want.append(_pll_brute_force(params, tokens, seg, _word_starts(tokens),
                                   score & (np.arange(L) > 0), mode[len('pll_'):]).sum())
  np.testing.assert_allclose(scores, want, rtol=1e-5)


def test_choice_accuracy_picks_the_highest_score_and_ties_count_wrong():
  scores = np.array([[-3.0, -1.0], [-0.5, -2.0], [-1.0, -1.0], [-4.0, -0.1], [1.0, 2.0]])
  acc, correct = evaluation.choice_accuracy(scores, np.array([1, 0, 0, 0, 0]))
  assert (acc, correct) == (0.4, 2)
  three = evaluation.choice_accuracy(np.array([[0.1, 0.3, 0.2]]), np.array([1]))
  assert three == (1.0, 1)


def test_statistics():
  s = evaluation.summarize([1.0, 2.0, 3.0])
  assert s['mean'] == 2.0 and s['std'] == 1.0 and s['n'] == 3
  np.testing.assert_allclose(s['hi'] - s['mean'], 4.303 / np.sqrt(3), rtol=1e-3)
  assert evaluation.summarize([]).get('n') == 0
  d = evaluation.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.1])
  assert d['lo'] > 0
  lo, hi = evaluation.wilson_interval(50, 100)
  assert lo < 0.5 < hi and 0.39 < lo and hi < 0.61


def _speeches(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [data_lib.Document(f'speech {i}', {'year': 1790 + 6 * i, 'file': f'{i}.txt'})
          for i in range(n)], [list(rng.integers(45, V, int(rng.integers(40, 200))))
                               for _ in range(n)]


def test_era_bins_are_balanced_and_train_test_speeches_disjoint():
  docs, tokens = _speeches()
  train, test = data_lib.split_documents(docs, 0.3, seed=0)
  index = {d.meta['file']: i for i, d in enumerate(docs)}
  tr_idx, te_idx = [index[d.meta['file']] for d in train], [index[d.meta['file']] for d in test]
  task = classification.make_era_task(
      [tokens[i] for i in tr_idx], [docs[i].meta['year'] for i in tr_idx],
      [tokens[i] for i in te_idx], [docs[i].meta['year'] for i in te_idx],
      num_bins=4, length=16, train_per_class=12, test_per_class=5, seed=0)
  assert len(task.edges) == 3 and task.num_classes == 4
  # Balanced: every class has the same number of passages, in train and in test.
  assert np.all(np.bincount(task.train_labels, minlength=4) == 12)
  assert np.all(np.bincount(task.test_labels, minlength=4) == 5)
  # Disjoint: no speech gives passages to both sides.
  train_files = {train[i].meta['file'] for i in task.train_speech}
  test_files = {test[i].meta['file'] for i in task.test_speech}
  assert train_files and test_files and not train_files & test_files
  # Labels agree with the speech years, and each passage is a window of its speech.
  for k, i in enumerate(task.train_speech):
    assert task.train_labels[k] == classification.era_labels([train[i].meta['year']],
                                                             task.edges)[0]
    t = np.asarray(tokens[tr_idx[i]])
    w = task.train_tokens[k]
    assert any(np.array_equal(t[s:s + 16], w) for s in range(0, len(t) - 15, 16))
  assert classification.majority_accuracy(task.train_labels, task.test_labels) == 0.25


@pytest.mark.slow
def test_finetune_and_probe_return_accuracies(params):
  docs, tokens = _speeches(n=16)
  task = classification.make_era_task(tokens[::2], [d.meta['year'] for d in docs[::2]],
                                      tokens[1::2], [d.meta['year'] for d in docs[1::2]],
                                      num_bins=2, length=L, train_per_class=8, test_per_class=4)
  feats = classification.pooled_features(params, CFG, task.test_tokens, 'causal')
  assert feats.shape == (len(task.test_labels), CFG.d_model)
  kw = dict(steps=3, batch_size=4, seed=0)
  ft = classification.finetune(params, CFG, task, learning_rate=1e-3, attention='bidirectional',
                               **kw)
  probe = classification.linear_probe(params, CFG, task, learning_rate=1e-2, attention='causal',
                                      **kw)
  assert 0.0 <= ft <= 1.0 and 0.0 <= probe <= 1.0
