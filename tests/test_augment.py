"""planner.augment: fake-entity copies rename a task's entities and numbers consistently."""

from __future__ import annotations

import json
import random
import re

import pytest

from planner.envs.widegeo import task_subject
from planner.augment import (country_names, fake_entity_copy, fake_name, fake_number, place_names, task_entities,
                             name_words, twin_name, word_name)
from planner.envs.geodata import LANGUAGE_NAMES, fold, load_geodata, split_of_country
from planner.envs import get_env
from planner.traces import Conversation, synthesize


@pytest.fixture(scope="module")
def traces():
    env = get_env("widegeo")
    out, _ = synthesize(env, env.tasks("train", 6, seed=5))
    return out


def _texts(conv):
    for m in conv.messages:
        if isinstance(m.get("content"), str):
            yield m["role"], m["content"]
        if isinstance(m.get("reasoning_content"), str):  # a filtering sub-agent's <think> part
            yield "reasoning", m["reasoning_content"]
        for call in m.get("tool_calls") or []:
            yield "call", call["function"]["arguments"]


def test_numbers_keep_their_shape_and_order_of_magnitude():
    rng = random.Random(0)
    for text in ["5,617,758", "183,658,300", "1,000", "20,000,000"]:
        new = fake_number(text, rng)
        assert len(new) == len(text) and new[0] == text[0] and [i for i, c in enumerate(new) if c == ","] == \
            [i for i, c in enumerate(text) if c == ","]
    taken: set[str] = set()
    codes = {fake_name(rng, taken, "EUR") for _ in range(20)}
    assert all(re.fullmatch(r"[A-Z]{3}", c) for c in codes) and len(codes) == 20
    assert all(re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)?", fake_name(rng, taken)) for _ in range(20))


def test_fake_copies_rename_every_entity_consistently(traces):
    checked = 0
    for tr in traces:
        entities = task_entities(tr)
        assert entities and all(len(e) >= 3 for e in entities)
        # The subject is renamed too: a held-out task's country or continent has to be copied.
        assert task_subject(tr.task) in entities
        for i, conv in enumerate(tr.conversations):
            fake = fake_entity_copy(conv, entities, f"t/{i}")
            assert fake_entity_copy(conv, entities, f"t/{i}") == fake  # seeded: deterministic
            assert fake.task_id == conv.task_id + "#fake" and len(fake.messages) == len(conv.messages)
            assert fake.messages[0] == conv.messages[0]  # the system prompt is never touched
            texts = [t for _, t in _texts(fake)]
            for role, t in _texts(fake):
                if role == "call":
                    json.loads(t)  # arguments stay valid JSON
            joined = "\n".join(texts)
            for e in entities:
                assert not re.search(r"(?<!\w)" + re.escape(e) + r"(?!\w)", joined), (e, conv.kind)
            # Whatever a final answer states was shown to the agent: each cell of an answer table
            # appears in the user task or tool results (the copy the model has to learn).
            answer = fake.messages[-1]["content"] if fake.messages[-1]["role"] == "assistant" else ""
            if conv.kind == "subagent" and answer.startswith("|"):
                seen = "\n".join(m["content"] for m in fake.messages if m["role"] in ("user", "tool"))
                cells = [c.strip() for row in answer.splitlines()[2:] for c in row.strip("|").split("|")]
                # (a fan-out copy whose countries all fail the filter answers with the header only)
                assert all(c in seen for c in cells if c), answer
                checked += 1
    assert checked >= 3


def test_place_names_are_train_split_cities_and_never_a_test_entity():
    data = load_geodata()
    pool = place_names()
    assert len(pool) > 10_000 and len(set(pool)) == len(pool)
    test = {fold(c.name) for c in data.countries.values() if split_of_country(data, c.iso) == "test"}
    test |= {fold(c.name) for c in data.cities.values() if split_of_country(data, c.country) == "test"}
    assert not test & {fold(n) for n in pool}
    assert "Aachen" in pool and "Gaborone" not in pool  # a German city; Botswana's capital is held out


def test_place_fake_names_are_drawn_from_the_pool_and_unique(traces):
    rng, taken = random.Random(1), set()
    names = [fake_name(rng, taken, kind="places") for _ in range(200)]
    assert len(set(names)) == 200 and set(names) <= set(place_names())
    tr = traces[0]
    entities = task_entities(tr)
    conv = next(c for c in tr.conversations if c.kind == "subagent")
    fake = fake_entity_copy(conv, entities, "p/0", names="places")
    joined = "\n".join(t for _, t in _texts(fake))
    assert not any(re.search(r"(?<!\w)" + re.escape(e) + r"(?!\w)", joined) for e in entities)
    assert any(n in joined for n in place_names())  # the subject now reads as some train-split city
    with pytest.raises(ValueError, match="fake names 'emoji'"):
        fake_entity_copy(conv, entities, "p/0", names="emoji")  # type: ignore[arg-type]


def test_fake_languages_renames_the_language_of_a_language_task():
    from planner.envs.geodata import LANGUAGE_NAMES

    env = get_env("widegeo")
    task = next(t for t in env.tasks("train", 40, seed=3) if t.meta["template"] == "language_countries")
    trace = synthesize(env, [task])[0][0]
    lang = LANGUAGE_NAMES[task.meta["params"]["language"]]
    assert lang not in task_entities(trace) and lang in task_entities(trace, languages=True)
    checked = 0
    for conv in trace.conversations:
        text = json.dumps([m.get("content") for m in conv.messages[1:]], ensure_ascii=False)
        if lang not in text:
            continue
        checked += 1
        fake = fake_entity_copy(conv, task_entities(trace, languages=True), "s", "places")
        renamed = json.dumps([m.get("content") for m in fake.messages[1:]], ensure_ascii=False)
        assert not re.search(rf"(?<!\w){re.escape(lang)}(?!\w)", renamed), conv.kind
    assert checked >= 2  # the lister and the plan name the language at least


def test_places_and_countries_fake_names_mix_train_countries_in(traces):
    data = load_geodata()
    countries = set(country_names())
    train = {c.name for c in data.countries.values() if split_of_country(data, c.iso) == "train"}
    test = {fold(n) for c in data.countries.values() if split_of_country(data, c.iso) == "test"
            for n in (c.name, c.capital, c.currency_name)}
    assert {"Greece", "Fiji", "Latvia"} <= countries and not test & {fold(n) for n in countries}
    assert len(countries & train) > 100
    rng, names = random.Random(3), []
    for _ in range(20):  # 20 conversations of 30 names: unique within each
        taken: set[str] = set()
        drawn = [fake_name(rng, taken, kind="places+countries") for _ in range(30)]
        assert len(set(drawn)) == 30 and set(drawn) <= countries | set(place_names())
        names += drawn
    share = sum(n in countries for n in names) / len(names)
    assert 0.25 < share < 0.42  # about COUNTRY_NAME_SHARE (1/3); the rest are train-split city names
    tr = traces[0]
    conv = next(c for c in tr.conversations if c.kind == "subagent")
    fake = fake_entity_copy(conv, task_entities(tr), "pc/0", names="places+countries")
    joined = "\n".join(t for _, t in _texts(fake))
    assert not any(re.search(r"(?<!\w)" + re.escape(e) + r"(?!\w)", joined) for e in task_entities(tr))


def test_the_parts_of_a_list_keep_their_words(traces):
    """A parts agent answers "Parts: Africa first; Africa second": the part words, which each part's
    title is searched by, are not names, so a fake copy keeps them; the subject before them is, and
    is renamed throughout the conversation."""
    from planner.traces import PARTS_LABEL

    checked = 0
    for tr in traces:
        entities = task_entities(tr, languages=True)  # as trained: a language's list is renamed too
        for i, conv in enumerate(tr.conversations):
            answer = conv.messages[-1]["content"]
            if conv.kind == "subagent" and answer.startswith(PARTS_LABEL):
                assert not {"first", "second", "Parts: first"} & set(entities)
                assert not any(e.endswith((" first", " second")) for e in entities)
                subject = answer.removeprefix(PARTS_LABEL).split("; ")[0].rsplit(" ", 1)[0]
                fake = fake_entity_copy(conv, entities, f"p/{i}")
                fake_answer = fake.messages[-1]["content"]
                fake_items = fake_answer.removeprefix(PARTS_LABEL).split("; ")
                assert [w.rsplit(" ", 1)[1] for w in fake_items] == [w.rsplit(" ", 1)[1] for w in
                                                                       answer.removeprefix(PARTS_LABEL).split("; ")]
                # The subject is a name: renamed (a held-out one is a rare, many-token word), and the
                # same way in the task text the parts agent read it from.
                assert subject in entities
                # Without --fake-languages a language stays itself, as in data built before version 12.
                assert (subject in task_entities(tr)) == (subject not in LANGUAGE_NAMES.values())
                fake_subject = fake_items[0].rsplit(" ", 1)[0]
                assert {w.rsplit(" ", 1)[0] for w in fake_items} == {fake_subject}
                assert fake_subject != subject and fake_subject in fake.messages[1]["content"]
                assert subject not in fake.messages[1]["content"]
                checked += 1
    assert checked >= 3


def test_twin_names_end_like_an_earlier_name_in_the_same_list():
    rng, taken = random.Random(0), {"Liberia"}
    twin = twin_name(rng, taken, "Liberia")
    assert twin != "Liberia" and twin[-4:].lower() == "eria" and twin in taken
    assert twin in set(place_names()) | set(country_names())
    assert twin_name(rng, set(), "Qx") is None  # too short to share an ending: the caller draws a plain fake

    # A lister's conversation: with twins, its copied list holds names that end alike, which without
    # twins it (almost) never does; the renaming stays consistent across the whole conversation.
    env = get_env("widegeo")
    task = next(t for t in env.tasks("train", 40, seed=18) if t.meta["template"] == "continent_countries")
    trace = synthesize(env, [task], spaced_names=True)[0][0]
    entities = task_entities(trace)
    lister = next(c for c in trace.conversations if c.kind == "subagent" and "part" in c.messages[1]["content"]
                  and c.messages[-1]["content"].startswith("Countries:"))

    def shared_endings(conv) -> int:
        items = conv.messages[-1]["content"].removeprefix("Countries:").strip(" .").split("; ")
        return sum(any(a[-4:].lower() == b[-4:].lower() for b in items[:i]) for i, a in enumerate(items))

    with_twins = [fake_entity_copy(lister, entities, f"t/{k}", "places+countries", twin_share=0.3) for k in range(5)]
    without = [fake_entity_copy(lister, entities, f"t/{k}", "places+countries") for k in range(5)]
    assert sum(map(shared_endings, with_twins)) >= 5 * sum(map(shared_endings, without)) + 10
    for fake in with_twins:
        answer_items = fake.messages[-1]["content"].removeprefix("Countries:").strip(" .").split("; ")
        tool_text = "\n".join(m["content"] for m in fake.messages if m["role"] == "tool")
        assert all(item in tool_text for item in answer_items)  # the answer still copies the results
        assert not set(answer_items) & set(entities)  # every listed name was renamed
    # Without twins or word names the data is what it was before they existed (no extra random
    # draw): this output was produced by the code of commit 4ee54fc.
    pinned = Conversation("subagent", "t", "continent_countries", [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "List the countries of Africa."},
        {"role": "tool", "content": "Countries of Africa: Liberia; Libya; Niger; Nigeria; Algeria (EUR); "
                                    "population 12,345,678."},
        {"role": "assistant", "content": "Countries: Liberia; Libya; Niger; Nigeria; Algeria"}])
    renamed = fake_entity_copy(pinned, ["Liberia", "Libya", "Nigeria", "Niger", "Algeria", "Africa", "EUR"],
                               "pin/0", "places+countries")
    assert renamed.messages[2]["content"] == ("Countries of Fennpfuhl: Ladner; Vicaria; Canary Wharf; Liechtenstein; "
                                              "India (GWE); population 18,929,519.")
    assert renamed.messages[3]["content"] == "Countries: Ladner; Vicaria; Canary Wharf; Liechtenstein; India"
    with pytest.raises(ValueError, match="twin names are made of real train-split names"):
        fake_entity_copy(lister, entities, "t/0", "syllables", twin_share=0.3)
    with pytest.raises(ValueError, match="twin share 1.0"):
        fake_entity_copy(lister, entities, "t/0", "places", twin_share=1.0)


def test_word_names_put_words_of_train_names_first():
    words = set(name_words())
    assert {"Republic", "Kingdom", "Saint"} <= words
    data = load_geodata()
    test = {fold(c.name) for c in data.countries.values() if split_of_country(data, c.iso) == "test"}
    assert not {fold(w) for w in words} & test  # "Guinea" or "Congo" would be a test name
    rng, taken = random.Random(4), set()
    names = [word_name(rng, taken) for _ in range(50)]
    assert len(set(names)) == 50 and set(names) <= taken
    assert all(n.split(" ", 1)[0] in words and n.split(" ", 1)[1] in place_names() for n in names)

    env = get_env("widegeo")
    task = next(t for t in env.tasks("train", 40, seed=18) if t.meta["template"] == "continent_countries")
    trace = synthesize(env, [task], spaced_names=True)[0][0]
    entities = task_entities(trace)
    lister = next(c for c in trace.conversations if c.kind == "subagent"
                  and c.messages[-1]["content"].startswith("Countries:"))
    items = fake_entity_copy(lister, entities, "w/0", "places+countries",
                             word_share=0.5).messages[-1]["content"].removeprefix("Countries:").strip(" .").split("; ")
    led = [i for i in items if i.split(" ", 1)[0] in words and " " in i]
    assert len(items) >= 10 and 0.2 * len(items) <= len(led) <= 0.85 * len(items)
    with pytest.raises(ValueError, match="word share 1.5"):
        fake_entity_copy(lister, entities, "w/0", "places", word_share=1.5)
