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


def _next_token_reference(tokens_L, seg_L):
  """(targets, weights) of next-token prediction in plain Python: position i predicts
  token i+1 when both are in the same (non-padding) document."""
  l = len(tokens_L)
  targets, weights = np.zeros(l, np.int64), np.zeros(l, bool)
  for i in range(l - 1):
    if seg_L[i] > 0 and seg_L[i + 1] == seg_L[i]:
      targets[i], weights[i] = tokens_L[i + 1], True
  return targets, weights


def _bert_reference(tokens, seg, key, mask_rate):
  """The BERT recipe redone in numpy from the same key's uniform draws:
  (corrupted tokens, selected) as `objectives.bert_corrupt` should give them."""
  r_select, r_kind, r_random = jax.random.split(key, 3)
  u_select = np.asarray(jax.random.uniform(r_select, tokens.shape))
  u_kind = np.asarray(jax.random.uniform(r_kind, tokens.shape))
  never = set(IDS.special) | {IDS.pad}
  ordinary = np.array([t for t in range(V) if t not in never])
  random_tokens = ordinary[np.asarray(jax.random.randint(r_random, tokens.shape, 0,
                                                         len(ordinary)))]
  corrupted, selected = tokens.copy(), np.zeros(tokens.shape, bool)
  for r, i in np.ndindex(*tokens.shape):
    if seg[r, i] == 0 or tokens[r, i] in never or not u_select[r, i] < mask_rate:
      continue
    selected[r, i] = True
    if u_kind[r, i] < 0.8:
      corrupted[r, i] = IDS.mask
    elif u_kind[r, i] < 0.9:
      corrupted[r, i] = random_tokens[r, i]
  return corrupted, selected


def _assert_scored(ex, r, want_targets, want_weights):
  """Row r scores exactly `want_weights`, with the wanted target at every scored position."""
  w = np.asarray(ex['weights'][r])
  np.testing.assert_array_equal(w, want_weights.astype(np.float32), err_msg=f'row {r}')
  np.testing.assert_array_equal(np.asarray(ex['targets'][r])[want_weights],
                                want_targets[want_weights], err_msg=f'row {r}')


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


def test_masked_lm_equals_numpy_reference_from_the_same_key():
  batch = _packed_batch(b=8, l=64, seed=5)
  key = jax.random.key(11)
  ex = objectives.masked(batch, key, IDS, mask_rate=0.3)
  tokens, seg = np.asarray(batch['tokens']), np.asarray(batch['segment_ids'])
  corrupted, selected = _bert_reference(tokens, seg, key, 0.3)
  assert selected.sum() > 20
  np.testing.assert_array_equal(np.asarray(ex['inputs']), corrupted)
  np.testing.assert_array_equal(np.asarray(ex['weights']), selected.astype(np.float32))
  # In place: the output at i predicts token i.
  np.testing.assert_array_equal(np.asarray(ex['targets'])[selected], tokens[selected])
  np.testing.assert_array_equal(np.asarray(ex['positions']), np.asarray(batch['positions']))
  np.testing.assert_array_equal(np.asarray(ex['segment_ids']), seg)


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


def test_prefix_lm_split_and_targets_equal_numpy_reference_from_the_same_key():
  batch = _packed_batch(seed=6)
  key = jax.random.key(12)
  ex = objectives.prefix_lm(batch, key, IDS)
  tokens, seg = np.asarray(batch['tokens']), np.asarray(batch['segment_ids'])
  pos = np.asarray(batch['positions'])
  u = np.asarray(jax.random.uniform(key, tokens.shape))  # document s of row r draws u[r, s]
  for r in range(tokens.shape[0]):
    want_prefix = np.zeros(tokens.shape[1], bool)
    targets, weights = _next_token_reference(tokens[r], seg[r])
    for s in set(seg[r]) - {0}:
      idx = np.flatnonzero(seg[r] == s)
      n = len(idx)
      split = int(np.clip(np.floor(u[r, s] * np.float32(n)), 1, max(n - 1, 1)))
      want_prefix[idx] = pos[r, idx] < split
      weights[idx] &= pos[r, idx] + 1 >= split  # only predictions of suffix tokens
    np.testing.assert_array_equal(np.asarray(ex['prefix'][r]), want_prefix, err_msg=f'row {r}')
    _assert_scored(ex, r, targets, weights)
  np.testing.assert_array_equal(np.asarray(ex['inputs']), tokens)


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


def _span_reference(tokens_L, key, l, noise_rate=0.15, mean_span=3.0):
  """T5 span corruption of one row in plain Python from the row's key: the sequence
  [kept tokens with one sentinel per span | each sentinel then its span], and the
  length of its input part."""
  src, noise, spans = objectives.span_lengths(l, noise_rate, mean_span)
  r_noise, r_keep = jax.random.split(key)

  def run_lengths(k, total):  # T5's random split into `spans` non-empty runs
    starts = np.asarray(jax.random.permutation(k, np.arange(total - 1) < spans - 1))
    run_of = np.concatenate([[0], np.cumsum(starts)])
    return [int(np.sum(run_of == s)) for s in range(spans)]

  noise_lengths, keep_lengths = run_lengths(r_noise, noise), run_lengths(r_keep, src - noise)
  x, i, inputs, targets = [int(t) for t in tokens_L[:src]], 0, [], []
  for s in range(spans):  # keep-run s, then noise-run s
    inputs += x[i:i + keep_lengths[s]]
    i += keep_lengths[s]
    inputs.append(IDS.sentinels[s])
    targets += [IDS.sentinels[s]] + x[i:i + noise_lengths[s]]
    i += noise_lengths[s]
  assert i == src
  return inputs + targets, len(inputs)


@pytest.mark.slow
def test_span_corruption_equals_numpy_reference_from_the_same_key():
  b, l = 4, 64
  batch = _packed_batch(b=b, l=l, seed=7)
  key = jax.random.key(13)
  ex = objectives.span_corruption(batch, key, IDS)
  row_keys = jax.random.split(key, b)
  for r in range(b):
    seq, n_in = _span_reference(np.asarray(batch['tokens'][r]), row_keys[r], l)
    n = len(seq)
    assert n <= l
    idx = np.arange(l)
    np.testing.assert_array_equal(np.asarray(ex['inputs'][r]), seq + [IDS.pad] * (l - n))
    np.testing.assert_array_equal(np.asarray(ex['prefix'][r]), idx < n_in)
    np.testing.assert_array_equal(np.asarray(ex['segment_ids'][r]), (idx < n).astype(int))
    np.testing.assert_array_equal(np.asarray(ex['positions'][r]), idx)
    # Scored: every target token, the first sentinel included, predicted from the
    # position before it: targets are the next input token.
    weights = (idx >= n_in - 1) & (idx < n - 1)
    targets = np.array(seq[1:] + [IDS.pad] * (l - n + 1))
    _assert_scored(ex, r, targets, weights)


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


def test_hybrid_equals_numpy_reference_from_the_same_key():
  batch = _packed_batch(b=16, seed=8)
  key = jax.random.key(14)
  ex = objectives.hybrid(batch, key, IDS, causal_fraction=0.5, mask_rate=0.3)
  tokens, seg = np.asarray(batch['tokens']), np.asarray(batch['segment_ids'])
  r_mode, r_mask = jax.random.split(key)
  is_causal = np.asarray(jax.random.uniform(r_mode, (16,))) < 0.5
  assert 0 < is_causal.sum() < 16
  corrupted, selected = _bert_reference(tokens, seg, r_mask, 0.3)
  for r in range(16):
    targets, weights = _next_token_reference(tokens[r], seg[r])
    if is_causal[r]:
      want_inputs, want_prefix = tokens[r], np.zeros_like(seg[r], bool)
    else:  # MNTP: position i predicts token i+1 when token i+1 was selected
      want_inputs, want_prefix = corrupted[r], seg[r] > 0
      weights &= np.concatenate([selected[r, 1:], [False]])
      assert weights.any()
    np.testing.assert_array_equal(np.asarray(ex['inputs'][r]), want_inputs, err_msg=f'row {r}')
    np.testing.assert_array_equal(np.asarray(ex['prefix'][r]), want_prefix, err_msg=f'row {r}')
    _assert_scored(ex, r, targets, weights)


def test_unknown_objective_is_a_clear_error():
  with pytest.raises(ValueError, match='objective'):
    objectives.get_objective('mlm')


def test_record_passes_only_the_keys_an_objective_takes():
  config = dict(name='masked', mask_rate=0.4, causal_fraction=0.5, noise_rate=0.15,
                mean_span=3.0)
  batch = _packed_batch(b=4, seed=2)
  got = objectives.from_config(config)(batch, jax.random.key(0), IDS)
  want = objectives.masked(batch, jax.random.key(0), IDS, mask_rate=0.4)
  np.testing.assert_array_equal(np.asarray(got['weights']), np.asarray(want['weights']))
  for name, record in objectives.OBJECTIVES.items():
    assert record.name == name and record.readout in ('next', 'inplace')
    assert record.attention in ('causal', 'bidirectional')
    objectives.from_config(dict(config, name=name))  # every other key is left out
  with pytest.raises(ValueError, match='takes'):
    objectives.get_objective('causal', mask_rate=0.15)


def test_no_experiment_compares_an_objective_name_with_a_literal():
  """What differs between objectives is read from their records, never `name == 'masked'`."""
  import ast
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
  found = []
  for path in sorted(root.glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Compare):
        for side in (node.left, *node.comparators):
          found += [f'{path.name}:{node.lineno}: {ast.unparse(node)}'
                    for c in ast.walk(side)
                    if isinstance(c, ast.Constant) and c.value in objectives.OBJECTIVES]
  assert found == []


UL2_IDS = objectives.SpecialIds(pad=0, mask=4, vocab_size=V, special=tuple(range(1, 40)),
                                sentinels=tuple(range(5, 40)), modes=(37, 38, 39))
UL2_ONLY = {'R': dict(mix_r=1.0, mix_s=0.0, mix_x=0.0), 'S': dict(mix_r=0.0, mix_s=1.0, mix_x=0.0),
            'X': dict(mix_r=0.0, mix_s=0.0, mix_x=1.0)}


def _stream_batch(b, l, seed=0):
  """Rows of distinct ordinary tokens (so a target token can be looked for in the input)."""
  rng = np.random.default_rng(seed)
  tokens = np.stack([rng.permutation(np.arange(100, V))[:l] for _ in range(b)]).astype(np.int32)
  return dict(tokens=jnp.asarray(tokens), segment_ids=jnp.ones((b, l), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)))


def _no_leak(ex, rows=None):
  """Every scored ordinary target is hidden from the position that predicts it: not in the
  bidirectional part, and (next-token readout) later than it."""
  inputs, prefix = np.asarray(ex['inputs']), np.asarray(ex['prefix'])
  targets, weights = np.asarray(ex['targets']), np.asarray(ex['weights'])
  for r in range(rows or inputs.shape[0]):
    seen = set(inputs[r][prefix[r]].tolist())
    for i in np.flatnonzero(weights[r]):
      if targets[r, i] >= 40:  # not a sentinel
        assert targets[r, i] not in seen, (r, i)
        assert targets[r, i] not in inputs[r, :i + 1], (r, i)


@pytest.mark.parametrize('mode', ['R', 'X'])
@pytest.mark.slow
def test_ul2_span_denoisers_are_span_corruption_after_their_mode_token(mode):
  """R and X: [mode | T5 span corruption of the row's first L − 1 tokens], hand-checked by
  rebuilding the source from the sentinels; X with long spans."""
  b, l = 4, 48
  batch = _stream_batch(b, l)
  rate, span = (0.15, 3.0) if mode == 'R' else (0.5, 8.0)
  ex = objectives.ul2(batch, jax.random.key(5), UL2_IDS, **UL2_ONLY[mode],
                      **{f'{mode.lower()}_noise_rate': rate, f'{mode.lower()}_mean_span': span})
  src, noise, spans = objectives.span_lengths(l - 1, rate, span)
  sentinels = set(range(5, 37))  # the mode ids are never sentinels
  for r in range(b):
    out = np.asarray(ex['inputs'][r])
    assert out[0] == UL2_IDS.modes['RSX'.index(mode)]
    n_in = 1 + src - noise + spans
    inp, tgt = out[1:n_in], out[n_in:1 + src + 2 * spans]
    assert sum(t in sentinels for t in inp) == spans == sum(t in sentinels for t in tgt)
    pieces, cur = {}, None
    for t in tgt:
      if t in sentinels:
        cur = t
        pieces[cur] = []
      else:
        pieces[cur].append(t)
    assert sum(len(p) for p in pieces.values()) == noise
    rebuilt = [x for t in inp for x in (pieces[t] if t in sentinels else [t])]
    np.testing.assert_array_equal(rebuilt, np.asarray(batch['tokens'][r, :src]))
    np.testing.assert_array_equal(np.asarray(ex['prefix'][r]), np.arange(l) < n_in)
    w = np.asarray(ex['weights'][r])
    assert w.sum() == noise + spans and w[n_in - 1] == 1 and w[0] == 0
    np.testing.assert_array_equal(np.asarray(ex['targets'][r])[w > 0], out[np.flatnonzero(w) + 1])
  _no_leak(ex)


@pytest.mark.slow
def test_ul2_s_denoiser_is_a_prefix_lm_after_its_mode_token():
  b, l = 6, 16
  batch = _stream_batch(b, l, seed=1)
  ex = objectives.ul2(batch, jax.random.key(6), UL2_IDS, **UL2_ONLY['S'])
  tokens = np.asarray(batch['tokens'])
  for r in range(b):
    np.testing.assert_array_equal(np.asarray(ex['inputs'][r]), [39 - 1] + list(tokens[r, :l - 1]))
    prefix = np.asarray(ex['prefix'][r])
    k = int(prefix.sum())  # mode token + the first k − 1 tokens are bidirectional
    assert 2 <= k <= l - 1 and prefix[:k].all() and not prefix[k:].any()
    # Scored: every suffix token (input index >= k), predicted from the index before it.
    w = np.asarray(ex['weights'][r])
    np.testing.assert_array_equal(w, (np.arange(l) >= k - 1) & (np.arange(l) < l - 1))
    np.testing.assert_array_equal(np.asarray(ex['targets'][r])[:l - 1],
                                  np.asarray(ex['inputs'][r])[1:])
  _no_leak(ex)


@pytest.mark.slow
def test_ul2_mixture_rates_hold_and_mode_tokens_match_the_denoiser():
  b, l = 1200, 24
  batch = _stream_batch(b, l, seed=2)
  ex = objectives.from_config(dict(name='ul2', mix_r=0.5, mix_s=0.2, mix_x=0.3,
                                   x_mean_span=8.0))(batch, jax.random.key(7), UL2_IDS)
  first = np.asarray(ex['inputs'][:, 0])
  assert set(first.tolist()) <= set(UL2_IDS.modes)
  share = [np.mean(first == m) for m in UL2_IDS.modes]
  np.testing.assert_allclose(share, [0.5, 0.2, 0.3], atol=0.05)  # ±4.5 sd at n = 1200
  inputs = np.asarray(ex['inputs'])
  has_sentinel = ((inputs[:, 1:] >= 5) & (inputs[:, 1:] < 37)).any(1)
  np.testing.assert_array_equal(has_sentinel, first != UL2_IDS.modes[1])  # S rows: none
  _no_leak(ex, rows=60)
  with pytest.raises(ValueError, match='mode'):
    objectives.ul2(batch, jax.random.key(0), IDS)
