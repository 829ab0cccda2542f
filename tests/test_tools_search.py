"""The search tool: BM25 ranking over a small JSONL corpus, caching, and clear corpus errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from swarm.plans import ToolsConfig
from workers.tools import build_registry
from workers.tools import search as search_mod
from workers.tools.registry import ToolContext
from workers.tools.search import CorpusError, build_index, search_corpus

DOCS = [
    {"id": "fr", "title": "France", "text": "France is a country in Western Europe. Its capital is Paris. Currency: euro."},
    {"id": "de", "title": "Germany", "text": "Germany is a country in Central Europe. Its capital is Berlin. Currency: euro."},
    {"id": "jp", "title": "Japan", "text": "Japan is an island country in East Asia. Its capital is Tokyo. Currency: yen."},
    {"id": "au", "title": "Australia", "text": "Australia is a country in Oceania. Its capital is Canberra, not Sydney."},
    {"id": 7, "title": "Kangaroo", "text": "The kangaroo is a marsupial native to Australia."},
]


def write_corpus(path: Path, docs: list[dict]) -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(d) for d in docs) + b"\n")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", DOCS)


def test_ranking_puts_the_matching_document_first(corpus: Path) -> None:
    hits = search_corpus(corpus, "capital Tokyo", k=3)
    assert hits[0].doc.id == "jp"
    assert hits[0].score > hits[1].score
    hits = search_corpus(corpus, "Australia", k=5)
    assert sorted(h.doc.id for h in hits) == ["7", "au"]  # only the two documents that mention it
    assert len(search_corpus(corpus, "euro", k=1)) == 1
    assert {h.doc.id for h in search_corpus(corpus, "euro", k=5)} == {"fr", "de"}


def test_a_phrase_outranks_its_scattered_words(tmp_path: Path) -> None:
    # The short document has both words, more often, but never side by side.
    docs = [{"id": "scattered", "title": "Islands", "text": "South Georgia and the South Sandwich Islands; America."},
            {"id": "phrase", "title": "Countries of South America",
             "text": "Countries of South America, alphabetical: Argentina; Bolivia; Brazil; Chile; Colombia."}]
    path = write_corpus(tmp_path / "c.jsonl", docs + [{"id": f"f{i}", "text": f"filler document {i} about Europe"}
                                                      for i in range(20)])
    assert [h.doc.id for h in search_corpus(path, "countries of South America", k=2)] == ["phrase", "scattered"]
    # Word order matters only through neighbouring pairs: the reversed pair is not the phrase.
    hits = search_corpus(path, "America South", k=2)
    assert {h.doc.id for h in hits} == {"phrase", "scattered"}


def test_title_is_searchable_and_no_match_gives_nothing(corpus: Path) -> None:
    assert search_corpus(corpus, "kangaroo")[0].doc.id == "7"
    assert search_corpus(corpus, "zebra volcano") == []


def test_index_is_built_once_and_rebuilt_when_the_file_changes(corpus: Path) -> None:
    first = build_index(corpus)
    assert build_index(str(corpus)) is first
    write_corpus(corpus, DOCS + [{"id": "br", "title": "Brazil", "text": "Brazil's capital is Brasilia."}])
    second = build_index(corpus)
    assert second is not first
    assert search_corpus(corpus, "Brasilia")[0].doc.id == "br"


async def test_concurrent_first_use_builds_one_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_corpus(tmp_path / "c.jsonl", DOCS)
    builds: list[Path] = []
    real_build = search_mod._build

    def counting_build(p: Path) -> search_mod.CorpusIndex:
        builds.append(p)
        return real_build(p)

    monkeypatch.setattr(search_mod, "_build", counting_build)
    results = await asyncio.gather(*(asyncio.to_thread(search_corpus, path, "capital", 2) for _ in range(8)))
    assert len(builds) == 1
    assert all(len(r) == 2 for r in results)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"id": "a", "title": "t", "text": "x"}\nnot json\n', "line 2: not valid JSON"),
        (b'{"id": "a", "title": "t"}\n', "line 1: text: Field required"),
        (b'["a", "b"]\n', "line 1: expected a JSON object"),
        (b'{"id": "", "text": "x"}\n', "line 1: id:"),
        (b"\n\n", "has no documents"),
    ],
)
def test_bad_corpus_errors_name_path_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as info:
        build_index(path)
    assert message in str(info.value) and "bad.jsonl" in str(info.value)


def test_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="nope.jsonl"):
        build_index(tmp_path / "nope.jsonl")


async def test_as_a_registry_tool(corpus: Path, tmp_path: Path) -> None:
    ctx = ToolContext(agent_id="a")
    registry = build_registry(ToolsConfig(search_corpus=str(corpus)))
    out = await registry.call("search", '{"query": "capital of Germany", "k": 2}', ctx, 30.0)
    assert not out.is_error
    assert out.content.startswith("[1] id=de | Germany (score ")
    assert "Its capital is Berlin" in out.content and "[2]" in out.content and "[3]" not in out.content

    out = await registry.call("search", '{"query": "capital", "k": 50}', ctx, 30.0)
    assert out.is_error and "k:" in out.content
    out = await registry.call("search", '{"query": "   "}', ctx, 30.0)
    assert out.is_error and "blank" in out.content
    out = await registry.call("search", '{"query": "zebra"}', ctx, 30.0)
    assert not out.is_error and out.content.startswith("no documents match")

    unset = build_registry(ToolsConfig())
    out = await unset.call("search", '{"query": "x"}', ctx, 30.0)
    assert out.is_error and "ToolsConfig.search_corpus is unset" in out.content
    missing = build_registry(ToolsConfig(search_corpus=str(tmp_path / "gone.jsonl")))
    out = await missing.call("search", '{"query": "x"}', ctx, 30.0)
    assert out.is_error and "gone.jsonl" in out.content


def test_long_text_snippet_centres_on_the_query(tmp_path: Path) -> None:
    long_text = "filler words here. " * 100 + "The answer is platypus. " + "more filler. " * 100
    path = write_corpus(tmp_path / "long.jsonl", [{"id": "x", "title": "", "text": long_text}])
    text = search_mod.format_hits(search_corpus(path, "platypus"), "platypus")
    assert "platypus" in text and text.count("...") == 2
    assert len(text) < 800
