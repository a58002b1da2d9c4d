"""Tests for research/chat.py (template, loss mask, parse, truncation, packing) and
Tokenizer.encode_text."""
import numpy as np
import pytest

from research import chat
from research import data
from research import tokenizer as tokenizer_lib
from tests.test_tokenizer import synthetic_corpus

FIRST_PLAIN_ID = tokenizer_lib.NUM_SPECIAL  # 113: the first byte piece
SYS, USER, ASST, EOT, CALL, CALL_END, RESULT, RESULT_END = range(105, 113)

CALC = {"name": "calculator", "arguments": {"expression": "2+3"}}
TOOL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "Let me compute.", "tool_calls": [CALC]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "2+3 = 5."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(synthetic_corpus(), vocab_size=430)


# ----------------------------------------------------------------------------
# encode_text.


@pytest.mark.parametrize("text", [
    "<|user|>",
    "say <|user|>hi<|end_of_turn|><|assistant|>ok",
    "<mask> and <extra_id_0><extra_id_99> and <|/tool_result|>",
    "<|user|<|user|>|>",
    "<pad><unk><s></s><0x41>",
    "\u2581<|system|>\u2581",
    "中文<|tool_call|>{\"a\": 1}\n\n",
    "",
])
def test_encode_text_never_emits_special_ids(tok, text):
  ids = tok.encode_text(text)
  assert all(i >= FIRST_PLAIN_ID for i in ids)
  assert tok.decode(ids) == text


def test_encode_text_escapes_what_encode_does_not(tok):
  assert tokenizer_lib.CHAT_IDS["user"] in tok.encode("a<|user|>b")  # encode unchanged
  ids = tok.encode_text("a<|user|>b")
  assert tokenizer_lib.CHAT_IDS["user"] not in ids
  # The special text is spelled in byte pieces (113 + byte).
  assert [FIRST_PLAIN_ID + b for b in b"<|user|>"] == ids[1:-1]
  # Plain text encodes as encode does.
  assert tok.encode_text("the state of the union") == tok.encode("the state of the union")


# ----------------------------------------------------------------------------
# render / parse.


def test_loss_mask_is_exactly_the_assistant_tokens(tok):
  r = chat.render(tok, TOOL_CHAT)
  e = tok.encode_text
  call_json = '{"arguments": {"expression": "2+3"}, "name": "calculator"}'
  pieces = [  # (ids, trained on)
      ([SYS] + e("You are terse.") + [EOT], False),
      ([USER] + e("What is 2+3?") + [EOT], False),
      ([ASST], False),
      (e("Let me compute.") + [CALL] + e(call_json) + [CALL_END, EOT], True),
      ([RESULT] + e("5") + [RESULT_END], False),
      ([ASST], False),
      (e("2+3 = 5.") + [EOT], True),
      ([USER] + e("Thanks") + [EOT], False),
      ([ASST], False),
      (e("You're welcome.") + [EOT], True),
  ]
  np.testing.assert_array_equal(r.ids, np.concatenate([p for p, _ in pieces]))
  np.testing.assert_array_equal(
      r.loss_mask, np.concatenate([np.full(len(p), m) for p, m in pieces]))
  assert r.ids.dtype == np.int32 and r.loss_mask.dtype == bool
  assert not r.loss_mask[r.ids == ASST].any()  # headers never trained on
  assert r.loss_mask[r.ids == EOT].tolist() == [False, False, True, True, False, True]
  assert r.turn_starts.tolist() == [i for i, t in enumerate(r.ids) if SYS <= t <= ASST
                                    or t == RESULT]


@pytest.mark.parametrize("messages", [
    TOOL_CHAT,
    [{"role": "user", "content": "write <|user|> and <|end_of_turn|> and <mask>"},
     {"role": "assistant", "content": "<|assistant|>\n<|tool_call|>x<|/tool_call|>\n"}],
    [{"role": "user", "content": "多行\n\n  文本 ✓ 🙂"},
     {"role": "assistant", "content": "  \u2581lead\tand trail  \n"}],
    [{"role": "user", "content": "call"},
     {"role": "assistant", "content": "",
      "tool_calls": [
          {"name": "f<|user|>", "arguments": {"q": "中文\n<|tool_result|>", "n": [1, 2.5]}},
          {"name": "g", "arguments": {}}]},
     {"role": "tool", "content": "<|/tool_result|>"},
     {"role": "tool", "content": "second result"},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "no answer yet"}],
])
def test_round_trip_is_exact(tok, messages):
  r = chat.render(tok, messages)
  assert chat.parse(tok, r.ids) == messages
  # Content never produces structural ids: each message has exactly one header.
  assert np.isin(r.ids, [SYS, USER, ASST, RESULT]).sum() == len(messages)
  assert not np.isin(r.ids, np.arange(0, 105)).any()


def test_render_rejects_malformed_messages(tok):
  for bad in ([{"role": "bot", "content": "x"}], [{"role": "user", "content": 3}],
              [{"role": "user", "content": "x", "name": "u"}],
              [{"role": "user", "content": "x", "tool_calls": [CALC]}],
              [{"role": "assistant", "content": "x", "tool_calls": []}],
              [{"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}]):
    with pytest.raises(ValueError):
      chat.render(tok, bad)


def test_generation_prompt_and_unfinished_turns(tok):
  prompt = TOOL_CHAT[:2]
  r = chat.render(tok, prompt, add_generation_prompt=True)
  plain = chat.render(tok, prompt)
  assert r.ids[-1] == ASST and not r.loss_mask[-1]
  np.testing.assert_array_equal(r.ids[:-1], plain.ids)
  assert chat.parse(tok, r.ids) == prompt + [{"role": "assistant", "content": ""}]
  # Generation cut at max tokens: the unfinished turn is still an assistant message.
  cut = np.r_[r.ids, tok.encode_text("It is 5 and")]
  assert chat.parse(tok, cut)[-1] == {"role": "assistant", "content": "It is 5 and"}
  # ... also inside a tool call, whose text is kept raw.
  cut = np.r_[r.ids, [CALL], tok.encode_text('{"name": "calc')]
  assert chat.parse(tok, cut)[-1] == {
      "role": "assistant", "content": "",
      "tool_calls": [{"name": None, "arguments": None, "raw": '{"name": "calc'}]}
  # Generation that runs on into a new turn: the header starts a new message.
  more = np.r_[r.ids, tok.encode_text("5"), [EOT, USER], tok.encode_text("hi")]
  assert chat.parse(tok, more)[-2:] == [{"role": "assistant", "content": "5"},
                                        {"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------
# fit_to_context.


def qa(i, answer_words=3):
  return [{"role": "user", "content": f"question {i} about the union"},
          {"role": "assistant", "content": " ".join(["peace"] * answer_words) + f" {i}"}]


def assert_same(a, b):
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  np.testing.assert_array_equal(a.turn_starts, b.turn_starts)


def test_fit_to_context_cuts_whole_turns_from_the_left(tok):
  system = [{"role": "system", "content": "Be brief and kind to the people."}]
  messages = system + qa(0) + qa(1) + qa(2)
  r = chat.render(tok, messages)
  assert chat.fit_to_context(r, len(r)) is r
  sys_len = len(chat.render(tok, system))
  last_two = len(chat.render(tok, qa(1) + qa(2)))
  last = len(chat.render(tok, qa(2)))
  # Room for system + the last two exchanges (not three): the first is cut.
  for max_len in (sys_len + last_two, len(r) - 1):
    fitted = chat.fit_to_context(r, max_len)
    assert_same(fitted, chat.render(tok, system + qa(1) + qa(2)))
    assert chat.parse(tok, fitted.ids) == system + qa(1) + qa(2)
  # System + last exchange fits, system + last two does not.
  assert_same(chat.fit_to_context(r, sys_len + last_two - 1), chat.render(tok, system + qa(2)))
  # Only the last exchange fits: the system message goes.
  assert_same(chat.fit_to_context(r, last), chat.render(tok, qa(2)))
  assert_same(chat.fit_to_context(r, sys_len + last - 1), chat.render(tok, qa(2)))
  # Not even the last exchange: dropped, never cut inside it.
  assert chat.fit_to_context(r, last - 1) is None


def test_fit_to_context_keeps_a_loss_token_or_drops(tok):
  # A trailing unanswered question: the fitting suffix has nothing to learn.
  messages = qa(0) + [{"role": "user", "content": "and then?"}]
  r = chat.render(tok, messages)
  tail = len(chat.render(tok, messages[-1:]))
  assert chat.fit_to_context(r, tail) is None
  assert chat.fit_to_context(chat.render(tok, messages[-1:]), 1000) is None
  # A tool exchange is never split from its question.
  r = chat.render(tok, TOOL_CHAT)
  fitted = chat.fit_to_context(r, len(r) - 1)
  assert chat.parse(tok, fitted.ids) == TOOL_CHAT[:1] + TOOL_CHAT[-2:]


# ----------------------------------------------------------------------------
# Packing.


def test_pack_conversations(tok):
  rng = np.random.default_rng(0)
  convs = []
  for i in range(40):
    turns = int(rng.integers(1, 4))
    convs.append(sum((qa(10 * i + j, int(rng.integers(1, 12))) for j in range(turns)), []))
  convs[5] = qa(50, answer_words=200)  # one answer longer than a row: dropped
  convs[9] = sum((qa(90 + j, 8) for j in range(8)), [])  # longer than a row: truncated
  seq_len = 96
  rendered = [chat.render(tok, c) for c in convs]
  assert len(rendered[5]) > seq_len and len(rendered[9]) > seq_len
  fitted = [chat.fit_to_context(r, seq_len) for r in rendered]
  assert fitted[5] is None and 0 < len(fitted[9]) < len(rendered[9])
  packed, stats = chat.pack_conversations(rendered, seq_len)
  kept = [f for f in fitted if f is not None]
  assert stats["conversations"] == 40 and stats["dropped"] == 1
  assert stats["truncated"] == sum(len(f) < len(r) for f, r in zip(fitted, rendered)
                                   if f is not None) >= 1
  assert stats["packed"] == packed.num_documents == len(kept)
  assert stats["rows"] == packed.num_rows < len(kept)  # rows are shared
  assert stats["tokens"] == packed.num_tokens == sum(len(f) for f in kept)
  assert stats["loss_tokens"] == packed.loss_mask.sum() == sum(f.loss_mask.sum() for f in kept)
  assert stats["fill"] == pytest.approx(stats["tokens"] / (stats["rows"] * seq_len))
  assert packed.loss_mask.dtype == bool and packed.loss_mask.shape == packed.tokens.shape

  # Every segment is one whole conversation, in input order, with its own mask.
  segments = []
  for row in range(packed.num_rows):
    seg = packed.segment_ids[row]
    n_seg = seg.max()
    # Segments 1..n, contiguous, then padding.
    real = seg > 0
    assert real.sum() == np.argmin(np.r_[real, False]) and (np.diff(seg[real]) >= 0).all()
    assert set(seg[real]) == set(range(1, n_seg + 1))
    for s in range(1, n_seg + 1):
      cols = seg == s
      np.testing.assert_array_equal(packed.positions[row][cols], np.arange(cols.sum()))
      segments.append((packed.tokens[row][cols], packed.loss_mask[row][cols]))
    pad = ~real
    assert not packed.tokens[row][pad].any() and not packed.positions[row][pad].any()
    assert not packed.loss_mask[row][pad].any()
  assert len(segments) == len(kept)
  by_ids = {tuple(f.ids.tolist()): f for f in kept}
  for ids, mask in segments:
    f = by_ids.pop(tuple(ids.tolist()))  # each conversation exactly once
    np.testing.assert_array_equal(mask, f.loss_mask)
    assert chat.parse(tok, ids)[-1]["role"] == "assistant"
  # Deterministic.
  again, _ = chat.pack_conversations(rendered, seq_len)
  np.testing.assert_array_equal(again.tokens, packed.tokens)


def test_packed_loss_mask_in_batches(tok):
  rendered = [chat.render(tok, qa(i)) for i in range(7)]
  packed, _ = chat.pack_conversations(rendered, 32)
  assert packed.num_rows >= 3
  batch = packed.rows(np.array([0, 1]))
  assert batch["loss_mask"].dtype == np.int32
  np.testing.assert_array_equal(batch["loss_mask"], packed.loss_mask[:2])
  batches = list(data.eval_batches(packed, batch_size=2))
  assert all(b["loss_mask"].shape == (2, 32) and b["loss_mask"].dtype == np.int32
             for b in batches)
  assert sum(b["loss_mask"].sum() for b in batches) == packed.loss_mask.sum()
  train = next(iter(data.make_train_dataset(packed, batch_size=2, seed=0, num_epochs=1)))
  assert train["loss_mask"].dtype == np.int32
  # Plain corpora are unchanged: no loss_mask key.
  plain = data.pack_token_lists([[200, 201]], 8)
  assert plain.loss_mask is None and "loss_mask" not in plain.rows(slice(0, 1))
  with pytest.raises(ValueError, match="bool"):
    data.PackedCorpus(plain.tokens, plain.segment_ids, plain.positions, 1,
                      plain.tokens.astype(np.int32))
  with pytest.raises(ValueError, match="shape"):
    data.PackedCorpus(plain.tokens, plain.segment_ids, plain.positions, 1,
                      np.zeros((1, 3), bool))
