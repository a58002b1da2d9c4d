"""Tokenized corpora on disk: shards written once, read lazily, mixed by weight.

A prepared source is one folder (written by `python -m experiments.prepare_data`):

  manifest.json           what the shards were made of (corpus files: size, mtime, hash
                          of a sample; tokenizer fingerprint; split seed) and what they
                          hold (per shard: documents, tokens, sizes, CRC32s)
  tokenizer.model         the tokenizer that made them
  shard-00000.tokens      the token ids of a group of corpus files, documents in corpus
                          order, each followed by eos: raw little-endian uint16 (vocab
                          <= 65536) or uint32, no header
  shard-00000.docs.npy    uint64 [num_docs, 2]: each document's end offset in the
                          .tokens file (tokens, eos included) and its split key
  shard-00000.counts.npy  int64 [vocab]: token frequencies (for the unigram entropy)

Why flat token arrays and not ArrayRecord: a packed row is a window of `seq_len`
tokens of the document stream (concat-then-split, research/data.py), so a row is one
or two reads of contiguous bytes at a known offset; there are no records to decode or
stitch across, and seq_len is chosen when training, not when preparing. Rows are read
with os.pread, not mmap, so a process's resident memory does not grow with the bytes
it has read. Grain still drives the pipeline (`data.make_train_dataset` over row
indices: seeded shuffle, host sharding, checkpointable state), exactly as in memory.

Equivalence with the in-memory path: for the same corpus, tokenizer, split seed and
validation fraction, `open_training_data(...).train.rows(i)` equals row i of
`data.pack_documents(tokenizer, train_docs, seq_len)` (same documents, same order, same
segment ids and positions), so the same seed gives the same batches in the same order.
The split ranks documents by the first 8 bytes of `data.split_key` (then by index), the
in-memory split by all 32: they differ only if two distinct keys share 8 bytes.

Integrity: opening checks each file's size against the manifest (a truncated shard)
and the small .npy files' CRC32s; each 1 MiB block of a .tokens file is checked against
its CRC32 the first time a read touches it, so a corrupted block fails on first use and
no corrupted token reaches a batch. Errors are `data.DataError`, one line naming the file.

Memory: O(documents) index arrays per source (about 40 bytes a document), independent
of the number of tokens. Limits: a corpus file is never split across shards, so one
huge file is one shard written by one worker (and a lone plain-text file is read whole
to be cut into chunks); a reader keeps one file descriptor per shard it has touched
(keep shards at tens of MB or more: --unit_mb).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import grain
import numpy as np

from research import data
from research import tokenizer as tokenizer_lib

FORMAT = "research.shards/1"
# How special-token text in documents is encoded (tokenizer.py's text policy): "text",
# byte pieces, never a reserved id. Manifests written before the policy lack the key;
# their shards are read only if they hold no reserved id (then they are identical).
SPECIAL_TEXT = "text"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
BLOCK_BYTES = 1 << 20  # CRC32 granularity of .tokens files
SAMPLE_BYTES = 1 << 16  # bytes hashed at each end of a corpus file
DEFAULT_UNIT_BYTES = 64 << 20  # corpus bytes per shard (a bigger file is one shard)
MIXTURE_PERIOD = 10_000  # mixture slots in one period of the sampling schedule
_SHARD_FILE = re.compile(r"shard-(\d{5})\.(tokens|docs\.npy|counts\.npy)$")
DataError = data.DataError


def shard_file(index: int, suffix: str) -> str:
  """File name of shard `index`: suffix 'tokens', 'docs.npy' or 'counts.npy'."""
  return f"shard-{index:05d}.{suffix}"


def token_dtype(vocab_size: int) -> np.dtype:
  """Little-endian uint16 when every id fits, else uint32."""
  return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


# ----------------------------------------------------------------------------
# Corpus description and the manifest.


def file_fingerprint(path: str | pathlib.Path, kind: str) -> dict:
  """{path, kind, size (bytes), mtime_ns, sample_sha256 (of the first and last 64 KiB)}."""
  path = pathlib.Path(path)
  try:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
      h.update(f.read(SAMPLE_BYTES))
      if st.st_size > SAMPLE_BYTES:
        f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
        h.update(f.read(SAMPLE_BYTES))
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  return dict(path=str(path), kind=kind, size=st.st_size, mtime_ns=st.st_mtime_ns,
              sample_sha256=h.hexdigest()[:32])


def describe_corpus(spec: str, text_field: str = "text", chunk_chars: int = 4096) -> dict:
  """The corpus a preparation reads: {spec, text_field, chunk_chars, files: [fingerprint]}.

  Parquet files are checked for the text column here (footer only), so a bad file
  fails before anything is written. Raises DataError naming the file.
  """
  files = []
  for path, kind in data.corpus_files(spec):
    if kind == data.KIND_PARQUET:
      data.check_parquet(path, text_field)
    files.append(file_fingerprint(path, kind))
  return dict(spec=spec, text_field=text_field, chunk_chars=chunk_chars, files=files)


def plan_units(files: Sequence[dict], unit_bytes: int) -> list[list[int]]:
  """Consecutive files grouped into units of about `unit_bytes` (one shard each)."""
  units, current, size = [], [], 0
  for i, f in enumerate(files):
    if current and size + f["size"] > unit_bytes:
      units.append(current)
      current, size = [], 0
    current.append(i)
    size += f["size"]
  return units + ([current] if current else [])


def new_manifest(corpus: dict, tokenizer: tokenizer_lib.Tokenizer, split_seed: int,
                 unit_bytes: int = DEFAULT_UNIT_BYTES) -> dict:
  """The manifest of a preparation not yet started (no shards, complete False)."""
  return dict(format=FORMAT, special_text=SPECIAL_TEXT,
              tokenizer=dict(fingerprint=tokenizer.fingerprint,
                             vocab_size=tokenizer.vocab_size),
              token_dtype=token_dtype(tokenizer.vocab_size).str, split_seed=split_seed,
              unit_bytes=unit_bytes, corpus=corpus,
              units=plan_units(corpus["files"], unit_bytes), shards=[], complete=False)


def manifest_conflict(old: dict, new: dict) -> str | None:
  """Why shards of manifest `old` cannot be continued as `new` (one line), or None."""
  for key in ("format", "special_text", "tokenizer", "token_dtype", "split_seed",
              "unit_bytes"):
    if old.get(key) != new.get(key):
      return f"made with {key} {old.get(key)}, not {new.get(key)}"
  a, b = old["corpus"], new["corpus"]
  for key in ("spec", "text_field", "chunk_chars"):
    if a.get(key) != b.get(key):
      return f"made from corpus {key} {a.get(key)!r}, not {b.get(key)!r}"
  before = {f["path"]: f for f in a["files"]}
  after = {f["path"]: f for f in b["files"]}
  for path in sorted(before.keys() | after.keys()):
    if path not in after:
      return f"corpus changed: {path} is gone"
    if path not in before:
      return f"corpus changed: {path} is new"
    for key in ("size", "mtime_ns", "sample_sha256"):
      if before[path][key] != after[path][key]:
        return f"corpus changed: {path} ({key} {before[path][key]} -> {after[path][key]})"
  return None


def read_manifest(folder: str | pathlib.Path) -> dict:
  """The manifest of a prepared folder. Raises DataError naming the file."""
  path = pathlib.Path(folder) / MANIFEST_FILE
  if not path.is_file():
    raise DataError(f"{folder}: no {MANIFEST_FILE} (not prepared shards: run "
                    "python -m experiments.prepare_data)")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise DataError(f"{path}: not a {FORMAT} manifest")
  return manifest


def write_manifest(folder: str | pathlib.Path, manifest: dict) -> None:
  """Writes manifest.json atomically (temporary file, then rename)."""
  path = pathlib.Path(folder) / MANIFEST_FILE
  tmp = path.with_name(f"{MANIFEST_FILE}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def manifest_fingerprint(manifest: dict) -> str:
  """16 hex digits identifying a preparation's content (tokenizer, seed, shards)."""
  content = {k: manifest[k] for k in ("tokenizer", "token_dtype", "split_seed", "shards")}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Writing.


class _CrcWriter:
  """Writes bytes to a file, keeping the CRC32 of every BLOCK_BYTES block."""

  def __init__(self, f):
    self.f, self.crcs, self.crc, self.fill = f, [], 0, 0

  def write(self, b: bytes) -> None:
    self.f.write(b)
    view = memoryview(b)
    while len(view):
      take = min(len(view), BLOCK_BYTES - self.fill)
      self.crc = zlib.crc32(view[:take], self.crc)
      self.fill += take
      view = view[take:]
      if self.fill == BLOCK_BYTES:
        self.crcs.append(self.crc)
        self.crc, self.fill = 0, 0

  def block_crcs(self) -> list[int]:
    return self.crcs + ([self.crc] if self.fill else [])


def file_crc32(path: str | pathlib.Path) -> int:
  """CRC32 of a whole file."""
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(BLOCK_BYTES):
      crc = zlib.crc32(chunk, crc)
  return crc


def unit_texts(corpus: dict, file_indices: Sequence[int]) -> Iterator[str]:
  """Texts of the documents of some corpus files (see `describe_corpus`), streamed."""
  for i in file_indices:
    f = corpus["files"][i]
    for doc in data.iter_file_documents(f["path"], f["kind"], corpus["text_field"],
                                        corpus["chunk_chars"]):
      yield doc.text


def write_shard(folder: str | pathlib.Path, index: int, texts: Iterable[str],
                tokenizer: tokenizer_lib.Tokenizer, split_seed: int, *,
                batch_chars: int = 1 << 20,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
  """Tokenizes `texts` (whitespace-only ones skipped) into shard `index` of `folder`.

  Each file is written to a temporary name and renamed when complete, so a killed
  writer leaves no file with a final name half-written. Tokenizes in this thread
  (run several processes for more). `on_progress(chars, tokens)` after each batch.
  Returns the manifest record: index, num_documents, num_tokens (eos included), num_chars,
  tokens_bytes, tokens_crc32 (one per 1 MiB block), docs_crc32, counts_crc32.
  Raises DataError (from reading the texts).
  """
  folder = pathlib.Path(folder)
  dtype = token_dtype(tokenizer.vocab_size)
  eos, suffix = tokenizer.eos_id, f".tmp{os.getpid()}"
  final = {s: folder / shard_file(index, s) for s in ("tokens", "docs.npy", "counts.npy")}
  tmp = {s: p.with_name(p.name + suffix) for s, p in final.items()}
  ends, keys = [], []
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  position, num_chars = 0, 0
  with open(tmp["tokens"], "wb") as f:
    writer = _CrcWriter(f)

    def flush(batch: list[str]) -> None:
      nonlocal position, counts, num_chars
      try:  # documents are text: special-token text never becomes a reserved id
        ids = tokenizer.encode_text_batch(batch, num_threads=1)
      except ValueError as e:  # invalid Unicode; iter_file_documents names file and line
        raise DataError(f"shard {index}: {e}") from None
      lengths = np.fromiter((len(t) + 1 for t in ids), np.int64, len(ids))
      for t in ids:
        t.append(eos)
      flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
      writer.write(flat.tobytes())
      counts += np.bincount(flat, minlength=tokenizer.vocab_size)
      ends.extend((position + np.cumsum(lengths)).tolist())
      position += int(lengths.sum())
      keys.extend(int.from_bytes(data.split_key(t, split_seed)[:8], "big") for t in batch)
      num_chars += sum(map(len, batch))
      if on_progress:
        on_progress(sum(map(len, batch)), int(lengths.sum()))

    batch, chars = [], 0
    for text in texts:
      if not text.strip():
        continue
      batch.append(text)
      chars += len(text)
      if chars >= batch_chars:
        flush(batch)
        batch, chars = [], 0
    if batch:
      flush(batch)
    f.flush()
    os.fsync(f.fileno())
  docs = np.array([ends, keys], np.uint64).T.reshape(-1, 2).astype("<u8")
  for name, array in (("docs.npy", docs), ("counts.npy", counts.astype("<i8"))):
    with open(tmp[name], "wb") as f:
      np.save(f, array, allow_pickle=False)
  for name in ("tokens", "docs.npy", "counts.npy"):
    os.replace(tmp[name], final[name])
  return dict(index=index, num_documents=len(ends), num_tokens=position, num_chars=num_chars,
              tokens_bytes=position * dtype.itemsize, tokens_crc32=writer.block_crcs(),
              docs_crc32=file_crc32(final["docs.npy"]),
              counts_crc32=file_crc32(final["counts.npy"]))


def shard_complete(folder: str | pathlib.Path, record: dict) -> bool:
  """Whether a recorded shard's files are all there with their recorded sizes (cheap)."""
  tokens = pathlib.Path(folder) / shard_file(record["index"], "tokens")
  return tokens.is_file() and tokens.stat().st_size == record["tokens_bytes"] and all(
      (pathlib.Path(folder) / shard_file(record["index"], s)).is_file()
      for s in ("docs.npy", "counts.npy"))


# ----------------------------------------------------------------------------
# Reading.


class _TokenFile:
  """Random reads of a .tokens file, each 1 MiB block CRC-checked on first touch."""

  def __init__(self, path: pathlib.Path, dtype: np.dtype, total_bytes: int,
               crcs: Sequence[int]):
    self.path, self.dtype, self.total_bytes = path, dtype, total_bytes
    self.crcs = np.asarray(crcs, np.int64)
    self.verified = np.zeros(len(crcs), bool)
    self._fd, self._pid = None, None

  def __getstate__(self):  # picklable for grain worker processes: reopen there
    return dict(self.__dict__, _fd=None, _pid=None)

  def _file(self) -> int:
    if self._pid != os.getpid():
      self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    return self._fd

  def _pread(self, size: int, offset: int) -> bytes:
    try:
      out = os.pread(self._file(), size, offset)
    except OSError as e:
      raise DataError(f"{self.path}: cannot read ({e.strerror})") from None
    if len(out) != size:
      raise DataError(f"{self.path}: truncated (no bytes {offset + len(out)}..{offset + size})")
    return out

  def read(self, start: int, count: int) -> np.ndarray:
    """Tokens [start, start + count) of the file, as this file's dtype [count]."""
    a, b = start * self.dtype.itemsize, (start + count) * self.dtype.itemsize
    for block in range(a // BLOCK_BYTES, (b - 1) // BLOCK_BYTES + 1):
      if not self.verified[block]:
        size = min(BLOCK_BYTES, self.total_bytes - block * BLOCK_BYTES)
        if zlib.crc32(self._pread(size, block * BLOCK_BYTES)) != self.crcs[block]:
          raise DataError(f"{self.path}: corrupted (block {block} fails its CRC32); "
                          "prepare the shards again")
        self.verified[block] = True
    return np.frombuffer(self._pread(b - a, a), self.dtype)


def _load_npy(path: pathlib.Path, crc: int, dtype: str, shape: tuple) -> np.ndarray:
  if not path.is_file():
    raise DataError(f"{path}: missing (listed in the manifest)")
  if file_crc32(path) != crc:
    raise DataError(f"{path}: does not match the manifest (CRC32 differs)")
  try:
    array = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise DataError(f"{path}: unreadable ({e})") from None
  if array.dtype != np.dtype(dtype) or array.shape != shape:
    raise DataError(f"{path}: {array.dtype}{list(array.shape)} does not match the manifest "
                    f"({dtype}{list(shape)})")
  return array


@dataclasses.dataclass
class Source:
  """One prepared folder, opened and checked: its documents in corpus order.

  doc_shard int32 [D], doc_start int64 [D] (token offset in its shard's file),
  doc_len int64 [D] (tokens, eos included), keys uint64 [D] (split keys).
  """
  folder: pathlib.Path
  manifest: dict
  files: list[_TokenFile]
  doc_shard: np.ndarray
  doc_start: np.ndarray
  doc_len: np.ndarray
  keys: np.ndarray
  counts: np.ndarray

  @property
  def name(self) -> str:
    return self.folder.resolve().name

  @property
  def fingerprint(self) -> str:
    return manifest_fingerprint(self.manifest)

  def count_tokens(self, doc_ids: np.ndarray) -> np.ndarray:
    """Token frequencies int64 [vocab] of documents `doc_ids` (read from disk)."""
    counts = np.zeros_like(self.counts)
    for d in np.asarray(doc_ids):
      tokens = self.files[self.doc_shard[d]].read(int(self.doc_start[d]), int(self.doc_len[d]))
      counts += np.bincount(tokens, minlength=len(counts))
    return counts


def open_source(folder: str | pathlib.Path) -> Source:
  """Opens a prepared folder, checking it against its manifest (sizes, CRC32s of the
  index files, unlisted shard files). Raises DataError naming the bad file."""
  folder = pathlib.Path(folder)
  manifest = read_manifest(folder)
  path = folder / MANIFEST_FILE
  if not manifest.get("complete"):
    raise DataError(f"{path}: preparation incomplete ({len(manifest['shards'])} of "
                    f"{len(manifest['units'])} shards): run prepare_data again to finish it")
  dtype = np.dtype(manifest["token_dtype"])
  listed = {r["index"] for r in manifest["shards"]}
  for p in folder.iterdir():
    m = _SHARD_FILE.match(p.name)
    if m and int(m.group(1)) not in listed:
      raise DataError(f"{p}: not in the manifest {path} (files of another preparation?)")
  files, starts, lengths, shard_of, keys = [], [], [], [], []
  counts = np.zeros(manifest["tokenizer"]["vocab_size"], np.int64)
  for k, record in enumerate(sorted(manifest["shards"], key=lambda r: r["index"])):
    tokens = folder / shard_file(record["index"], "tokens")
    n, size = record["num_documents"], record["tokens_bytes"]
    if not tokens.is_file():
      raise DataError(f"{tokens}: missing (listed in the manifest)")
    if tokens.stat().st_size != size or size != record["num_tokens"] * dtype.itemsize:
      raise DataError(f"{tokens}: {tokens.stat().st_size} bytes, the manifest says {size} "
                      "(truncated or not these shards)")
    docs = _load_npy(folder / shard_file(record["index"], "docs.npy"), record["docs_crc32"],
                     "<u8", (n, 2))
    counts += _load_npy(folder / shard_file(record["index"], "counts.npy"),
                        record["counts_crc32"], "<i8", counts.shape)
    ends = docs[:, 0].astype(np.int64)
    if n and (ends[-1] != record["num_tokens"] or np.any(np.diff(ends, prepend=0) < 1)):
      raise DataError(f"{folder / shard_file(record['index'], 'docs.npy')}: document ends do "
                      "not match the manifest's token count")
    files.append(_TokenFile(tokens, dtype, size, record["tokens_crc32"]))
    starts.append(ends - np.diff(ends, prepend=0))
    lengths.append(np.diff(ends, prepend=0))
    shard_of.append(np.full(n, k, np.int32))
    keys.append(docs[:, 1])
  forged = int(counts[tokenizer_lib.MASK_ID:tokenizer_lib.NUM_SPECIAL].sum())
  if manifest.get("special_text") != SPECIAL_TEXT and forged:
    raise DataError(f"{path}: prepared before special-token text in documents was encoded "
                    f"as text ({forged} reserved ids in the shards): run prepare_data again")
  cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)
  return Source(folder, manifest, files, cat(shard_of, np.int32), cat(starts, np.int64),
                cat(lengths, np.int64), cat(keys, np.uint64), counts)


class ShardedRows:
  """Packed rows [num_rows, seq_len] of some documents of a Source, read on demand.

  The documents' tokens (eos included), concatenated in corpus order and cut every
  `seq_len` tokens: the rows of `data.pack_token_lists` (segment ids 1, 2, ... per
  row, positions restarting per segment, only the last row padded), without holding
  them in memory. Duck-types `data.PackedCorpus` for `data.make_train_dataset` and
  `data.eval_batches`: num_rows, seq_len, num_tokens, num_documents, rows(index).
  """

  def __init__(self, source: Source, doc_ids: np.ndarray, seq_len: int):
    self.source, self.seq_len = source, seq_len
    self.doc_ids = np.asarray(doc_ids, np.int64)
    self._shard = source.doc_shard[self.doc_ids]
    self._start = source.doc_start[self.doc_ids]
    self._cum = np.concatenate([[0], np.cumsum(source.doc_len[self.doc_ids])]).astype(np.int64)

  num_documents = property(lambda self: len(self.doc_ids))
  num_tokens = property(lambda self: int(self._cum[-1]))  # real tokens, eos included
  num_rows = property(lambda self: -(-self.num_tokens // self.seq_len))

  def rows(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
    """Rows `index` (int array [n] or a slice, as numpy indexes [num_rows]) as int32
    arrays tokens, segment_ids, positions, each [n, seq_len]."""
    ids = np.arange(self.num_rows)[index] if isinstance(index, slice) else np.asarray(index)
    ids = ids.reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
      raise IndexError(f"row index out of [0, {self.num_rows})")
    out = {k: np.zeros([ids.size, self.seq_len], np.int32)
           for k in ("tokens", "segment_ids", "positions")}
    for i, r in enumerate(ids.tolist()):
      self._fill(r, out["tokens"][i], out["segment_ids"][i], out["positions"][i])
    return out

  def _fill(self, r: int, tokens, segment_ids, positions) -> None:
    s = r * self.seq_len
    e = min(s + self.seq_len, self.num_tokens)
    d = int(np.searchsorted(self._cum, s, "right")) - 1
    pieces = []  # (shard, file offset, length) of each document's part of the row
    p = s
    while p < e:
      n = min(int(self._cum[d + 1]), e) - p
      pieces.append((int(self._shard[d]), int(self._start[d]) + p - int(self._cum[d]), n))
      p, d = p + n, d + 1
    col, k = 0, 0
    while k < len(pieces):  # adjacent pieces of one file: one read
      shard, start, total = pieces[k]
      k += 1
      while k < len(pieces) and pieces[k][0] == shard and pieces[k][1] == start + total:
        total += pieces[k][2]
        k += 1
      tokens[col:col + total] = self.source.files[shard].read(start, total)
      col += total
    col = 0
    for segment, (_, _, n) in enumerate(pieces, start=1):
      segment_ids[col:col + n] = segment
      positions[col:col + n] = np.arange(n)
      col += n

  def token_counts(self) -> np.ndarray:
    """Token frequencies int64 [vocab] of these documents (reads the smaller side)."""
    src = self.source
    if 2 * len(self.doc_ids) <= len(src.doc_len):
      return src.count_tokens(self.doc_ids)
    return src.counts - src.count_tokens(np.setdiff1d(np.arange(len(src.doc_len)), self.doc_ids))


class ConcatRows:
  """Several row sets one after the other (a mixture's validation rows)."""

  def __init__(self, parts: Sequence[ShardedRows]):
    self.parts = list(parts)
    self.seq_len = self.parts[0].seq_len
    self._offsets = np.cumsum([0] + [p.num_rows for p in self.parts])

  num_rows = property(lambda self: int(self._offsets[-1]))
  num_tokens = property(lambda self: sum(p.num_tokens for p in self.parts))
  num_documents = property(lambda self: sum(p.num_documents for p in self.parts))

  def rows(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
    """As `ShardedRows.rows`, over the parts' rows in order."""
    ids = np.arange(self.num_rows)[index] if isinstance(index, slice) else np.asarray(index)
    ids = ids.reshape(-1)
    part = np.searchsorted(self._offsets, ids, "right") - 1
    out = {k: np.zeros([ids.size, self.seq_len], np.int32)
           for k in ("tokens", "segment_ids", "positions")}
    for p in np.unique(part):
      rows = self.parts[p].rows(ids[part == p] - self._offsets[p])
      for k in out:
        out[k][part == p] = rows[k]
    return out


# ----------------------------------------------------------------------------
# Mixtures.


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'DIR' or 'DIR:W,DIR:W,...' -> [(dir, weight)]; a missing weight is 1.

  Raises DataError for an empty spec, a weight that is not a number, or weights that
  are negative, not finite, or do not sum to a positive number.
  """
  entries = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    folder, sep, weight = part.rpartition(":")
    if not sep:
      folder, weight = part, "1"
    try:
      entries.append((folder, float(weight)))
    except ValueError:
      raise DataError(f"data.shards entry {part!r}: weight {weight!r} is not a number") from None
  if not entries:
    raise DataError("data.shards is empty: expected DIR or DIR:WEIGHT,DIR:WEIGHT,...")
  weights = [w for _, w in entries]
  if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
    raise DataError(f"data.shards={spec}: weights {weights} must be finite, non-negative and "
                    "sum to a positive number")
  return entries


def mixture_schedule(weights: Sequence[float], seed: int, period: int = MIXTURE_PERIOD):
  """Which source each slot of a period draws from, in a seeded order.

  Source k gets round(period * w_k / sum(w)) slots (largest remainders), so every
  period of the stream holds the weights exactly. Returns (slots int64 [period]: the
  source of each slot, rank int64 [period]: the slot's index among its source's slots,
  per_period int64 [K]: slots per source). Raises DataError for a positive weight too
  small for one slot.
  """
  w = np.asarray(weights, np.float64) / np.sum(weights)
  quota = w * period
  per_period = np.floor(quota).astype(np.int64)
  short = period - per_period.sum()
  per_period[np.argsort(-(quota - per_period), kind="stable")[:short]] += 1
  if np.any((w > 0) & (per_period == 0)):
    raise DataError(f"mixture weights {list(weights)}: a weight below 1/{period} of the total")
  slots = np.repeat(np.arange(len(w)), per_period)
  slots = slots[np.random.default_rng([seed, 0x6D6978]).permutation(period)]
  rank = np.zeros(period, np.int64)
  for k in range(len(w)):
    rank[slots == k] = np.arange(per_period[k])
  return slots, rank, per_period


def _sub_seed(seed: int, k: int) -> int:
  return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


class Mixture:
  """Training rows drawn from several sources by weight, deterministically.

  Global draw i takes slot i % P of `mixture_schedule` (P = MIXTURE_PERIOD): source
  s = slots[i % P] and that source's draw number (i // P) * per_period[s] + rank[i % P]
  in its own seeded shuffle of its rows, reshuffled every epoch of that source. Host p
  of n takes draws p, p + n, ... (only those rows are read), batches of B, forever.
  """

  def __init__(self, names: Sequence[str], weights: Sequence[float],
               sources: Sequence[ShardedRows]):
    self.names, self.weights, self.sources = list(names), list(weights), list(sources)
    self.seq_len = self.sources[0].seq_len

  num_tokens = property(lambda self: sum(s.num_tokens for s in self.sources))

  def make_train_dataset(self, batch_size: int, seed: int, num_epochs: int | None,
                         process_index: int, process_count: int) -> grain.MapDataset:
    """Batches dicts of int32 [B, L] tokens, segment_ids, positions (see the class)."""
    if num_epochs is not None:
      raise ValueError("a mixture repeats forever: num_epochs must be None")
    slots, rank, per_period = mixture_schedule(self.weights, seed)
    orders = [grain.MapDataset.range(s.num_rows).shuffle(seed=_sub_seed(seed, k)).repeat(None)
              for k, s in enumerate(self.sources)]

    def draw(i):
      q, j = divmod(i, MIXTURE_PERIOD)
      s = int(slots[j])
      return s, orders[s][q * int(per_period[s]) + int(rank[j])]

    ds = grain.MapDataset.range(sys.maxsize)[process_index::process_count]
    return ds.map(draw).batch(batch_size, drop_remainder=True).map(self._gather)

  def _gather(self, drawn) -> dict[str, np.ndarray]:
    source, row = (np.asarray(x) for x in drawn)
    out = {k: np.zeros([len(row), self.seq_len], np.int32)
           for k in ("tokens", "segment_ids", "positions")}
    for s in np.unique(source):
      rows = self.sources[s].rows(row[source == s])
      for k in out:
        out[k][source == s] = rows[k]
    return out

  def tokens_drawn(self, num_rows: int, seed: int) -> dict[str, int]:
    """Tokens (rows x seq_len) each source has given after the first `num_rows` global
    draws: per-source counts for the metrics, exact on every host and after resume (a
    source's last, padded row counts as full)."""
    slots, _, per_period = mixture_schedule(self.weights, seed)
    q, j = divmod(num_rows, MIXTURE_PERIOD)
    rows = q * per_period + np.bincount(slots[:j], minlength=len(self.sources))
    return {name: int(n) * self.seq_len for name, n in zip(self.names, rows)}

  def token_counts(self) -> np.ndarray:
    """The sampled unigram distribution: sum over sources of weight x frequencies."""
    w = np.asarray(self.weights) / np.sum(self.weights)
    return sum(wk * c / max(c.sum(), 1) for wk, c in
               zip(w, (s.token_counts() for s in self.sources)))


@dataclasses.dataclass
class TrainingData:
  """What `open_training_data` returns: rows to train and validate on, the shards'
  tokenizer, and `identity` (JSON: sources' fingerprints and weights, split) that a
  resumed run must match."""
  train: ShardedRows | Mixture
  validation: ShardedRows | ConcatRows
  tokenizer: tokenizer_lib.Tokenizer
  identity: dict


def open_training_data(spec: str, validation_fraction: float, seq_len: int,
                       split_seed: int) -> TrainingData:
  """Opens `spec` ('DIR' or 'DIR:W,...', see `parse_mixture`) and splits every source
  by document exactly as `data.split_documents(docs, validation_fraction, split_seed)`.

  One source trains on its ShardedRows (the rows of the in-memory path); several make
  a Mixture, validated on all their held-out rows in order. Raises DataError naming
  the folder for: no manifest, shards that do not match it, sources with other
  tokenizers or split seeds, a source with no training tokens, bad weights.
  """
  entries = parse_mixture(spec)
  tokenizer, train, val, names, identity = None, [], [], [], []
  for folder, weight in entries:
    source = open_source(folder)
    m = source.manifest
    if m["split_seed"] != split_seed:
      raise DataError(f"{folder}: prepared with split seed {m['split_seed']}, this run splits "
                      f"with {split_seed} (set data.split_seed={m['split_seed']})")
    if tokenizer is None:
      tokenizer = tokenizer_lib.Tokenizer.load(pathlib.Path(folder) / TOKENIZER_FILE)
    if tokenizer.fingerprint != m["tokenizer"]["fingerprint"]:
      raise DataError(f"{folder}: made with tokenizer {m['tokenizer']['fingerprint']}, not "
                      f"{tokenizer.fingerprint} (of {entries[0][0]})")
    n = len(source.doc_len)
    num_val = data.num_validation_documents(n, validation_fraction)
    held = np.lexsort((np.arange(n), source.keys))[:num_val]
    is_val = np.zeros(n, bool)
    is_val[held] = True
    rows = ShardedRows(source, np.flatnonzero(~is_val), seq_len)
    if rows.num_rows == 0:
      raise DataError(f"{folder}: empty source (no training documents)")
    train.append(rows)
    val.append(ShardedRows(source, np.flatnonzero(is_val), seq_len))
    name = source.name if source.name not in names else f"{source.name}_{len(names)}"
    names.append(name)
    identity.append(dict(name=name, fingerprint=source.fingerprint, weight=weight))
  ident = dict(sources=identity, validation_fraction=validation_fraction,
               split_seed=split_seed)
  if len(train) == 1:
    return TrainingData(train[0], val[0], tokenizer, ident)
  return TrainingData(Mixture(names, [w for _, w in entries], train), ConcatRows(val),
                      tokenizer, ident)


def check_same_data(saved: dict | None, current: dict | None, allow_change: bool,
                    workdir) -> None:
  """Refuses (DataError) to resume a checkpoint trained on other data (another mixture,
  other shards, another split) unless `allow_change`; None is the in-memory corpus."""
  if saved == current or allow_change:
    return
  describe = lambda d: "the in-memory corpus" if d is None else ", ".join(
      f"{s['name']}:{s['weight']:g} ({s['fingerprint']})" for s in d["sources"])
  raise DataError(f"{workdir}: the checkpoint trained on {describe(saved)}, this run has "
                  f"{describe(current)}; set data.allow_data_change=True to continue anyway")


def unigram_entropy(rows, vocab_size: int) -> float:
  """Entropy (nats/token) of the training token distribution: of a PackedCorpus's real
  tokens, a ShardedRows's documents, or a Mixture's weighted sources."""
  if hasattr(rows, "token_counts"):
    p = np.asarray(rows.token_counts(), np.float64)[:vocab_size]
  else:
    p = np.bincount(rows.tokens[rows.segment_ids > 0].ravel(), minlength=vocab_size)
  p = p[p > 0] / p.sum()
  return float(-(p * np.log(p)).sum())
