"""WideGeo: entity split, determinism, gold answerable from the corpus, scoring, eval set, search."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from planner.envs import get_env, list_envs
from planner.envs.base import Environment, Task, load_eval_set
from planner.envs.corpus import build_corpus, part_word
from planner.envs.geodata import TEST_CONTINENTS, format_int, load_geodata
from planner.envs.make_eval_sets import EVAL_SET_SPECS, main as make_eval_sets_main, render_eval_set
from planner.envs.widegeo import WideGeoEnv
from planner.plan_schema import parse_range
from swarm.fan_out import range_windows
from workers.tools.search import search_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("geo") / "corpus.jsonl")


@pytest.fixture(scope="module")
def docs(corpus: Path) -> dict[str, dict[str, str]]:
    return {d["id"]: d for d in map(orjson.loads, corpus.read_bytes().splitlines())}


@pytest.fixture(scope="module")
def env(corpus: Path) -> WideGeoEnv:
    return WideGeoEnv(corpus_path=corpus)


def as_markdown(task: Task, rows: list[dict] | None = None) -> str:
    rows = task.gold if rows is None else rows
    lines = ["| " + " | ".join(task.columns) + " |", "|" + "---|" * len(task.columns)]
    for r in rows:
        lines.append("| " + " | ".join(format_int(v) if isinstance(v, (int, float)) else str(v) for v in r.values()) + " |")
    return "Here is the table.\n\n" + "\n".join(lines) + "\n"


def entities(tasks: list[Task]) -> tuple[set[str], set[int]]:
    countries: set[str] = set()
    cities: set[int] = set()
    for t in tasks:
        countries.update(t.meta["entities"]["countries"])
        cities.update(t.meta["entities"]["cities"])
    return countries, cities


def test_registry() -> None:
    assert list_envs() == ["deepgeo", "widegeo"]
    env = get_env("widegeo")
    assert isinstance(env, Environment) and env.name == "widegeo" and env.tools == ["search"]
    with pytest.raises(ValueError, match="unknown environment 'wide'.*widegeo"):
        get_env("wide")


def test_bad_arguments_are_named(env: WideGeoEnv) -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        env.tasks("dev", 3, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative integer"):
        env.tasks("train", -1, 0)
    other = get_env("deepgeo").tasks("test", 1, 0)[0]
    with pytest.raises(ValueError, match="belongs to env 'deepgeo'"):
        env.score(other, "x")


def test_train_test_split_has_no_overlap(env: WideGeoEnv) -> None:
    data = load_geodata()
    train = [t for s in range(3) for t in env.tasks("train", 40, s)]
    test = [t for s in range(3) for t in env.tasks("test", 40, s)]
    tr_countries, tr_cities = entities(train)
    te_countries, te_cities = entities(test)
    assert tr_countries and te_countries and tr_cities and te_cities
    assert not tr_countries & te_countries
    assert not tr_cities & te_cities
    assert all(data.countries[c].continent in TEST_CONTINENTS for c in te_countries)
    assert all(data.countries[c].continent not in TEST_CONTINENTS for c in tr_countries)
    assert all(data.cities[c].country in te_countries for c in te_cities)
    # The gold rows themselves name only entities of the task's split.
    names_by_split = {
        "test": {data.countries[c].name for c in te_countries} | {data.cities[c].name for c in te_cities},
        "train": {data.countries[c].name for c in tr_countries} | {data.cities[c].name for c in tr_cities},
    }
    for t in train + test:
        key = t.key_columns[0]
        assert {r[key] for r in t.gold} <= names_by_split[t.split], t.id
        assert t.split == ("train" if t in train else "test")


def test_generation_is_deterministic_per_seed(env: WideGeoEnv) -> None:
    a = env.tasks("train", 20, 5)
    b = WideGeoEnv().tasks("train", 20, 5)
    assert [t.model_dump() for t in a] == [t.model_dump() for t in b]
    c = env.tasks("train", 20, 6)
    assert [t.prompt for t in a] != [t.prompt for t in c]
    assert len({t.id for t in a}) == 20 and len({t.prompt for t in a}) == 20


def test_prompts_do_not_mention_parallelism(env: WideGeoEnv) -> None:
    for t in env.tasks("train", 40, 1) + env.tasks("test", 40, 1):
        low = t.prompt.lower()
        assert "parallel" not in low and "sub-agent" not in low and "subagent" not in low
        assert all(col in t.prompt for col in t.columns)


def test_gold_matches_the_records(env: WideGeoEnv) -> None:
    data = load_geodata()
    for t in env.tasks("test", 40, 2) + env.tasks("train", 40, 2):
        p = t.meta["params"]
        if t.meta["template"] == "top_cities":
            ranked = sorted(data.cities_of(p["country"]), key=lambda c: -c.population)
            assert [r["population"] for r in t.gold] == [c.population for c in ranked[: p["n"]]]
            assert ranked[p["n"] - 1].population > ranked[p["n"]].population
        elif t.meta["template"] == "neighbours":
            assert {r["country"] for r in t.gold} == {data.countries[n].name for n in data.countries[p["country"]].neighbours}
        elif t.meta["template"] == "continent_countries":
            want = {c.name for c in data.countries.values() if c.continent == p["continent"] and c.population > p["min_population"]}
            assert {r["country"] for r in t.gold} == want
        else:
            want = {c.name for c in data.countries.values() if c.continent == p["continent"] and p["language"] in c.languages}
            assert {r["country"] for r in t.gold} == want


def test_every_gold_value_is_in_the_entity_documents(env: WideGeoEnv, docs: dict[str, dict[str, str]]) -> None:
    data = load_geodata()
    by_name = {c.name: c.iso for c in data.countries.values()}
    tasks = env.tasks("test", 24, 3) + env.tasks("train", 24, 3)
    for t in random.Random(0).sample(tasks, 20):
        city_ids = {data.cities[i].name: i for i in t.meta["entities"]["cities"]}
        for row in t.gold:
            key = row[t.key_columns[0]]
            doc = docs[f"country:{by_name[key]}"] if key in by_name and t.key_columns[0] == "country" else docs[f"city:{city_ids[key]}"]
            assert key in doc["title"]
            for col, value in row.items():
                shown = format_int(value) if isinstance(value, (int, float)) else str(value)
                assert shown in doc["text"], (t.id, col, shown, doc["id"])


def test_list_documents_enumerate_the_rows(docs: dict[str, dict[str, str]]) -> None:
    brazil = [d for k, d in docs.items() if k.startswith("list:cities:BR:")]
    assert len(brazil) == -(-len(load_geodata().cities_of("BR")) // 15)
    assert "1. São Paulo" in docs["list:cities:BR:1"]["text"]
    africa = " ".join(d["text"] for k, d in docs.items() if k.startswith("list:continent:AF:"))
    assert all(c.name in africa for c in load_geodata().countries_in("AF"))


def test_every_country_list_has_contents_naming_its_parts(corpus: Path, docs: dict[str, dict[str, str]]) -> None:
    """A list of countries (continent, language) has a contents document whose "Parts: ..." names one
    word per part document; a search for the list itself still shows a part first, the contents only
    when asked for."""
    lists = {k.rsplit(":", 1)[0] for k in docs if k.startswith(("list:continent:", "list:language:"))}
    assert len(lists) > 50
    for prefix in lists:
        n = sum(k.rsplit(":", 1)[0] == prefix and k.rsplit(":", 1)[1].isdigit() for k in docs)
        assert n >= 1
        words = [w for w in docs[f"{prefix}:contents"]["text"].split("Parts: ", 1)[1].rstrip(".").split("; ")]
        assert [w.rsplit(" ", 1)[1] for w in words] == [part_word(p) for p in range(1, n + 1)]
        subject = docs[f"{prefix}:contents"]["title"].removeprefix("Contents of the alphabetical list of countries and territories ")
        subject = subject.removeprefix("of ").removeprefix("where ").removesuffix(" is spoken")
        assert {w.rsplit(" ", 1)[0] for w in words} == {subject}, prefix
    assert docs["list:continent:AF:contents"]["text"] == "The list has 3 parts. Parts: Africa first; Africa second; Africa third."
    assert docs["list:continent:SA:contents"]["text"] == "The list has 1 part. Parts: South America first."
    assert docs["list:language:fr:contents"]["text"].endswith("Parts: French first; French second; French third.")
    for q, first in [("Countries and territories of Africa", "list:continent:AF:"),
                     ("contents of the alphabetical list of countries and territories of Africa", "list:continent:AF:contents"),
                     ("Countries and territories where French is spoken", "list:language:fr:"),
                     ("contents of the alphabetical list of countries and territories where French is spoken", "list:language:fr:contents")]:
        top = search_corpus(corpus, q, 1)[0].doc.id
        assert top == first if first.endswith("contents") else (top.startswith(first) and top[-1].isdigit()), (q, top)


def test_every_country_has_a_neighbours_list_its_lister_query_finds(corpus: Path, docs: dict[str, dict[str, str]]) -> None:
    """Each country's land neighbours are a list document of their own, in the order its country
    document names them ("none" for an island), and the query a neighbours lister writes, the words of
    its task, finds it first (Guinea's second, after Guinea-Bissau's, which names Guinea twice)."""
    data = load_geodata()
    first = 0
    for iso, c in data.countries.items():
        names = [n.name for n in data.neighbours_of(iso)]
        doc = docs[f"list:neighbours:{iso}"]
        assert doc["title"] == f"Neighbouring countries of {c.name}"
        assert doc["text"] == f"Countries that share a land border with {c.name}: {'; '.join(names) or 'none'}."
        if names:
            assert f"Neighbouring countries of {c.name}: {', '.join(names)}." in docs[f"country:{iso}"]["text"]
        hits = [h.doc.id for h in search_corpus(corpus, f"Countries that share a land border with {c.name}", 2)]
        assert f"list:neighbours:{iso}" in hits, (c.name, hits)
        first += hits[0] == f"list:neighbours:{iso}"
    assert first >= len(data.countries) - 1
    assert docs["list:neighbours:AU"]["text"] == "Countries that share a land border with Australia: none."


def test_every_held_out_city_window_finds_its_list_document_first(env: WideGeoEnv, corpus: Path) -> None:
    """The query a city sub-agent writes for its window of a held-out task ("Most populous cities of
    Uruguay ranks 16 to 30") finds the list document of those ranks at rank 1. With bm25s's defaults
    (b = 0.75, words of two characters or more) Uruguay's "16 to 30" found the one-city "ranks 31 to
    31", the Republic of the Congo's "1 to 10" its "16 to 23", and "1 to 8" named no rank at all."""
    data = load_geodata()
    windows = []
    for task in env.eval_set():
        if task.meta["template"] == "top_cities":
            iso, n = task.meta["params"]["country"], task.meta["params"]["n"]
            windows += [(iso, s, e) for s, e in range_windows(parse_range(f"all the {n} by 15"))]
    assert {"UY", "CG"} <= {iso for iso, _, _ in windows} and len(windows) > 20
    for iso, start, end in windows:
        query = f"Most populous cities of {data.country(iso).name} ranks {start} to {end}"
        top = search_corpus(corpus, query, 1)[0].doc.id
        assert top == f"list:cities:{iso}:{(start - 1) // 15 + 1}", (query, top)


def test_corpus_is_deterministic_and_cached(corpus: Path, tmp_path: Path) -> None:
    again = build_corpus(tmp_path / "c.jsonl")
    assert again.read_bytes() == corpus.read_bytes()
    mtime = again.stat().st_mtime_ns
    assert build_corpus(again) == again and again.stat().st_mtime_ns == mtime  # reused, not rewritten
    n_docs = len(corpus.read_bytes().splitlines())
    data = load_geodata()
    assert n_docs > len(data.countries) + len(data.cities)


def test_scoring_of_gold_and_damaged_answers(env: WideGeoEnv) -> None:
    for t in env.tasks("test", 12, 4):
        perfect = env.score(t, as_markdown(t))
        assert perfect.success and perfect.item_f1 == 1.0, t.id
        dropped = env.score(t, as_markdown(t, t.gold[1:]))
        assert not dropped.success
        assert dropped.item_recall == pytest.approx((len(t.gold) - 1) / len(t.gold))
    assert env.score(t, "I do not know.").item_f1 == 0.0


def test_sizes_span_small_to_large(env: WideGeoEnv) -> None:
    sizes = [len(t.gold) for t in env.eval_set("v1")]
    assert min(sizes) == 3 and max(sizes) >= 100


def test_eval_set_loads_and_matches_generator(env: WideGeoEnv, tmp_path: Path) -> None:
    tasks = env.eval_set("v1")
    seed, n = EVAL_SET_SPECS[("widegeo", "v1")]
    assert len(tasks) == n and all(t.split == "test" and t.env == "widegeo" for t in tasks)
    assert [t.model_dump() for t in tasks] == [t.model_dump() for t in env.tasks("test", n, seed)]
    assert make_eval_sets_main(["--check"]) == 0
    assert render_eval_set("widegeo", "v1") == render_eval_set("widegeo", "v1")
    with pytest.raises(FileNotFoundError, match="no eval set 'v9'.*widegeo-v1"):
        env.eval_set("v9")
    # A file that claims another env or version is refused.
    raw = orjson.loads(render_eval_set("widegeo", "v1"))
    raw["env"] = "deepgeo"
    (tmp_path / "widegeo-v1.json").write_bytes(orjson.dumps(raw))
    with pytest.raises(ValueError, match="expected env='widegeo'"):
        load_eval_set("widegeo", "v1", tmp_path)


def test_search_finds_the_country_document(corpus: Path) -> None:
    data = load_geodata()
    sample = random.Random(1).sample(sorted(i for i, c in data.countries.items() if c.capital), 25)
    for iso in sample:
        name = data.countries[iso].name
        ids = [h.doc.id for h in search_corpus(corpus, f"capital of {name}", 5)]
        assert f"country:{iso}" in ids, (name, ids)
