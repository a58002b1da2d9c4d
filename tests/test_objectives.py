"""Each objective's inputs, targets and weights; the BERT recipe's statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import objectives

V = 1000
IDS = objectives.SpecialIds(pad=0, mask=4, vocab_size=V, special=tuple(range(1, 40)),
                            sentinels=tuple(range(5, 40)))


def _packed_batch(b=8, l=64, seed=0):
  """Rows of several documents, each ending in eos (3), and padding at the end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(40, V, (b, l)).astype(np.int32)
  seg = np.zeros((b, l), np.int32)
  pos = np.zeros((b, l), np.int32)
  for r in range(b):
    i, s = 0, 1
    while i < l - 4:
      n = min(int(rng.integers(5, 30)), l - 4 - i)
      seg[r, i:i + n], pos[r, i:i + n] = s, np.arange(n)
      tokens[r, i + n - 1] = 3
      i, s = i + n, s + 1
  tokens[seg == 0] = 0
  return dict(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
              positions=jnp.asarray(pos))


def test_causal_targets_are_next_token_in_same_document():
  batch = _packed_batch()
  ex = objectives.causal(batch, jax.random.key(0), IDS)
  t, s, w = map(np.asarray, (batch['tokens'], batch['segment_ids'], ex['weights']))
  assert not np.asarray(ex['prefix']).any()
  for r in range(t.shape[0]):
    for i in range(t.shape[1] - 1):
      same = s[r, i] > 0 and s[r, i + 1] == s[r, i]
      assert w[r, i] == float(same)
      if same:
        assert ex['targets'][r, i] == t[r, i + 1]
  assert w[:, -1].sum() == 0


def test_masked_lm_follows_bert_recipe():
  batch = _packed_batch(b=64, l=256)
  ex = objectives.masked(batch, jax.random.key(1), IDS, mask_rate=0.15)
  tokens, inputs = np.asarray(batch['tokens']), np.asarray(ex['inputs'])
  sel = np.asarray(ex['weights']) > 0
  eligible = (np.asarray(batch['segment_ids']) > 0) & (tokens > 39)
  assert np.asarray(ex['prefix'])[eligible].all()  # bidirectional
  assert not sel[~eligible].any()  # never pad or special tokens
  np.testing.assert_array_equal(inputs[~sel], tokens[~sel])
  np.testing.assert_array_equal(np.asarray(ex['targets'])[sel], tokens[sel])
  rate = sel.sum() / eligible.sum()
  assert abs(rate - 0.15) < 0.01, rate
  masked = (inputs[sel] == IDS.mask).mean()
  kept = (inputs[sel] == tokens[sel]).mean()
  replaced = 1 - masked - kept
  assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(replaced - 0.1) < 0.03
  assert (inputs[sel & (inputs != IDS.mask)] > 39).all()  # replacements are ordinary tokens


def test_prefix_lm_scores_only_the_suffix_of_each_document():
  batch = _packed_batch()
  ex = objectives.prefix_lm(batch, jax.random.key(2), IDS)
  seg, pos = np.asarray(batch['segment_ids']), np.asarray(batch['positions'])
  prefix, w = np.asarray(ex['prefix']), np.asarray(ex['weights'])
  for r in range(seg.shape[0]):
    for s in set(seg[r]) - {0}:
      idx = np.flatnonzero(seg[r] == s)
      p = prefix[r, idx]
      k = p.sum()
      assert 1 <= k < len(idx)
      assert p[:k].all() and not p[k:].any()  # a leading run
      # Scored: predictions of tokens k .. n-1, made at positions k-1 .. n-2.
      np.testing.assert_array_equal(np.flatnonzero(w[r, idx]), np.arange(k - 1, len(idx) - 1))


def test_span_corruption_reconstructs_the_source():
  batch = _packed_batch(b=4, l=128)
  ex = objectives.span_corruption(batch, jax.random.key(3), IDS)
  src, noise, spans = objectives.span_lengths(128, 0.15, 3.0)
  sentinels = set(IDS.sentinels)
  for r in range(4):
    out = np.asarray(ex['inputs'][r])
    n_in = src - noise + spans
    inp, tgt = out[:n_in], out[n_in:src + 2 * spans]
    assert np.asarray(ex['prefix'][r]).sum() == n_in
    assert sum(t in sentinels for t in inp) == spans == sum(t in sentinels for t in tgt)
    # Replace each sentinel of the input by the span that follows it in the targets.
    pieces, cur = {}, None
    for t in tgt:
      if t in sentinels:
        cur = t
        pieces[cur] = []
      else:
        pieces[cur].append(t)
    rebuilt = [x for t in inp for x in (pieces[t] if t in sentinels else [t])]
    np.testing.assert_array_equal(rebuilt, np.asarray(batch['tokens'][r, :src]))
    w = np.asarray(ex['weights'][r])
    assert w.sum() == noise + spans and w[n_in - 1] == 1


def test_hybrid_mixes_causal_and_masked_rows():
  batch = _packed_batch(b=64)
  ex = objectives.hybrid(batch, jax.random.key(4), IDS, causal_fraction=0.25)
  bidirectional_rows = np.asarray(ex['prefix']).any(axis=1)
  assert 0.6 < bidirectional_rows.mean() < 0.9
  causal = objectives.causal(batch, None, IDS)
  rows = ~bidirectional_rows
  np.testing.assert_array_equal(np.asarray(ex['weights'])[rows], np.asarray(causal['weights'])[rows])
  # Masked rows score the next token only where that token was selected for corruption.
  w = np.asarray(ex['weights'])[bidirectional_rows]
  assert 0 < w.sum() < 0.3 * np.asarray(causal['weights'])[bidirectional_rows].sum()


def test_unknown_objective_is_a_clear_error():
  with pytest.raises(ValueError, match='objective'):
    objectives.get_objective('mlm')
