"""DeepGeo: answers recomputed hop by hop, entity split, determinism, corpus coverage, scoring, eval set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from planner.envs import get_env
from planner.envs.base import Task
from planner.envs.corpus import build_corpus
from planner.envs.deepgeo import TEMPLATES, DeepGeoEnv
from planner.envs.geodata import TEST_CONTINENTS, Country, GeoData, fold, load_geodata
from planner.envs.make_eval_sets import EVAL_SET_SPECS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("geo") / "corpus.jsonl")


@pytest.fixture(scope="module")
def env(corpus: Path) -> DeepGeoEnv:
    return DeepGeoEnv(corpus_path=corpus)


@pytest.fixture(scope="module")
def sample(env: DeepGeoEnv) -> list[Task]:
    return env.tasks("train", 36, 11) + env.tasks("test", 36, 11)


# An independent solver: follows each template's question with plain lookups over the records.
def by_capital(data: GeoData, capital: str) -> Country:
    found = [c for c in data.countries.values() if fold(c.capital) == fold(capital)]
    assert len(found) == 1, f"capital {capital!r} names {len(found)} countries"
    return found[0]


def neighbours(data: GeoData, c: Country, exclude: str | None = None) -> list[Country]:
    return [data.countries[n] for n in c.neighbours if n != exclude]


def only_max(items: list, key) -> object:
    best = max(key(i) for i in items)
    winners = [i for i in items if key(i) == best]
    assert len(winners) == 1, "superlative is tied"
    return winners[0]


def solve(data: GeoData, task: Task) -> str:
    start = task.meta["hops"][0]["from"]
    t = task.meta["template"]
    if t == "capital_currency":
        return by_capital(data, start).currency_code
    if t == "city_capital":
        return data.countries[data.cities[start].country].capital
    if t == "capital_neighbour_currency":
        n = only_max(neighbours(data, by_capital(data, start)), lambda c: c.population)
        return n.currency_code
    if t == "neighbour_neighbour_capital":
        first = only_max(neighbours(data, data.countries[start]), lambda c: c.area_km2)
        return only_max(neighbours(data, first, exclude=start), lambda c: c.area_km2).capital
    if t == "capital_neighbour_top_city":
        n = only_max(neighbours(data, by_capital(data, start)), lambda c: -c.area_km2)
        return only_max(data.cities_of(n.iso), lambda c: c.population).name
    if t == "city_neighbour_neighbour_capital":
        home = data.countries[data.cities[start].country]
        first = only_max(neighbours(data, home), lambda c: c.area_km2)
        return only_max(neighbours(data, first, exclude=home.iso), lambda c: c.population).capital
    raise AssertionError(f"unknown template {t}")


def test_registry_gives_deepgeo() -> None:
    env = get_env("deepgeo")
    assert env.name == "deepgeo" and env.tools == ["search"]


def test_answers_are_correct_by_recomputing_the_hops(sample: list[Task]) -> None:
    data = load_geodata()
    assert {t.meta["template"] for t in sample} == set(TEMPLATES)
    for t in sample:
        assert t.gold == [{"answer": solve(data, t)}], t.id
        assert t.columns == ["answer"] and t.key_columns == ["answer"]
        assert t.meta["hops"][-1]["to"] in (t.gold[0]["answer"], *t.meta["entities"]["cities"])
        start = t.meta["hops"][0]["from"]
        shown = data.cities[start].name if isinstance(start, int) else (
            data.countries[start].name if start in data.countries else start)
        assert shown in t.prompt, t.id


def test_hop_counts_between_two_and_four(sample: list[Task]) -> None:
    counts = Counter(t.meta["n_hops"] for t in sample)
    assert set(counts) == {2, 3, 4}
    assert all(len(t.meta["hops"]) == t.meta["n_hops"] for t in sample)


def test_split_has_no_overlap(env: DeepGeoEnv) -> None:
    data = load_geodata()
    ents = {"train": (set(), set()), "test": (set(), set())}
    for split in ("train", "test"):
        for seed in range(3):
            for t in env.tasks(split, 30, seed):
                ents[split][0].update(t.meta["entities"]["countries"])
                ents[split][1].update(t.meta["entities"]["cities"])
                # Every country a superlative weighed is listed as involved.
                for hop in t.meta["hops"]:
                    assert set(hop.get("weighed", [])) <= set(t.meta["entities"]["countries"])
    (tr_c, tr_city), (te_c, te_city) = ents["train"], ents["test"]
    assert te_c and tr_c and te_city and tr_city
    assert not tr_c & te_c and not tr_city & te_city
    assert all(data.countries[c].continent in TEST_CONTINENTS for c in te_c)
    assert all(data.countries[c].continent not in TEST_CONTINENTS for c in tr_c)
    assert all(data.cities[c].country in te_c for c in te_city)


def test_deterministic_per_seed(env: DeepGeoEnv) -> None:
    a = env.tasks("test", 18, 3)
    assert [t.model_dump() for t in a] == [t.model_dump() for t in DeepGeoEnv().tasks("test", 18, 3)]
    assert [t.prompt for t in a] != [t.prompt for t in env.tasks("test", 18, 4)]


def test_answers_and_hops_are_in_the_corpus(env: DeepGeoEnv, corpus: Path, sample: list[Task]) -> None:
    docs = {d["id"]: d for d in map(orjson.loads, corpus.read_bytes().splitlines())}
    data = load_geodata()
    for t in sample:
        for hop in t.meta["hops"]:
            src, dst = hop["from"], hop["to"]
            if isinstance(src, int):  # city -> its country: the city's document names the country
                assert data.countries[dst].name in docs[f"city:{src}"]["text"]
            elif src in data.countries:  # country -> attribute or neighbour: in the country's document
                text = docs[f"country:{src}"]["text"]
                want = data.cities[dst].name if isinstance(dst, int) else (
                    data.countries[dst].name if dst in data.countries else dst)
                assert want in text, (t.id, hop)
            else:  # capital -> country
                assert f"Capital of {data.countries[dst].name}: {src}." in docs[f"country:{dst}"]["text"]


def test_scoring(env: DeepGeoEnv, sample: list[Task]) -> None:
    for t in sample[:12]:
        gold = str(t.gold[0]["answer"])
        good = env.score(t, f"Following the chain step by step.\nAnswer: {gold}")
        assert good.success and good.item_f1 == good.row_f1 == 1.0
        bad = env.score(t, "Answer: Atlantis")
        assert not bad.success and bad.item_f1 == 0.0
    currency_task = next(t for t in sample if t.meta["template"] == "capital_currency" and t.meta["aliases"])
    code, names = next(iter(currency_task.meta["aliases"].items()))
    assert env.score(currency_task, f"Answer: {names[0]}").success


def test_eval_set_loads_and_matches_generator(env: DeepGeoEnv) -> None:
    tasks = env.eval_set("v1")
    seed, n = EVAL_SET_SPECS[("deepgeo", "v1")]
    assert len(tasks) == n and all(t.split == "test" and t.env == "deepgeo" for t in tasks)
    assert [t.model_dump() for t in tasks] == [t.model_dump() for t in env.tasks("test", n, seed)]
    data = load_geodata()
    assert all(t.gold == [{"answer": solve(data, t)}] for t in tasks)
    with pytest.raises(FileNotFoundError, match="deepgeo"):
        env.eval_set("v0")


def test_many_tasks_reuse_prompts_once_templates_run_out(env: DeepGeoEnv) -> None:
    # ~70 held-out countries have a unique capital: 500 test tasks must repeat some questions.
    tasks = env.tasks("test", 500, 1)
    assert len(tasks) == 500 and len({t.id for t in tasks}) == 500
    assert len({t.prompt for t in tasks}) < 500
    assert all(t.split == "test" for t in tasks)
