"""`search`: BM25 (bm25s) over a local JSONL corpus of `{"id", "title", "text"}` documents.
Terms are the words (English stopwords dropped) plus each pair of neighbouring words, so a phrase
outranks its scattered words: "South America" prefers the document about South America to a short
one that says "South Georgia" twice and "America" never.

Many sub-agents share one worker process, so each corpus is indexed once per process (keyed by
its resolved path, size and modification time) and the build is guarded by a per-path lock: the
first caller builds, concurrent callers wait for that build instead of repeating it.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

# bm25s runs a JAX computation at import when JAX is installed; on a GPU machine that would take
# most of the GPU's memory for a CPU-sized search. Keep JAX on the CPU unless the user chose otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import bm25s  # noqa: E402
import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError, field_validator

from workers.tools.registry import Tool, ToolContext

MAX_K = 20
SNIPPET_CHARS = 600
# BM25's length normalisation, weaker than the usual 0.75: at 0.75 a short document outranks the long
# one a query names word for word ("Most populous cities of Uruguay ranks 16 to 30" found the one-city
# "ranks 31 to 31" first). Measured on the WideGeo corpus (with single digits indexed), rank-1 hits of
# each document's natural query, 0.75 → 0.2: country lookups 1,314 → 1,482 of 1,512, neighbours 231 →
# 241 of 252, city-list windows 9,266 → 11,078 of 11,481, city documents 974 → 971 of 980.
BM25_B = 0.2
# Words of two or more characters, and single digits: a city sub-agent's "ranks 1 to 8" must name
# its ranks (bm25s's default pattern drops "1" and "8", leaving no number to match).
TOKEN_PATTERN = r"(?u)\b(?:\w\w+|\d)\b"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


class CorpusError(ValueError):
    """The search corpus is unset, missing or malformed; the message names the path and line."""


class CorpusDoc(BaseModel):
    id: str = Field(min_length=1)
    title: str = ""
    text: str

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class SearchArgs(BaseModel):
    query: str = Field(
        min_length=1,
        max_length=1_000,
        description=(
            "Keywords to look for, e.g. 'capital of Australia population'. Ranking is lexical (BM25): "
            "use the distinctive words a matching document would contain, not a full question."
        ),
    )
    k: int = Field(5, ge=1, le=MAX_K, description=f"How many documents to return (1-{MAX_K}, default 5).")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is blank; give some keywords")
        return v


@dataclass(frozen=True)
class SearchHit:
    doc: CorpusDoc
    score: float


@dataclass
class CorpusIndex:
    path: Path
    docs: list[CorpusDoc]
    retriever: bm25s.BM25

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """Top-k documents with a positive BM25 score, best first."""
        if not query.strip():
            raise ValueError("search query is empty")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        # A term outside the corpus matches nothing (and bm25s would reject it).
        terms = [t for t in search_terms(query) if t in self.retriever.vocab_dict]
        if not terms:
            return []
        ids, scores = self.retriever.retrieve([terms], k=min(k, len(self.docs)), show_progress=False)
        hits: list[SearchHit] = []
        for i, s in zip(np.asarray(ids)[0], np.asarray(scores)[0]):
            if float(s) > 0.0:
                hits.append(SearchHit(self.docs[int(i)], float(s)))
        return hits


def load_corpus(path: str | Path) -> list[CorpusDoc]:
    """Read and validate a JSONL corpus; errors name the path and the 1-based line."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"search corpus {str(p)!r} does not exist or is not a file")
    docs: list[CorpusDoc] = []
    with p.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise CorpusError(f"search corpus {str(p)!r} line {lineno}: not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise CorpusError(f"search corpus {str(p)!r} line {lineno}: expected a JSON object")
            try:
                docs.append(CorpusDoc.model_validate(raw))
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors())
                raise CorpusError(f"search corpus {str(p)!r} line {lineno}: {problems}") from None
    if not docs:
        raise CorpusError(f"search corpus {str(p)!r} has no documents")
    return docs


def _terms_of(texts: list[str]) -> list[list[str]]:
    """The BM25 terms of each text: its words (lower case, English stopwords dropped, as bm25s splits
    them) and each pair of neighbouring words, joined by a space (no single word contains one)."""
    out = []
    for words in bm25s.tokenize(texts, token_pattern=TOKEN_PATTERN, stopwords="en", return_ids=False, show_progress=False):
        out.append(list(words) + [f"{a} {b}" for a, b in zip(words, words[1:])])
    return out


def search_terms(text: str) -> list[str]:
    return _terms_of([text])[0]


def _build(path: Path) -> CorpusIndex:
    docs = load_corpus(path)
    retriever = bm25s.BM25(b=BM25_B)
    retriever.index(_terms_of([f"{d.title} {d.text}" for d in docs]), show_progress=False)
    return CorpusIndex(path=path, docs=docs, retriever=retriever)


_cache: dict[tuple[str, int, int], CorpusIndex] = {}
_path_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def build_index(path: str | Path) -> CorpusIndex:
    """The index of a corpus, built once per process per (path, size, mtime) and then reused."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        raise CorpusError(f"search corpus {str(path)!r} does not exist") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    with _locks_guard:
        lock = _path_locks.setdefault(str(p), threading.Lock())
    with lock:
        hit = _cache.get(key)
        if hit is None:
            hit = _build(p)
            # Drop indexes of older versions of this file.
            for old in [k for k in _cache if k[0] == key[0]]:
                del _cache[old]
            _cache[key] = hit
    return hit


def search_corpus(path: str | Path, query: str, k: int = 5) -> list[SearchHit]:
    """BM25 search over the JSONL corpus at `path` (cached index)."""
    return build_index(path).search(query, k)


def _snippet(text: str, query: str) -> str:
    """About SNIPPET_CHARS of `text`, starting shortly before the first query word it contains."""
    if len(text) <= SNIPPET_CHARS:
        return text
    lower = text.lower()
    positions = [lower.find(w.lower()) for w in _TOKEN_RE.findall(query)]
    positions = [p for p in positions if p >= 0]
    start = max(0, min(positions) - 100) if positions else 0
    start = min(start, len(text) - SNIPPET_CHARS)
    piece = text[start : start + SNIPPET_CHARS]
    return ("..." if start > 0 else "") + piece + ("..." if start + SNIPPET_CHARS < len(text) else "")


def format_hits(hits: list[SearchHit], query: str) -> str:
    if not hits:
        return f"no documents match {query!r}; try other keywords"
    parts = []
    for rank, h in enumerate(hits, start=1):
        title = f" | {h.doc.title}" if h.doc.title else ""
        parts.append(f"[{rank}] id={h.doc.id}{title} (score {h.score:.2f})\n{_snippet(h.doc.text, query)}")
    return "\n\n".join(parts)


def make_search_tool(corpus_path: str | None) -> Tool:
    async def search_tool(args: SearchArgs, ctx: ToolContext) -> str:
        if not corpus_path:
            raise CorpusError("no search corpus is configured for this job (ToolsConfig.search_corpus is unset)")
        # Building the index may take seconds on a big corpus: keep the event loop free.
        hits = await asyncio.to_thread(search_corpus, corpus_path, args.query, args.k)
        return format_hits(hits, args.query)

    return Tool(
        name="search",
        description=(
            "Search the local document collection by keywords (BM25 ranking) and return the best "
            "matching documents with their id, title and a text snippet. Run several focused "
            "searches rather than one long query; an empty result means no document shares your "
            "keywords, so rephrase with other words."
        ),
        args_model=SearchArgs,
        fn=search_tool,
    )
