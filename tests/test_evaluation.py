"""Every evaluation on a tiny random model: finite numbers of the right shape; the era
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


def test_causal_loss_before_and_after_adaptation_is_finite(params):
  before = evaluation.causal_loss(params, CFG, _batches())
  assert np.isfinite(before) and abs(before - np.log(V)) < 0.5  # a random model: ~uniform
  opt = train_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4)
  adapted = evaluation.adapt_causal(params, CFG, _batches() * 2, opt)
  assert jax.tree.structure(adapted) == jax.tree.structure(params)
  after = evaluation.causal_loss(adapted, CFG, _batches())
  assert np.isfinite(after) and after < before  # trained on these very batches
  np.testing.assert_array_equal(params['embed'], params['embed'])  # input not donated away


@pytest.mark.parametrize('readout', evaluation.READOUTS)
def test_cloze_accuracy_is_a_fraction(params, readout):
  acc = evaluation.cloze_accuracy(params, CFG, _batches(), IDS, mask_rate=0.3, readout=readout)
  assert 0.0 <= acc <= 1.0


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
