"""The document corpus the `search` tool reads, generated from GeoNames records.

JSONL, one `{"id", "title", "text"}` object per line: one document per country, one per city, and
"list" documents (countries of a continent, most populous cities of a country, countries speaking a
language) cut into parts short enough to read from one search snippet, with a contents document
per list of countries naming its parts. The file is written
deterministically (same bytes every time) to a cache directory and reused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson

from planner.envs.geodata import (
    LANGUAGE_NAMES,
    COUNTRY_ALIASES,
    City,
    Country,
    GeoData,
    format_int,
    language_name,
    load_geodata,
)

CORPUS_VERSION = "geo-v6"  # bump whenever the documents change: cached files are keyed by it
CITY_LIST_PART = 15  # the search tool shows ~600 characters per hit: keep a part within that
NAME_LIST_PART = 25


def default_cache_dir() -> Path:
    return Path(os.environ.get("AGENT_SWARM_CACHE", "~/.cache/agent-swarm")).expanduser()


def default_corpus_path() -> Path:
    return default_cache_dir() / f"corpus-{CORPUS_VERSION}.jsonl"


# A list's parts are named by words: when they were named "part 2", the search tool indexed only words
# of two or more characters, so "part 2" found nothing that "part 1" did not; "second part" finds the
# second part (single digits are indexed since session 14, the words stay: the policy was trained on them).
PART_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def part_word(part: int) -> str:
    """'first', 'second', ... for a list's 1-based part number (up to 10)."""
    if not 1 <= part <= len(PART_WORDS):
        raise ValueError(f"a list has parts 1 to {len(PART_WORDS)}, not {part}")
    return PART_WORDS[part - 1]


def part_words(n_parts: int, subject: str) -> str:
    """'Africa first; Africa second; Africa third': the parts of a list of `n_parts` about `subject`
    (a continent, a language), as its contents document names them. The subject before each word
    is the cue a part lister copies its part word by: given "Parts: second", nothing before the word
    in its query matched the line it had to copy, and stage 23 wrote " f" whichever part it was given
    (p 0.44 / 0.22 / 0.03 for first / second / third); given "Parts: Europe second" it copied the
    word (0.99 / 0.99 / 0.36) untrained (docs/policy.md, "Session 16")."""
    return "; ".join(f"{subject} {part_word(p)}" for p in range(1, n_parts + 1))


def contents_doc(doc_prefix: str, list_words: str, subject: str, n_parts: int) -> dict[str, str]:
    """The contents of a list cut into parts: how many parts and their names. A sub-agent asked for
    a list's parts copies "Parts: Africa first; Africa second; Africa third" from it: counting them
    from the "(first part of 3)" of a part's title is what stages 18-19 got wrong (they copied names
    instead). Titled by the list's words ("countries and territories of Africa") after "Contents of
    the alphabetical list of", the phrase a parts task names it by; its text says little else, so a
    search for the list itself ("Countries and territories of Africa") still finds its parts first."""
    words = part_words(n_parts, subject)
    plural = "part" if n_parts == 1 else "parts"
    return {
        "id": f"{doc_prefix}contents",
        "title": f"Contents of the alphabetical list of {list_words}",
        "text": f"The list has {n_parts} {plural}. Parts: {words}.",
    }


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def country_doc(data: GeoData, c: Country) -> dict[str, str]:
    parts = [f"{c.name} is a country or territory in {c.continent_name} (ISO code {c.iso}, {c.iso3})."]
    if c.iso in COUNTRY_ALIASES:
        parts.append(f"{c.name} is also known as {', '.join(COUNTRY_ALIASES[c.iso])}.")
    parts.append(f"Capital of {c.name}: {c.capital}." if c.capital else f"{c.name} has no capital listed.")
    parts.append(f"Population of {c.name}: {format_int(c.population)}.")
    parts.append(f"Area of {c.name}: {format_int(c.area_km2)} km².")
    if c.currency_code:
        parts.append(f"Currency of {c.name}: {c.currency_name} ({c.currency_code}).")
    if c.languages:
        parts.append(f"Languages of {c.name}: {', '.join(language_name(code) for code in c.languages)}.")
    neighbours = data.neighbours_of(c.iso)
    if neighbours:
        parts.append(f"Neighbouring countries of {c.name}: {', '.join(n.name for n in neighbours)}.")
    else:
        parts.append(f"{c.name} has no land neighbours.")
    top = data.cities_of(c.iso)[:5]
    if top:
        parts.append(f"Largest cities of {c.name}: {', '.join(t.name for t in top)}.")
    return {"id": f"country:{c.iso}", "title": c.name, "text": " ".join(parts)}


def city_doc(data: GeoData, city: City, rank: int) -> dict[str, str]:
    c = data.country(city.country)
    lat = f"{abs(city.latitude):.4f}° {'N' if city.latitude >= 0 else 'S'}"
    lon = f"{abs(city.longitude):.4f}° {'E' if city.longitude >= 0 else 'W'}"
    parts = [f"{city.name} is a city in {c.name} ({c.continent_name})."]
    cap = data.capital_city(c.iso)
    if cap is not None and cap.id == city.id:
        parts.append(f"{city.name} is the capital of {c.name}.")
    parts.append(f"Population of {city.name}: {format_int(city.population)}.")
    parts.append(f"It is the {_ordinal(rank)} most populous city of {c.name} in this collection.")
    parts.append(f"Coordinates: {lat}, {lon}. Time zone: {city.timezone}. Admin code: {city.admin1}.")
    return {"id": f"city:{city.id}", "title": f"{city.name}, {c.name}", "text": " ".join(parts)}


def _chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def neighbours_doc(country: Country, names: list[str]) -> dict[str, str]:
    """A country's land neighbours as a list of their own, in the order its country document names
    them ("none" for an island: its document answers the same query words). A lister copies "A; B; C"
    from it as it copies a part of a continent's list: from the country document it had to turn
    "A, B, C" into "A; B; C" in the middle of a longer text, and stage 22 stopped after 3 of Brazil's
    10 neighbours and garbled Kenya's."""
    return {
        "id": f"list:neighbours:{country.iso}",
        "title": f"Neighbouring countries of {country.name}",
        "text": f"Countries that share a land border with {country.name}: {'; '.join(names) or 'none'}.",
    }


def list_docs(data: GeoData) -> Iterator[dict[str, str]]:
    for code in sorted({c.continent for c in data.countries.values()}):
        members = data.countries_in(code)
        name = members[0].continent_name
        chunks = list(_chunks(members, NAME_LIST_PART))
        yield contents_doc(f"list:continent:{code}:", f"countries and territories of {name}", name, len(chunks))
        for part, (start, chunk) in enumerate(chunks, start=1):
            yield {
                "id": f"list:continent:{code}:{part}",
                "title": f"Countries and territories of {name} ({part_word(part)} part of {len(chunks)})",
                "text": (
                    f"Countries and territories of {name}, alphabetical, {start + 1} to {start + len(chunk)} "
                    f"of {len(members)}: {'; '.join(c.name for c in chunk)}."
                ),
            }
    for iso in sorted(data.countries):
        c = data.countries[iso]
        yield neighbours_doc(c, [n.name for n in data.neighbours_of(iso)])
    for iso in sorted(data.cities_by_country):
        c = data.country(iso)
        cities = data.cities_of(iso)
        for start, chunk in _chunks(cities, CITY_LIST_PART):
            entries = "; ".join(f"{start + i + 1}. {t.name} ({format_int(t.population)})" for i, t in enumerate(chunk))
            yield {
                "id": f"list:cities:{iso}:{start // CITY_LIST_PART + 1}",
                "title": f"Most populous cities of {c.name}, ranks {start + 1} to {start + len(chunk)} of {len(cities)}",
                "text": f"Cities of {c.name} by population, ranks {start + 1} to {start + len(chunk)}: {entries}.",
            }
    for code in sorted(LANGUAGE_NAMES):
        speakers = sorted((c for c in data.countries.values() if code in c.languages), key=lambda c: c.name)
        chunks = list(_chunks(speakers, NAME_LIST_PART))
        lang = LANGUAGE_NAMES[code]
        yield contents_doc(f"list:language:{code}:", f"countries and territories where {lang} is spoken", lang,
                           len(chunks))
        for part, (start, chunk) in enumerate(chunks, start=1):
            yield {
                "id": f"list:language:{code}:{part}",
                "title": f"Countries and territories where {lang} is spoken ({part_word(part)} part of {len(chunks)})",
                "text": (
                    f"{lang} is among the languages of these countries and territories, {start + 1} to "
                    f"{start + len(chunk)} of {len(speakers)}: {'; '.join(c.name for c in chunk)}."
                ),
            }


def corpus_docs(data: GeoData | None = None) -> Iterator[dict[str, str]]:
    """All documents in their fixed order: countries by ISO code, cities by country and rank, lists."""
    data = data or load_geodata()
    for iso in sorted(data.countries):
        yield country_doc(data, data.countries[iso])
    for iso in sorted(data.cities_by_country):
        for rank, city in enumerate(data.cities_of(iso), start=1):
            yield city_doc(data, city, rank)
    yield from list_docs(data)


def build_corpus(path: str | Path | None = None, force: bool = False) -> Path:
    """Write the corpus to `path` (default: the cache dir) unless it is already there; return the path."""
    target = Path(path).expanduser() if path is not None else default_corpus_path()
    if target.is_file() and target.stat().st_size > 0 and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write aside and rename: concurrent builders never expose a half-written file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        for doc in corpus_docs():
            f.write(orjson.dumps(doc))
            f.write(b"\n")
    os.replace(tmp, target)
    return target
