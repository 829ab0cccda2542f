"""WideGeo: WideSearch-style "fill the table" tasks over GeoNames, 3 to 150 rows.

Templates: the countries of a continent above a population threshold (capital, population,
currency, area), the N most populous cities of a country, the neighbours of a country, and the
countries of a continent that speak a language. Test tasks involve only held-out continents'
countries and cities (geodata.TEST_CONTINENTS). Scoring: scoring.score_table.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from planner.envs.base import GeneratedEnvironment, GoldValue, Score, Split, Task
from planner.envs.corpus import build_corpus
from planner.envs.geodata import (
    CONTINENT_NAMES,
    LANGUAGE_NAMES,
    Country,
    GeoData,
    continents_of_split,
    currency_aliases,
    fold,
    format_int,
    load_geodata,
    split_of_country,
)
from planner.envs.scoring import DEFAULT_REL_TOL, score_table

POPULATION_THRESHOLDS = [50_000, 1_000_000, 5_000_000, 10_000_000, 20_000_000, 50_000_000]
TOP_CITY_COUNTS = [3, 5, 8, 10, 15, 20, 30, 50, 100, 120, 150]
COUNTRY_ATTRIBUTES = {
    "capital": "its capital",
    "population": "its population",
    "currency": "its currency (ISO 4217 code)",
    "area_km2": "its area in km²",
}
TEMPLATES = ("continent_countries", "top_cities", "neighbours", "language_countries")

_FORMAT = "Answer with a markdown table whose columns are: {cols}. One row per {row}."


def task_subject(task: Task) -> str:
    """The country or continent a WideGeo task is about (its prompt names it; a first search must too)."""
    params = task.meta.get("params", {})
    if "country" in params:
        return load_geodata().country(params["country"]).name
    return CONTINENT_NAMES[params["continent"]]


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _has_record(c: Country) -> bool:
    return bool(c.capital) and c.population > 0 and c.area_km2 > 0 and bool(c.currency_code)


def _country_value(c: Country, column: str) -> GoldValue:
    return {"country": c.name, "capital": c.capital, "population": c.population,
            "currency": c.currency_code, "area_km2": c.area_km2}[column]


class WideGeoEnv(GeneratedEnvironment):
    name = "widegeo"
    tools = ["search"]

    def __init__(self, corpus_path: str | Path | None = None, rel_tol: float = DEFAULT_REL_TOL) -> None:
        self._corpus_path = corpus_path
        self.rel_tol = rel_tol
        self.data: GeoData = load_geodata()
        self._currency_aliases = currency_aliases(self.data)

    # ------------------------------------------------------------ interface

    def corpus_path(self) -> Path:
        return build_corpus(self._corpus_path)

    def score(self, task: Task, answer: str) -> Score:
        if task.env != self.name:
            raise ValueError(f"task {task.id} belongs to env {task.env!r}, not {self.name!r}")
        return score_table(
            answer,
            task.columns,
            task.key_columns,
            task.gold,
            aliases=task.meta.get("aliases", {}),
            rel_tol=self.rel_tol,
            column_rel_tol=task.meta.get("rel_tol", {}),
        )

    def make_task(self, rng: random.Random, split: Split, task_id: str, index: int) -> Task | None:
        template = TEMPLATES[index % len(TEMPLATES)]
        built = getattr(self, f"_{template}")(rng, split)
        if built is None:
            return None
        prompt, columns, keys, gold, meta = built
        meta = {"template": template, **meta}
        return Task(id=task_id, env=self.name, split=split, prompt=prompt, columns=columns,
                    key_columns=keys, gold=gold, meta=meta)

    # ------------------------------------------------------------ helpers

    def _split_countries(self, split: Split) -> list[Country]:
        return sorted((c for c in self.data.countries.values() if split_of_country(self.data, c.iso) == split),
                      key=lambda c: c.iso)

    def _aliases(self, countries: list[Country], columns: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in countries:
            if self.data.country_aliases(c.iso):
                out[c.name] = self.data.country_aliases(c.iso)
            if "currency" in columns and c.currency_code in self._currency_aliases:
                out[c.currency_code] = self._currency_aliases[c.currency_code]
        return out

    def _country_rows(self, countries: list[Country], columns: list[str]) -> list[dict[str, GoldValue]]:
        return [{col: _country_value(c, col) for col in columns} for c in countries]

    # ------------------------------------------------------------ templates

    def _continent_countries(self, rng: random.Random, split: Split) -> tuple | None:
        continent = rng.choice(continents_of_split(split))
        threshold = rng.choice(POPULATION_THRESHOLDS)
        attrs = sorted(rng.sample(list(COUNTRY_ATTRIBUTES), rng.choice([2, 3])), key=list(COUNTRY_ATTRIBUTES).index)
        members = [c for c in self.data.countries_in(continent) if c.population > threshold]
        if len(members) < 3 or not all(_has_record(c) for c in members):
            return None
        cname = members[0].continent_name
        columns = ["country", *attrs]
        prompt = (
            f"List every country or territory in {cname} with a population of more than "
            f"{format_int(threshold)} inhabitants (as recorded by GeoNames). For each, give "
            f"{_listing([COUNTRY_ATTRIBUTES[a] for a in attrs])}. "
            + _FORMAT.format(cols=", ".join(columns), row="country")
        )
        meta: dict[str, Any] = {
            "params": {"continent": continent, "min_population": threshold, "attributes": attrs},
            "entities": {"countries": [c.iso for c in members], "cities": []},
            "aliases": self._aliases(members, columns),
        }
        return prompt, columns, ["country"], self._country_rows(members, columns), meta

    def _top_cities(self, rng: random.Random, split: Split) -> tuple | None:
        n = rng.choice(TOP_CITY_COUNTS)
        eligible = [c for c in self._split_countries(split) if len(self.data.cities_of(c.iso)) > n]
        if not eligible:
            return None
        country = rng.choice(eligible)
        cities = self.data.cities_of(country.iso)
        if len(cities) <= n or cities[n - 1].population == cities[n].population:
            return None  # no clear cut at rank n
        top = cities[:n]
        if len({fold(c.name) for c in top}) < n:
            return None  # two cities of one name: the key would be ambiguous
        columns = ["city", "population"]
        prompt = (
            f"What are the {n} most populous cities of {country.name} according to GeoNames? "
            f"Give the population of each. " + _FORMAT.format(cols=", ".join(columns), row="city")
        )
        meta = {
            "params": {"country": country.iso, "n": n},
            "entities": {"countries": [country.iso], "cities": [c.id for c in top]},
            "aliases": {},
        }
        gold: list[dict[str, GoldValue]] = [{"city": c.name, "population": c.population} for c in top]
        return prompt, columns, ["city"], gold, meta

    def _neighbours(self, rng: random.Random, split: Split) -> tuple | None:
        subject = rng.choice([c for c in self._split_countries(split) if len(c.neighbours) >= 3])
        neighbours = self.data.neighbours_of(subject.iso)
        if len(neighbours) != len(subject.neighbours) or not all(_has_record(n) for n in neighbours):
            return None
        if any(split_of_country(self.data, n.iso) != split for n in neighbours):
            return None  # a neighbour across the split line would leak a held-out entity
        attrs = rng.choice([["capital"], ["capital", "population"], ["capital", "currency"], ["population", "area_km2"]])
        columns = ["country", *attrs]
        prompt = (
            f"Which countries share a land border with {subject.name}? For each neighbouring country give "
            f"{_listing([COUNTRY_ATTRIBUTES[a] for a in attrs])}. "
            + _FORMAT.format(cols=", ".join(columns), row="neighbouring country")
        )
        neighbours = sorted(neighbours, key=lambda c: c.name)
        meta = {
            "params": {"country": subject.iso, "attributes": attrs},
            "entities": {"countries": [subject.iso, *(n.iso for n in neighbours)], "cities": []},
            "aliases": self._aliases(neighbours, columns),
        }
        return prompt, columns, ["country"], self._country_rows(neighbours, columns), meta

    def _language_countries(self, rng: random.Random, split: Split) -> tuple | None:
        continent = rng.choice(continents_of_split(split))
        members = self.data.countries_in(continent)
        counts: dict[str, int] = {}
        for c in members:
            for code in c.languages:
                if code in LANGUAGE_NAMES:
                    counts[code] = counts.get(code, 0) + 1
        options = sorted(code for code, k in counts.items() if k >= 3)
        if not options:
            return None
        code = rng.choice(options)
        speakers = [c for c in members if code in c.languages]
        if not all(c.area_km2 > 0 for c in speakers):
            return None
        attrs = rng.choice([["area_km2"], ["area_km2", "population"], ["capital", "area_km2"]])
        if "capital" in attrs and not all(c.capital for c in speakers):
            return None
        columns = ["country", *attrs]
        lang = LANGUAGE_NAMES[code]
        prompt = (
            f"Which countries and territories in {speakers[0].continent_name} have {lang} among their "
            f"languages in GeoNames? For each give {_listing([COUNTRY_ATTRIBUTES[a] for a in attrs])}. "
            + _FORMAT.format(cols=", ".join(columns), row="country")
        )
        meta = {
            "params": {"continent": continent, "language": code, "attributes": attrs},
            "entities": {"countries": [c.iso for c in speakers], "cities": []},
            "aliases": self._aliases(speakers, columns),
        }
        return prompt, columns, ["country"], self._country_rows(speakers, columns), meta
