"""SentencePiece BPE tokenizer with a fixed table of reserved special tokens.

Every tokenizer this module trains or loads has these ids (checked after training
and on load, so a model file from elsewhere fails loudly instead of silently
shifting ids):

  id     piece                              use
  0      <pad>                              padding (segment 0 rows)
  1      <unk>                              never produced by `encode` (byte fallback)
  2      <s>                                bos
  3      </s>                               eos, appended to every packed document
  4      <mask>                             MLM mask token
  5-104  <extra_id_0> .. <extra_id_99>      span-corruption sentinels (100, as T5:
                                            T=1024 span corruption needs ~50)
  105    <|system|>                         chat: system turn
  106    <|user|>                           chat: user turn
  107    <|assistant|>                      chat: assistant turn
  108    <|end_of_turn|>                    chat: end of any turn
  109    <|tool_call|>   110 <|/tool_call|>    a tool call (JSON) between them
  111    <|tool_result|> 112 <|/tool_result|>  a tool's answer between them

UL2's mode tokens [R], [S], [X] (Tay et al. 2022) reuse the last three sentinel slots,
<extra_id_97> (R), <extra_id_98> (S), <extra_id_99> (X): a new id after 112 would shift
the byte-fallback pieces (and every learned piece) of every tokenizer trained so far,
and `_check_special_ids` would then refuse them all. Span corruption takes sentinels
from <extra_id_0> up and never needs 97 at the lengths used here; the UL2 objective
uses only the other 97 as sentinels.

After the specials come the 256 byte-fallback pieces <0x00>..<0xFF> (ids 113-368),
then the learned BPE pieces.

Ids 4-112 are SentencePiece `user_defined_symbols`: the encoder matches their
literal text anywhere, so a user-written "<|user|>" inside plain text encodes to
id 106. That is what makes chat transcripts round-trip, and it means untrusted
text must be escaped by the chat template if it may contain these strings:
`encode_text` does that, spelling every literal occurrence of a user-defined
piece in its byte-fallback pieces (id 113 + byte), so it never emits an id below
113 and `decode(encode_text(text)) == text`.
Text entering the system (`TEXT POLICY`, applied by every loader and entry point):
- Invalid Unicode is refused, never replaced: a lone surrogate ("\\ud83d", which JSON
  allows and UTF-8 cannot encode; also what Python makes of undecodable bytes in a
  command-line argument) has no UTF-8 spelling and no token. `text_problem(value)`
  finds it in a string or anywhere in a decoded JSON record; loaders raise their
  one-line error naming the file and line (or the flag) with its text. Files are
  decoded as strict UTF-8 (undecodable bytes are an error naming the byte offset).
- Special-token text in data is text: corpora, pretraining documents and `sample`
  prompts are encoded with `encode_text` / `encode_text_batch`, so a literal
  "<mask>" or "<extra_id_0>" in a document cannot become the masked or span
  objectives' own ids, nor "<|user|>" a chat header. Only code that builds
  structure on purpose (the chat template around content, fill-mask's "<mask>",
  the Hugging Face tokenizer mirror) uses `encode`, which matches them.

Ids 0-3 are control symbols: `encode` never emits them and `decode` drops them
(decodes them to ""), so `decode(encode(text)) == text` for every text and a
packed row decodes without "</s>" noise.

Training uses the identity normalisation with no whitespace collapsing and no
dummy prefix, and byte fallback, so the round trip is exact for newlines, runs of
spaces, tabs and any Unicode. The character U+2581 ("▁"), SentencePiece's own
space marker, would decode to a space: `encode` writes it as its three UTF-8
byte pieces instead, which decode back to "▁".
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

# The one table of reserved tokens, piece -> fixed id, in id order.
_CONTROL = ("<pad>", "<unk>", "<s>", "</s>")
_MASK = "<mask>"
_SENTINELS = tuple(f"<extra_id_{i}>" for i in range(100))
_CHAT = (
    ("system", "<|system|>"),
    ("user", "<|user|>"),
    ("assistant", "<|assistant|>"),
    ("end_of_turn", "<|end_of_turn|>"),
    ("tool_call", "<|tool_call|>"),
    ("tool_call_end", "<|/tool_call|>"),
    ("tool_result", "<|tool_result|>"),
    ("tool_result_end", "<|/tool_result|>"),
)
_USER_DEFINED = (_MASK,) + _SENTINELS + tuple(piece for _, piece in _CHAT)
SPECIAL_TOKENS: dict[str, int] = {
    piece: i for i, piece in enumerate(_CONTROL + _USER_DEFINED)
}

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_ID = SPECIAL_TOKENS[_MASK]
SENTINEL_IDS: tuple[int, ...] = tuple(SPECIAL_TOKENS[s] for s in _SENTINELS)
CHAT_IDS: dict[str, int] = {name: SPECIAL_TOKENS[p] for name, p in _CHAT}
# UL2 mode tokens: spare sentinel slots (see the module docstring), in R, S, X order.
UL2_MODE_IDS: tuple[int, ...] = tuple(
    SPECIAL_TOKENS[f"<extra_id_{i}>"] for i in (97, 98, 99))
# All reserved ids are 0 .. NUM_SPECIAL - 1.
NUM_SPECIAL = len(SPECIAL_TOKENS)
_NUM_BYTES = 256
_SPACE_MARK = "\u2581"
# The user-defined pieces (ids 4-112) as text; none is a prefix of another.
_USER_DEFINED_RE = re.compile("|".join(re.escape(p) for p in _USER_DEFINED))
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def text_problem(value: Any) -> str | None:
  """None if `value` holds only valid Unicode text, else one line saying what is wrong.

  `value` is a string or a decoded JSON value (dicts, keys included, and lists are
  searched; numbers, booleans and None are fine). Invalid means a lone surrogate
  code point (U+D800..U+DFFF): valid in a JSON string escape ("\\ud83d" without its
  pair), produced by Python for undecodable bytes in argv, but not encodable as
  UTF-8 and so not text the tokenizer can read. The line names the code point, its
  character offset and a few characters before it, e.g.
  "invalid Unicode: lone surrogate U+D83D at character 5 (after 'hello'); ...".
  """
  if isinstance(value, str):
    m = None if value.isascii() else _SURROGATE_RE.search(value)
    if m is None:
      return None
    before = value[max(0, m.start() - 20):m.start()]
    before = _SURROGATE_RE.sub("?", before)
    return (f"invalid Unicode: lone surrogate U+{ord(m.group()):04X} at character "
            f"{m.start()} (after {before!r}); text must be valid UTF-8 (a JSON "
            "\\uD8xx escape needs its \\uDCxx pair)")
  if isinstance(value, dict):
    for k, v in value.items():
      problem = text_problem(k) or text_problem(v)
      if problem:
        return problem
  elif isinstance(value, (list, tuple)):
    for v in value:
      problem = text_problem(v)
      if problem:
        return problem
  return None


class TextError(ValueError):
  """Text that is not valid Unicode (see `text_problem`); the message is one line."""


def check_text(value: Any, where: str) -> None:
  """Raises TextError("{where}: invalid Unicode: ...") when `text_problem(value)`."""
  problem = text_problem(value)
  if problem:
    raise TextError(f"{where}: {problem}")


class Tokenizer:
  """A trained SentencePiece model (its serialized proto) plus the special ids."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    _check_special_ids(self._sp)
    self._mark_ids = [
        self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()
    ]

  # Pickle by proto so the tokenizer can cross process boundaries.
  def __reduce__(self):
    return (Tokenizer, (self._proto,))

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no bos/eos added."""
    return self.encode_batch([text], num_threads=1)[0]

  def encode_text(self, text: str) -> list[int]:
    """Token ids of `text` read as plain text: never a special id (all ids >= 113).

    Like `encode`, except that literal special-token text ("<|user|>", "<mask>",
    "<extra_id_0>", ...) is spelled in byte-fallback pieces instead of becoming
    its reserved id, so user content cannot forge chat structure. Text between
    such strings is encoded by `encode`. `decode` gives `text` back exactly.
    """
    check_text(text, "encode_text")
    ids: list[int] = []
    start = 0
    for m in _USER_DEFINED_RE.finditer(text):
      if m.start() > start:
        ids += self.encode(text[start:m.start()])
      ids += [NUM_SPECIAL + b for b in m.group().encode("utf-8")]
      start = m.end()
    if start < len(text):
      ids += self.encode(text[start:])
    return ids

  def encode_text_batch(
      self, texts: Sequence[str], num_threads: int = -1
  ) -> list[list[int]]:
    """`encode_text` of many texts: texts without special-token text go through
    `encode_batch` in C++ threads (-1: all cores), the others one by one.
    Raises TextError ("text I: invalid Unicode: ...") as `encode_batch`."""
    texts = list(texts)
    plain = [i for i, t in enumerate(texts) if not _USER_DEFINED_RE.search(t)]
    out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
    for i, text in enumerate(texts):
      check_text(text, f"text {i}")  # here, to number the text in `texts`
    for i, ids in zip(plain, self.encode_batch([texts[i] for i in plain], num_threads)):
      out[i] = ids
    for i, text in enumerate(texts):
      if out[i] is None:
        out[i] = self.encode_text(text)
    return out

  def encode_batch(
      self, texts: Sequence[str], num_threads: int = -1
  ) -> list[list[int]]:
    """`encode` of many texts, in C++ threads (-1: all cores).

    Raises TextError "text I: invalid Unicode: ..." for a text that is not valid
    Unicode (see `text_problem`; loaders check first, to name the file and line).
    """
    texts = list(texts)
    try:
      out = self._sp.encode(texts, num_threads=num_threads)
    except (TypeError, UnicodeError):
      for i, text in enumerate(texts):
        check_text(text, f"text {i}")
      raise
    for i, text in enumerate(texts):
      if _SPACE_MARK in text:
        out[i] = self._encode_with_marks(text)
    return out

  def _encode_with_marks(self, text: str) -> list[int]:
    # SentencePiece would read a literal "▁" as a space: spell it in bytes.
    first, *rest = self._sp.encode(text.split(_SPACE_MARK))
    for part in rest:
      first += self._mark_ids + part
    return first

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; pad/bos/eos decode to "", other specials to their pieces."""
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def fingerprint(self) -> str:
    """First 16 hex digits of the sha256 of the model proto."""
    return hashlib.sha256(self._proto).hexdigest()[:16]

  pad_id = property(lambda self: PAD_ID)
  unk_id = property(lambda self: UNK_ID)
  bos_id = property(lambda self: BOS_ID)
  eos_id = property(lambda self: EOS_ID)
  mask_id = property(lambda self: MASK_ID)
  sentinel_ids = property(lambda self: list(SENTINEL_IDS))
  chat_ids = property(lambda self: dict(CHAT_IDS))
  ul2_mode_ids = property(lambda self: tuple(UL2_MODE_IDS))

  def is_special_mask(self, ids: np.ndarray) -> np.ndarray:
    """Boolean array, True where `ids` is a reserved special id (never MLM-masked)."""
    return is_special(ids)

  def to_bytes(self) -> bytes:
    return self._proto

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> Tokenizer:
    return cls(model_proto)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model proto to `path` atomically (tmp file, then os.replace)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(self._proto)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    with open(path, "rb") as f:
      return cls(f.read())


def is_special(ids: np.ndarray) -> np.ndarray:
  """True where `ids` is one of the reserved ids 0 .. NUM_SPECIAL - 1."""
  ids = np.asarray(ids)
  return (ids >= 0) & (ids < NUM_SPECIAL)


def training_sentences(
    texts: Iterable[str],
    max_training_chars: int,
    max_sentence_chars: int = 2048,
    seed: int = 0,
) -> list[str]:
  """Lines of `texts` cut to `max_sentence_chars`, a seeded sample within budget.

  SentencePiece reads one sentence per line, so texts are split at newlines
  (newlines themselves are learned nowhere: they encode by byte fallback). The
  sample is drawn uniformly over the whole corpus, not its first megabytes, so
  a chronological corpus keeps all its eras.
  """
  chunks = []
  for text in texts:
    for line in text.split("\n"):
      for start in range(0, len(line), max_sentence_chars):
        piece = line[start:start + max_sentence_chars]
        if piece.strip():
          chunks.append(piece)
  total = sum(len(c) for c in chunks)
  if total <= max_training_chars:
    return chunks
  order = np.random.default_rng(seed).permutation(len(chunks))
  lengths = np.array([len(chunks[i]) for i in order])
  keep = order[: int(np.searchsorted(np.cumsum(lengths), max_training_chars)) + 1]
  return [chunks[i] for i in np.sort(keep)]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    max_training_chars: int = 4_000_000,
    max_sentence_chars: int = 2048,
    seed: int = 0,
    num_threads: int | None = None,
) -> Tokenizer:
  """Trains a byte-fallback BPE SentencePiece model in memory.

  Args:
    texts: documents; read fully, then sampled to `max_training_chars`
      characters (4M chars of the 12 MB default corpus train in about a second).
    vocab_size: total size including the specials and 256 byte pieces.
    max_training_chars: character budget of the training sample.
    max_sentence_chars: longer lines are cut into windows of this many chars.
    seed: seed of the training sample.
    num_threads: trainer threads (default: all cores).

  Returns:
    The trained `Tokenizer`; its special ids are those of `SPECIAL_TOKENS`.
  """
  min_vocab = NUM_SPECIAL + _NUM_BYTES + 1
  if vocab_size < min_vocab:
    raise ValueError(f"vocab_size {vocab_size} < {min_vocab} (specials + bytes + 1)")
  sentences = training_sentences(texts, max_training_chars, max_sentence_chars, seed)
  for sentence in sentences:
    check_text(sentence, "train_tokenizer")
  if not sentences:
    raise ValueError("train_tokenizer: no non-empty text to train on")
  model = io.BytesIO()
  try:
    _train(sentences, model, vocab_size, max_sentence_chars, num_threads)
  except RuntimeError as e:
    # Keep SentencePiece's reason (e.g. the largest vocab this corpus allows),
    # not its source location.
    reason = str(e).split("] ", 1)[-1].replace("\n", " ")
    raise ValueError(f"train_tokenizer: {reason}") from None
  return Tokenizer(model.getvalue())


def _train(sentences, model, vocab_size, max_sentence_chars, num_threads):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      user_defined_symbols=list(_USER_DEFINED),
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      # Lets BPE learn indentation runs ("▁▁▁▁") for code-like text.
      allow_whitespace_only_pieces=True,
      # Bytes: a char is at most 4 UTF-8 bytes.
      max_sentence_length=4 * max_sentence_chars,
      num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2,
  )


def _check_special_ids(sp: spm.SentencePieceProcessor) -> None:
  for piece, i in SPECIAL_TOKENS.items():
    if sp.piece_to_id(piece) != i or sp.id_to_piece(i) != piece:
      raise ValueError(
          f"tokenizer model has {piece!r} at id {sp.piece_to_id(piece)}, expected {i}"
      )
  if not sp.id_to_piece(NUM_SPECIAL) == "<0x00>":
    raise ValueError(f"tokenizer model has no byte fallback pieces at id {NUM_SPECIAL}")


def load_or_train(
    paths: Iterable[str | os.PathLike | None],
    texts: Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    seed: int = 0,
) -> tuple[Tokenizer, bool]:
  """The first tokenizer file of `paths` that exists, else one trained on `texts()`.

  Returns (tokenizer, trained). Raises ValueError when the vocabulary size is not
  `vocab_size` (a file of another run) or cannot be trained (see `train_tokenizer`),
  TextError (a ValueError) when a text is not valid Unicode.
  """
  for path in paths:
    if path and os.path.exists(path):
      tokenizer = Tokenizer.load(path)
      if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{path} has vocab {tokenizer.vocab_size}, not tokenizer.vocab_size="
                         f"{vocab_size}")
      return tokenizer, False
  return train_tokenizer(texts(), vocab_size, seed=seed), True
