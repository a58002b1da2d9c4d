"""The search tool: BM25 over a local document collection (offline), top-k snippets.

Ranking is `bm25s` (Lucene-variant BM25, k1=1.5, b=0.75: the IDF never goes negative, so
a word in most passages still counts a little) over passages: each document is cut at
paragraph breaks into passages of about `passage_chars` characters (`data.chunk_text`),
so a hit points at a paragraph, not a 10,000-word speech. Text is tokenized as
lower-cased words (`\\w+`). A result is the passage's title and a snippet of at most
`snippet_chars` characters around the first query word it contains; the whole tool
result is bounded by `max_chars`.

Why bm25s (it replaced rank_bm25 here): it is maintained, scores from a sparse matrix
(milliseconds per query over the ~9,000 sotu passages, where rank_bm25 loops over
documents in Python), and saves / loads its index as plain .npy and .json files (no
pickle), which is the on-disk cache below.

Cache: the index is built once per collection and kept on disk under
`cache_dir/<fingerprint>/` (default `$RESEARCH_CACHE/search`, else
~/.cache/research/search). The fingerprint is a SHA-256 of the passages and titles, the
passage size, the BM25 parameters and the bm25s version, so a changed corpus or setting
gets a new index and a stale one is never read. Writing is atomic (a temporary folder
renamed into place); a cache that fails to load is rebuilt.

Collections: `corpus_documents('sotu')` (the State of the Union addresses of the
embedded `sotu` package, titled "President, year"), or a path: a .txt file (one
document, titled by the file name), a folder of .txt files, or a .jsonl file of
{"title": ..., "text": ...} records (field names configurable).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from research import data as data_lib
from research import tokenizer as tokenizer_lib

_WORD_RE = re.compile(r"\w+")
MAX_QUERY_CHARS = 200
K1, B = 1.5, 0.75
_FORMAT = 1  # bump when the cached files' meaning changes


def words(text: str) -> list[str]:
  """Lower-cased word tokens of `text` (the index's and the query's tokenizer)."""
  return _WORD_RE.findall(text.lower())


def default_cache_dir() -> pathlib.Path:
  """$RESEARCH_CACHE/search, else ~/.cache/research/search."""
  root = os.environ.get("RESEARCH_CACHE") or pathlib.Path.home() / ".cache" / "research"
  return pathlib.Path(root) / "search"


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result: its passage index, BM25 score, title and snippet."""
  passage: int
  score: float
  title: str
  snippet: str


class SearchIndex:
  """BM25 index over passages of (title, text) documents, cached on disk.

  Attributes:
    titles, passages: one entry per passage (whitespace collapsed).
    fingerprint: hex SHA-256 naming the collection and settings.
    from_cache: True when the index was loaded from the disk cache, not built.
  """

  def __init__(self, documents: Sequence[tuple[str, str]], passage_chars: int = 600,
               cache_dir: str | os.PathLike | None = None, use_cache: bool = True):
    """Cuts each (title, text) document into passages and indexes them (or loads them).

    Args:
      documents: (title, text) pairs.
      passage_chars: target passage size in characters.
      cache_dir: where indexes are cached (default `default_cache_dir()`).
      use_cache: False: build in memory only, read and write nothing.

    Raises:
      ValueError: no document has a word.
    """
    import bm25s  # pylint: disable=g-import-not-at-top
    logging.getLogger("bm25s").setLevel(logging.WARNING)

    self.titles: list[str] = []
    self.passages: list[str] = []
    for title, text in documents:
      for _, piece in data_lib.chunk_text(text, passage_chars):
        if words(piece):
          self.titles.append(title)
          self.passages.append(" ".join(piece.split()))
    if not self.passages:
      raise ValueError("SearchIndex: no document has a word")
    h = hashlib.sha256(json.dumps([_FORMAT, bm25s.__version__, K1, B, passage_chars]).encode())
    for title, passage in zip(self.titles, self.passages):
      h.update(f"{title}\0{passage}\0".encode())
    self.fingerprint = h.hexdigest()
    self.from_cache = False
    path = pathlib.Path(cache_dir or default_cache_dir()) / self.fingerprint[:32]
    if use_cache and (path / "done").exists():
      try:
        self._bm25 = bm25s.BM25.load(str(path), show_progress=False)
        self.from_cache = True
        return
      except (OSError, ValueError, KeyError):
        pass  # unreadable: rebuilt below
    self._bm25 = bm25s.BM25(k1=K1, b=B)
    self._bm25.index([words(p) for p in self.passages], show_progress=False)
    if use_cache:
      self._save(path)

  def _save(self, path: pathlib.Path):
    """Writes the index to `path` atomically (best effort: a read-only cache is skipped)."""
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=".building_", dir=path.parent)
      self._bm25.save(tmp, show_progress=False)
      pathlib.Path(tmp, "done").write_text(f"{len(self.passages)} passages\n")
      try:
        os.rename(tmp, path)
      except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
      pass

  def __len__(self) -> int:
    return len(self.passages)

  def scores(self, query: str) -> np.ndarray:
    """BM25 score of every passage for `query`, float64 [num_passages] (>= 0)."""
    terms = words(query)
    if not terms:  # bm25s fails on an empty query; no word matches nothing
      return np.zeros(len(self.passages), np.float64)
    return np.asarray(self._bm25.get_scores(terms), np.float64)

  def search(self, query: str, k: int = 3, snippet_chars: int = 300) -> list[Hit]:
    """The `k` best passages with a positive score, best first (ties: earlier first)."""
    scores = self.scores(query)
    order = np.argsort(-scores, kind="stable")[:k]
    terms = set(words(query))
    return [Hit(int(i), float(scores[i]), self.titles[i],
                snippet(self.passages[i], terms, snippet_chars))
            for i in order if scores[i] > 0]


def corpus_documents(corpus: str, text_field: str = "text",
                     title_field: str = "title") -> list[tuple[str, str]]:
  """(title, text) documents of a collection: 'sotu', a .txt, a folder of .txt, a .jsonl.

  Raises:
    ValueError: no such file or folder, an unknown suffix, a folder without .txt files,
      or a JSONL line that is not an object with a string `text_field` (file:line named).
  """
  if corpus == "sotu":
    return [(f"{d.meta['president']}, {d.meta['year']}", d.text)
            for d in data_lib.sotu_documents()]
  path = pathlib.Path(corpus)
  if path.is_dir():
    files = sorted(path.glob("*.txt"))
    if not files:
      raise ValueError(f"search corpus {path}: no .txt files in the folder")
    return [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files]
  if not path.is_file():
    raise ValueError(f"search corpus {corpus}: no such file or folder (or 'sotu')")
  if path.suffix == ".txt":
    return [(path.stem, path.read_text(encoding="utf-8", errors="replace"))]
  if path.suffix != ".jsonl":
    raise ValueError(f"search corpus {path}: expected .txt, .jsonl or a folder")
  docs = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
      problem = tokenizer_lib.text_problem(record)  # research/tokenizer.py's text policy
      if problem:
        raise ValueError(f"{path}:{lineno}: {problem}")
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{path}:{lineno}: expected an object with a string {text_field!r}")
      docs.append((str(record.get(title_field, f"{path.stem} {lineno}")), record[text_field]))
  return docs


def snippet(text: str, terms: set[str], max_chars: int) -> str:
  """At most `max_chars` of `text` starting shortly before the first word in `terms`."""
  if len(text) <= max_chars:
    return text
  start = 0
  for m in _WORD_RE.finditer(text.lower()):
    if m.group() in terms:
      start = max(0, m.start() - max_chars // 4)
      start = text.find(" ", start) + 1 if start > 0 else 0  # at a word boundary
      break
  piece = text[start:start + max_chars]
  return ("..." if start else "") + piece + ("..." if start + max_chars < len(text) else "")


def format_hits(hits: Sequence[Hit], max_chars: int) -> str:
  """"[1] title: snippet" lines, cut to `max_chars`; "no results" when empty."""
  if not hits:
    return "no results"
  text = "\n".join(f"[{n}] {h.title}: {h.snippet}" for n, h in enumerate(hits, start=1))
  return text if len(text) <= max_chars else text[:max_chars - 3] + "..."


def make_search(index: SearchIndex | None = None, k: int = 3, snippet_chars: int = 300,
                max_chars: int = 1000):
  """A search tool function `search(query, k=k) -> str` over `index` (default: sotu).

  The default index is built (or loaded from the disk cache) on the first call
  (`corpus_index`), not here.
  """
  def search(query: str, k: int = k) -> str:
    idx = index if index is not None else corpus_index("sotu")
    return format_hits(idx.search(query, k, snippet_chars), max_chars)
  return search


@functools.lru_cache(maxsize=4)
def corpus_index(corpus: str = "sotu", passage_chars: int = 600,
                 cache_dir: str | None = None) -> SearchIndex:
  """The index of a collection (`corpus_documents`), kept in memory and on disk."""
  return SearchIndex(corpus_documents(corpus), passage_chars, cache_dir)


def sotu_index(passage_chars: int = 600) -> SearchIndex:
  """The default collection: every State of the Union address, titled "President, year"."""
  return corpus_index("sotu", passage_chars)


SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
        "k": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["query"],
    "additionalProperties": False,
}
