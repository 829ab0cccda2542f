"""Fake-entity copies of synthesised conversations: the same trace with its entities renamed.

A held-out task names countries and cities the policy never saw, so the policy must copy names and
numbers from search results rather than recall them. On real train entities a small model can lower
its loss by memorising facts instead, and the copy skill comes late. In a fake-entity copy every
entity of the task (the key and string cells of its gold rows, and the names of any '; '-separated
list an assistant wrote) becomes a made-up name, and every large number a random one of the same
shape, consistently across the whole conversation (task, queries, tool results, answers). Memory
cannot predict those tokens; copying can.

With a twin share, some fake names end like a name given earlier in the same conversation
("Nigeria" after "Liberia"). A list copied by matching only its last few tokens then resumes after
the wrong name: stage 23 copied Africa's "...; Niger; Nigeria;" and went on with Liberia's successor
"Libya", looping and losing 11 countries (docs/policy.md, "Session 15"). Twins make that shortcut
cost loss in training, so the copy has to match more of what precedes it. With a word share, some
start with a word of a train-split name ("Republic Lelystad"), so words the BPE made single tokens
are copied at the start of a name too.

Numbers keep their digit count and leading digit, so comparisons with the tasks' thresholds
(more than 50,000 / 1,000,000 / 5,000,000 / 20,000,000) come out as in the original.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import Any, Literal, get_args

from planner.envs.geodata import LANGUAGE_NAMES, fold, load_geodata, split_of_country
from planner.envs.widegeo import task_subject
from planner.traces import PARTS_LABEL, Conversation, TaskTrace, list_items

_SYLLABLES = ("ba", "ko", "ri", "ta", "mu", "se", "lo", "na", "vi", "de", "go", "pu", "ze", "ha", "ki", "ol",
              "an", "er", "is", "un", "ma", "te", "ro", "su", "fa", "ne", "li", "do", "ka", "bu")
# Only digit-grouped numbers (the corpus writes every count from 1,000 up so): a bare "4217" (ISO 4217)
# or a rank is part of the task's wording, not a fact.
GROUPED_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\w,])")
_CODE = re.compile(r"[A-Z]{3}")  # ISO 4217 currency codes get fake codes of the same shape
_LIST_ITEM_MIN = 3  # characters: shorter list items are not taken for names
_PLACE_NAME = re.compile(r"[A-Z][A-Za-z' -]{2,19}")

FakeNames = Literal["syllables", "places", "places+countries"]
FAKE_NAME_KINDS: tuple[str, ...] = get_args(FakeNames)
COUNTRY_NAME_SHARE = 1 / 3  # "places+countries": the share of fake names drawn from country_names()
# Letters a twin name shares with the end of an earlier one: 5 if any name has them, else 4. With the
# policy's BPE, 4 letters are ~2 tokens, so "name;" matches its twin's last 3 tokens ("er" "ia" ";").
TWIN_ENDINGS = (5, 4)
_NAME_WORD = re.compile(r"[A-Z][a-z]{2,}")


@lru_cache(maxsize=1)
def place_names() -> tuple[str, ...]:
    """Names of train-split GeoNames cities (~19k), minus any that is also the name of a test-split
    country, capital, city or currency: fake names with the token statistics of real place names.

    Syllable names have a distribution a model can learn to *write* (it then invents plausible names
    instead of copying); a name drawn from thousands of real ones cannot be guessed, only copied."""
    data = load_geodata()
    test = _test_entity_names()
    return tuple(sorted({city.name for city in data.cities.values()
                         if split_of_country(data, city.country) == "train" and _PLACE_NAME.fullmatch(city.name)
                         and fold(city.name) not in test}))


@lru_cache(maxsize=1)
def _test_entity_names() -> frozenset[str]:
    """Folded names of test-split countries, capitals, currencies and cities: never a fake name."""
    data = load_geodata()
    test: set[str] = set()
    for c in data.countries.values():
        if split_of_country(data, c.iso) == "test":
            test |= {fold(c.name), fold(c.capital), fold(c.currency_name)}
    test |= {fold(city.name) for city in data.cities.values() if split_of_country(data, city.country) == "test"}
    return frozenset(test)


@lru_cache(maxsize=1)
def country_names() -> tuple[str, ...]:
    """Names of train-split countries and their currencies, minus any test-split name ("Euro").
    Stage 1's BPE made many of them single tokens, and renamed-only training data never has the
    policy write them, so it cannot copy them (docs/policy.md, "Session 9"); as fake names they
    become copy targets."""
    data = load_geodata()
    test = _test_entity_names()
    names = {n for c in data.countries.values() if split_of_country(data, c.iso) == "train"
             for n in (c.name, c.currency_name) if n and _PLACE_NAME.fullmatch(n) and fold(n) not in test}
    return tuple(sorted(names))


def fake_name(rng: random.Random, taken: set[str], like: str = "", kind: FakeNames = "syllables") -> str:
    """A made-up name not in `taken`: three capitals for a code `like` "EUR"; otherwise a pronounceable
    one or two words ("syllables"), a train-split city name drawn at random ("places"), or with
    "places+countries" a train-split country or currency name one time in three, else a city name."""
    while _CODE.fullmatch(like):
        code = "".join(chr(rng.randint(65, 90)) for _ in range(3))
        if code not in taken:
            taken.add(code)
            return code
    while kind in ("places", "places+countries"):
        # "places" draws no extra random number, so its data stays byte-identical to earlier stages'.
        countries = kind == "places+countries" and rng.random() < COUNTRY_NAME_SHARE
        name = rng.choice(country_names() if countries else place_names())
        if name not in taken:
            taken.add(name)
            return name
    while True:
        words = [("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))).capitalize()
                 for _ in range(1 if rng.random() < 0.8 else 2)]
        name = " ".join(words)
        if name not in taken:
            taken.add(name)
            return name


@lru_cache(maxsize=1)
def _names_by_ending() -> dict[str, tuple[str, ...]]:
    """Train-split place, country and currency names by their last 5 and last 4 letters (folded case)."""
    index: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(place_names()) | set(country_names())):
        for k in TWIN_ENDINGS:
            if len(name) > k:
                index[name[-k:].lower()].append(name)
    return {ending: tuple(names) for ending, names in index.items()}


def twin_name(rng: random.Random, taken: set[str], of: str) -> str | None:
    """A train-split place or country name not in `taken` that ends in the same 5 (else 4) letters as
    `of` ("Nigeria" for "Liberia"), or None when there is none."""
    index = _names_by_ending()
    for k in TWIN_ENDINGS:
        # Not "New London" when "London" is taken: the taken name would show through the fake one.
        options = [n for n in index.get(of[-k:].lower(), ()) if n not in taken
                   and not any(n[i + 1:] in taken for i, ch in enumerate(n) if ch in " -")] if len(of) > k else []
        if options:
            name = rng.choice(options)
            taken.add(name)
            return name
    return None


@lru_cache(maxsize=1)
def name_words() -> tuple[str, ...]:
    """Capitalised words of train-split country, currency and capital names ("Republic", "Kingdom",
    "Saint", "Dominican"), minus any that is itself a test-split name."""
    data = load_geodata()
    test = _test_entity_names()
    words = {w for c in data.countries.values() if split_of_country(data, c.iso) == "train"
             for n in (c.name, c.currency_name, c.capital) if n for w in _NAME_WORD.findall(n)}
    return tuple(sorted(w for w in words if fold(w) not in test))


def word_name(rng: random.Random, taken: set[str]) -> str:
    """A fake name that starts with a word of a train-split name, then a train-split city name
    ("Republic Lelystad"). The policy's BPE made such words single tokens (" Republic"), and fake
    names never put one first in a list item, so stage 25 could not copy "Republic of the Congo"
    after "Nigeria;" and wrote " DKK" (docs/policy.md, "Session 16"). These names make each word
    a copy target at the start of a name."""
    while True:
        name = f"{rng.choice(name_words())} {rng.choice(place_names())}"
        if name not in taken:
            taken.add(name)
            return name


def fake_number(text: str, rng: random.Random) -> str:
    """Random digits in the shape of `text` (same grouping, same leading digit)."""
    digits = [c for c in text if c.isdigit()]
    new = digits[0] + "".join(str(rng.randint(0, 9)) for _ in digits[1:])
    it = iter(new)
    return "".join(next(it) if c.isdigit() else c for c in text)


def task_entities(trace: TaskTrace, languages: bool = False) -> list[str]:
    """Names to rename in this task's conversations: string cells of the gold rows, plus items of the
    '; '-separated lists the assistant wrote (listers name more countries than the gold keeps), the
    subjects of the list parts it named, and with `languages` the language a language task asks about
    and the languages whose lists' parts it named (else a model can recall a language from the
    training tasks instead of copying it from the task)."""
    names: set[str] = set()
    # The task's subject (the country or continent it is about) too: a held-out task names one the
    # model never saw, which the orchestrator and sub-agents must copy into subtasks and queries.
    names.add(task_subject(trace.task))
    for row in trace.task.gold:
        for value in row.values():
            if isinstance(value, str) and len(value) >= _LIST_ITEM_MIN and not value.isdigit():
                names.add(value)
    kept_languages = set() if languages else set(LANGUAGE_NAMES.values())
    for conv in trace.conversations:
        for m in conv.messages:
            content = m.get("content")
            if m.get("role") != "assistant" or not isinstance(content, str):
                continue
            if content.startswith(PARTS_LABEL):
                # A list's parts ("Parts: English first; English second"): their subject is a name, the
                # part words are not. Renamed, a parts agent counts on after subjects of several tokens,
                # as a held-out " A" "f" "r" "ica" is; with only the real ones, mostly one token,
                # stage 28 put 0.07 on " third" after "Africa second; Africa" (trace version 12).
                subjects = {p.rsplit(" ", 1)[0] for p in list_items(content.removeprefix(PARTS_LABEL)) if " " in p}
                names.update(subjects - kept_languages)
            elif "; " in content and not any(c in content for c in "|{"):  # a list, not a table or a JSON plan
                names.update(p for p in list_items(content) if len(p) >= _LIST_ITEM_MIN)
    if languages and trace.task.meta.get("template") == "language_countries":
        names.add(LANGUAGE_NAMES[trace.task.meta["params"]["language"]])
    return sorted(names, key=len, reverse=True)  # longest first: "Guinea-Bissau" before "Guinea"


def fake_entity_copy(conv: Conversation, entities: list[str], seed: str,
                     names: FakeNames = "syllables", twin_share: float = 0.0, word_share: float = 0.0,
                     ) -> Conversation:
    """`conv` with `entities` and large numbers renamed consistently (see module doc; `names` picks how
    fake names are made, see `fake_name`; `twin_share` of them, where one exists, end like a fake name
    given earlier, see `twin_name`; `word_share` of the rest start with a word of a train-split name,
    see `word_name`); system prompts and tool definitions are left as they are."""
    if names not in FAKE_NAME_KINDS:
        raise ValueError(f"fake names {names!r}: choose from {list(FAKE_NAME_KINDS)}")
    for what, share in (("twin", twin_share), ("word", word_share)):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{what} share {share}: a share of fake names, from 0 up to (not including) 1")
        if share and names == "syllables":
            raise ValueError(f"{what} names are made of real train-split names: use fake names 'places' or "
                             "'places+countries'")
    rng = random.Random(seed)
    names_re = (re.compile(r"(?<!\w)(?:" + "|".join(re.escape(e) for e in entities) + r")(?!\w)")
                if entities else None)
    mapping: dict[str, str] = {}  # original name or number -> its stand-in, for the whole conversation
    taken: set[str] = set(entities)
    given: list[str] = []  # fake names given so far (not codes): what a twin may end like

    def new_name(original: str) -> str:
        is_code = bool(_CODE.fullmatch(original))  # a currency code stays a code
        name = None
        # No random draw without twins or word names: data built before they existed stays byte-identical.
        if twin_share and not is_code and given and rng.random() < twin_share:
            name = twin_name(rng, taken, rng.choice(given))
        if word_share and not is_code and name is None and rng.random() < word_share:
            name = word_name(rng, taken)
        if name is None:
            name = fake_name(rng, taken, original, names)
        if not is_code:
            given.append(name)
        return name

    def stand_in(original: str, make: Callable[[str], str]) -> str:
        if original not in mapping:
            mapping[original] = make(original)
        return mapping[original]

    def fix(text: str) -> str:
        if names_re is not None:
            text = names_re.sub(lambda m: stand_in(m.group(0), new_name), text)
        return GROUPED_NUMBER.sub(lambda m: stand_in(m.group(0), lambda n: fake_number(n, rng)), text)

    messages: list[dict[str, Any]] = []
    for m in conv.messages:
        m = dict(m)
        if m.get("role") != "system" and isinstance(m.get("content"), str):
            m["content"] = fix(m["content"])
        if isinstance(m.get("reasoning_content"), str):
            m["reasoning_content"] = fix(m["reasoning_content"])
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call["function"])
                # Arguments are JSON text: rename inside the decoded values so escaping stays valid.
                args = json.loads(fn["arguments"])
                fn["arguments"] = json.dumps({k: fix(v) if isinstance(v, str) else v for k, v in args.items()},
                                             ensure_ascii=False)
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        messages.append(m)
    return replace(conv, messages=messages, task_id=conv.task_id + "#fake")
