"""DeepGeo: sequential multi-hop questions over GeoNames (2-4 hops), where each hop needs the last.

Example: "What is the currency of the most populous neighbour of the country whose capital is X?"
Parallel sub-agents cannot help much: the next lookup depends on the previous answer. Every
superlative has a unique winner, every name in a question is unique in the data, and test tasks
involve only held-out continents' entities (all neighbours weighed included). Scoring: exact match
after normalisation (scoring.score_exact).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from planner.envs.base import GeneratedEnvironment, Score, Split, Task
from planner.envs.corpus import build_corpus
from planner.envs.geodata import City, Country, GeoData, currency_aliases, fold, load_geodata, split_of_country
from planner.envs.scoring import DEFAULT_REL_TOL, score_exact

TEMPLATES = (
    "capital_currency",
    "city_capital",
    "capital_neighbour_currency",
    "neighbour_neighbour_capital",
    "capital_neighbour_top_city",
    "city_neighbour_neighbour_capital",
)
# What each hop relation leads from and to; "country" and "city" ends are entities of the task.
RELATION_KINDS: dict[str, tuple[str, str]] = {
    "capital_of": ("capital", "country"),
    "capital": ("country", "capital"),
    "currency": ("country", "currency"),
    "country_of_city": ("city", "country"),
    "most_populous_city": ("country", "city"),
    "most_populous_neighbour": ("country", "country"),
    "most_populous_neighbour_except_start": ("country", "country"),
    "largest_neighbour": ("country", "country"),
    "largest_neighbour_except_start": ("country", "country"),
    "smallest_neighbour": ("country", "country"),
}
ANSWER_LINE = "End your reply with a line of the form 'Answer: <{what}>'."


def unique_best(items: list[Any], key: Callable[[Any], float]) -> Any | None:
    """The item with the largest key, or None when the best is tied (the question would be ambiguous)."""
    if not items:
        return None
    ranked = sorted(items, key=key, reverse=True)
    if len(ranked) > 1 and key(ranked[0]) == key(ranked[1]):
        return None
    return ranked[0]


class DeepGeoEnv(GeneratedEnvironment):
    name = "deepgeo"
    tools = ["search"]

    def __init__(self, corpus_path: str | Path | None = None, rel_tol: float = DEFAULT_REL_TOL) -> None:
        self._corpus_path = corpus_path
        self.rel_tol = rel_tol
        self.data: GeoData = load_geodata()
        self._currency_aliases = currency_aliases(self.data)
        capitals = Counter(fold(c.capital) for c in self.data.countries.values() if c.capital)
        city_names = Counter(fold(c.name) for c in self.data.cities.values())
        country_names = {fold(c.name) for c in self.data.countries.values()}
        # Names a question may use: unique in the whole data set, whatever the split.
        self._unique_capital = {k for k, v in capitals.items() if v == 1}
        self._unique_city = {k for k, v in city_names.items() if v == 1} - country_names

    # ------------------------------------------------------------ interface

    def corpus_path(self) -> Path:
        return build_corpus(self._corpus_path)

    def score(self, task: Task, answer: str) -> Score:
        if task.env != self.name:
            raise ValueError(f"task {task.id} belongs to env {task.env!r}, not {self.name!r}")
        return score_exact(answer, task.gold[0]["answer"], aliases=task.meta.get("aliases", {}), rel_tol=self.rel_tol)

    def make_task(self, rng: random.Random, split: Split, task_id: str, index: int) -> Task | None:
        template = TEMPLATES[index % len(TEMPLATES)]
        built = getattr(self, f"_{template}")(rng, split)
        if built is None:
            return None
        prompt, answer, hops, aliases = built
        countries: set[str] = set()
        cities: set[int] = set()
        for hop in hops:
            for end in ("from", "to"):
                kind = RELATION_KINDS[hop["relation"]][0 if end == "from" else 1]
                if kind == "country":
                    countries.add(hop[end])
                elif kind == "city":
                    cities.add(hop[end])
            countries.update(hop.get("weighed", []))
        meta = {
            "template": template,
            "hops": hops,
            "n_hops": len(hops),
            "entities": {"countries": sorted(countries), "cities": sorted(cities)},
            "aliases": aliases,
        }
        return Task(id=task_id, env=self.name, split=split, prompt=prompt, columns=["answer"],
                    key_columns=["answer"], gold=[{"answer": answer}], meta=meta)

    # ------------------------------------------------------------ helpers

    def _in_split(self, split: Split, *isos: str) -> bool:
        return all(iso in self.data.countries and split_of_country(self.data, iso) == split for iso in isos)

    def _countries(self, split: Split) -> list[Country]:
        return sorted((c for c in self.data.countries.values() if split_of_country(self.data, c.iso) == split),
                      key=lambda c: c.iso)

    def _by_unique_capital(self, rng: random.Random, split: Split) -> Country | None:
        pool = [c for c in self._countries(split) if c.capital and fold(c.capital) in self._unique_capital]
        return rng.choice(pool) if pool else None

    def _by_unique_city(self, rng: random.Random, split: Split) -> City | None:
        isos = [c.iso for c in self._countries(split) if c.capital]
        iso = rng.choice(isos)
        pool = [c for c in self.data.cities_of(iso) if fold(c.name) in self._unique_city]
        return rng.choice(pool) if pool else None

    def _best_neighbour(self, split: Split, iso: str, attr: str, exclude: str | None = None,
                        smallest: bool = False) -> Country | None:
        """The neighbour of `iso` with the largest (or smallest) `attr`; every neighbour weighed must be in the split."""
        c = self.data.country(iso)
        if not c.neighbours or not self._in_split(split, *c.neighbours):
            return None
        candidates = [n for n in self.data.neighbours_of(iso) if n.iso != exclude]
        if len(candidates) < 2 and exclude is None:
            return None  # one neighbour: no choice to make
        sign = -1.0 if smallest else 1.0
        return unique_best(candidates, key=lambda n: sign * float(getattr(n, attr)))

    def _currency(self, c: Country) -> tuple[str, dict[str, list[str]]]:
        return c.currency_code, ({c.currency_code: self._currency_aliases[c.currency_code]}
                                 if c.currency_code in self._currency_aliases else {})

    @staticmethod
    def _hop(relation: str, src: str | int, dst: str | int, weighed: list[str] | None = None) -> dict[str, Any]:
        hop: dict[str, Any] = {"relation": relation, "from": src, "to": dst}
        if weighed is not None:
            hop["weighed"] = sorted(weighed)
        return hop

    # ------------------------------------------------------------ templates

    def _capital_currency(self, rng: random.Random, split: Split) -> tuple | None:
        c = self._by_unique_capital(rng, split)
        if c is None or not c.currency_code:
            return None
        code, aliases = self._currency(c)
        prompt = (f"What currency is used in the country whose capital is {c.capital}? Give its ISO 4217 code. "
                  + ANSWER_LINE.format(what="currency code"))
        hops = [self._hop("capital_of", c.capital, c.iso), self._hop("currency", c.iso, code)]
        return prompt, code, hops, aliases

    def _city_capital(self, rng: random.Random, split: Split) -> tuple | None:
        city = self._by_unique_city(rng, split)
        if city is None:
            return None
        c = self.data.country(city.country)
        if fold(city.name) == fold(c.capital):
            return None
        prompt = (f"What is the capital of the country in which the city of {city.name} lies? "
                  + ANSWER_LINE.format(what="capital"))
        hops = [self._hop("country_of_city", city.id, c.iso), self._hop("capital", c.iso, c.capital)]
        return prompt, c.capital, hops, {}

    def _capital_neighbour_currency(self, rng: random.Random, split: Split) -> tuple | None:
        c = self._by_unique_capital(rng, split)
        if c is None:
            return None
        n = self._best_neighbour(split, c.iso, "population")
        if n is None or not n.currency_code:
            return None
        code, aliases = self._currency(n)
        prompt = (f"What is the currency of the most populous neighbouring country of the country whose capital "
                  f"is {c.capital}? Give its ISO 4217 code. " + ANSWER_LINE.format(what="currency code"))
        hops = [self._hop("capital_of", c.capital, c.iso),
                self._hop("most_populous_neighbour", c.iso, n.iso, list(c.neighbours)),
                self._hop("currency", n.iso, code)]
        return prompt, code, hops, aliases

    def _neighbour_neighbour_capital(self, rng: random.Random, split: Split) -> tuple | None:
        c = rng.choice(self._countries(split))
        first = self._best_neighbour(split, c.iso, "area_km2")
        if first is None:
            return None
        second = self._best_neighbour(split, first.iso, "area_km2", exclude=c.iso)
        if second is None or not second.capital:
            return None
        prompt = (f"Take the largest (by area) neighbouring country of {c.name}. What is the capital of that "
                  f"country's largest (by area) neighbour other than {c.name}? " + ANSWER_LINE.format(what="capital"))
        hops = [self._hop("largest_neighbour", c.iso, first.iso, list(c.neighbours)),
                self._hop("largest_neighbour_except_start", first.iso, second.iso, list(first.neighbours)),
                self._hop("capital", second.iso, second.capital)]
        return prompt, second.capital, hops, {}

    def _capital_neighbour_top_city(self, rng: random.Random, split: Split) -> tuple | None:
        c = self._by_unique_capital(rng, split)
        if c is None:
            return None
        n = self._best_neighbour(split, c.iso, "area_km2", smallest=True)
        if n is None:
            return None
        cities = self.data.cities_of(n.iso)
        top = unique_best(cities, key=lambda t: float(t.population))
        if top is None:
            return None
        prompt = (f"Consider the country whose capital is {c.capital}. Among its neighbouring countries, take the "
                  f"one with the smallest area. What is that country's most populous city? "
                  + ANSWER_LINE.format(what="city"))
        hops = [self._hop("capital_of", c.capital, c.iso),
                self._hop("smallest_neighbour", c.iso, n.iso, list(c.neighbours)),
                self._hop("most_populous_city", n.iso, top.id)]
        return prompt, top.name, hops, {}

    def _city_neighbour_neighbour_capital(self, rng: random.Random, split: Split) -> tuple | None:
        city = self._by_unique_city(rng, split)
        if city is None:
            return None
        c = self.data.country(city.country)
        first = self._best_neighbour(split, c.iso, "area_km2")
        if first is None:
            return None
        second = self._best_neighbour(split, first.iso, "population", exclude=c.iso)
        if second is None or not second.capital:
            return None
        prompt = (f"The city of {city.name} lies in some country. Take that country's largest (by area) neighbour, "
                  f"then that neighbour's most populous neighbouring country other than the country of "
                  f"{city.name}. What is the capital of this last country? " + ANSWER_LINE.format(what="capital"))
        hops = [self._hop("country_of_city", city.id, c.iso),
                self._hop("largest_neighbour", c.iso, first.iso, list(c.neighbours)),
                self._hop("most_populous_neighbour_except_start", first.iso, second.iso, list(first.neighbours)),
                self._hop("capital", second.iso, second.capital)]
        return prompt, second.capital, hops, {}
