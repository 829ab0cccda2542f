"""Synthesised SFT traces: correct (item-F1 1.0), real search results, parseable tool calls, valid
plans, assistant-only loss masks, and no test-split entity anywhere."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from swarm.fan_out import chunk_text, chunks, list_items as fan_out_items, range_task, range_windows
from swarm.messages import compose_task_message

from model_shards.chat_template import IM_END, parse_assistant, render
from model_shards.tokenizer import ByteTokenizer
from planner.envs import get_env
from planner.envs.corpus import part_word
from planner.envs.geodata import split_of_country
from planner.plan_schema import parse_plan
from planner.traces import (
    CITY_CHUNK,
    PARTS_LABEL,
    TraceBuilder,
    TraceError,
    encode_conversation,
    length_stats,
    list_items,
    synthesize,
)
from swarm.dag import validate_plan
from swarm.orchestrator import AssignTaskArgs, CreateSubagentArgs
from swarm.plans import Limits
from swarm.row_filter import filter_answer
from workers.tools.search import SearchArgs, format_hits, search_corpus

ARG_MODELS = {"search": SearchArgs, "create_subagent": CreateSubagentArgs, "assign_task": AssignTaskArgs}


@pytest.fixture(scope="module")
def env():
    return get_env("widegeo")


@pytest.fixture(scope="module")
def traced(env):
    tasks = env.tasks("train", 8, seed=7)  # 2 tasks of each of the 4 templates
    traces, report = synthesize(env, tasks)
    return tasks, traces, report


def _convs(traced):
    return [c for tr in traced[1] for c in tr.conversations]


def _is_parts(c) -> bool:
    """A continent plan's first sub-agent: it names the list's parts (copied from its contents)."""
    return c.kind == "subagent" and "name its parts" in c.messages[1]["content"]


def _sections(answer: str) -> dict[str, str]:
    """A "concat" answer's result per node id ("## <id> (<name>)" headings, swarm.messages)."""
    out = {}
    for block in ("\n\n" + answer).split("\n\n## ")[1:]:
        head, _, body = block.partition("\n")
        out[head.split(" ")[0]] = body
    return out


def test_most_tasks_give_traces_of_every_kind(traced):
    tasks, traces, report = traced
    assert report.tasks_seen == 8 and report.tasks_used == len(traces) >= 6
    kinds = {c.kind for c in _convs(traced)}
    assert {"subagent", "orchestrator_tools", "orchestrator_plan"} <= kinds
    assert {tr.task.meta["template"] for tr in traces} == {"continent_countries", "top_cities", "neighbours",
                                                           "language_countries"}


def test_final_answers_score_full_item_f1(env, traced):
    for tr in traced[1]:
        assert env.score(tr.task, tr.tool_form_answer).item_f1 == 1.0, tr.task.id
        assert env.score(tr.task, tr.plan_answer).item_f1 == 1.0, tr.task.id
        tool_convs = [c for c in tr.conversations if c.kind == "orchestrator_tools"]
        for c in tool_convs:
            assert c.messages[-1]["content"] == tr.tool_form_answer
        for c in tr.conversations:
            if c.kind == "aggregate":
                assert env.score(tr.task, c.messages[-1]["content"]).item_f1 == 1.0


def test_list_answers_copy_the_order_their_results_show(traced):
    """A lister writes names in the order its search results list them (a copy; never a sort)."""
    listers = [c for c in _convs(traced) if c.kind == "subagent" and "separated by '; '" in c.messages[1]["content"]
               and not _is_parts(c)]
    assert {c.template for c in listers} >= {"neighbours", "continent_countries"}
    for c in listers:
        shown = "\n".join(m["content"] for m in c.messages if m["role"] == "tool")
        names = list_items(c.messages[-1]["content"])
        # Where each name stands as a list item (after ": ", "; " or ", "), not inside a longer name.
        positions = [next((m.start() for m in re.finditer(rf"(?<=[:;,] ){re.escape(n)}(?=[;,.])", shown)), -1)
                     for n in names]
        assert -1 not in positions, (c.task_id, names)
        assert positions == sorted(positions), (c.task_id, names)


def test_parts_listers_copy_every_part_of_the_list_from_its_contents(env, traced):
    """Version 8: the first agent of a continent plan searches the list's contents document and
    copies its "Parts: Africa first; Africa second; Africa third", one word per part document of the list
    in the corpus, each after the list's subject (version 12).
    A language task also names its language's own list's parts (mostly one part; version 7)."""
    docs = [json.loads(line)["id"] for line in env.corpus_path().read_text().splitlines()]
    parts = [c for c in _convs(traced) if _is_parts(c)]
    assert {c.template for c in parts} == {"continent_countries", "language_countries", "neighbours", "top_cities"}
    assert any(" is spoken " in c.messages[1]["content"] for c in parts)
    # A task without parts of its own gives one parts conversation of a list of two parts or more
    # (version 12): counting on "first; Europe" -> "second" is learnt on these too.
    for tr in traced[1]:
        if tr.task.meta["template"] in ("neighbours", "top_cities"):
            (extra,) = [c for c in tr.conversations if _is_parts(c)]
            assert extra.messages[-1]["content"].count("; ") >= 1
    for c in parts:
        shown = "\n".join(m["content"] for m in c.messages if m["role"] == "tool")
        prefix = re.search(r"id=(list:\w+:\w+:)contents", shown).group(1)
        n = sum(re.fullmatch(re.escape(prefix) + r"\d+", d) is not None for d in docs)
        answer = c.messages[-1]["content"]
        subject = re.search(r"list of countries and territories (?:of (.+?)|where (.+?) is spoken) and name",
                            c.messages[1]["content"])
        subject = subject.group(1) or subject.group(2)
        assert answer == PARTS_LABEL + "; ".join(f"{subject} {part_word(k)}" for k in range(1, n + 1))
        assert answer + "." in shown  # a copy of what the search showed


def test_a_part_lister_searches_the_part_it_receives_after_the_lists_subject(traced):
    """Version 12: a part lister receives "Parts: Europe second" and searches "Countries and territories
    of Europe second part": the part word follows the subject in both, so it is copied, not guessed."""
    checked = 0
    for c in _convs(traced):
        line = re.search(r"\nParts: (.+)\n", c.messages[1]["content"]) if c.kind == "subagent" else None
        if line is None:
            continue
        item = line.group(1)
        subject, word = item.rsplit(" ", 1)
        assert word in ("first", "second", "third") and f"countries and territories of {subject} " in c.messages[1]["content"]
        query = json.loads(c.messages[2]["tool_calls"][0]["function"]["arguments"])["query"]
        assert query.endswith(f" of {item} part"), query
        checked += 1
    assert checked >= 3


def test_plans_validate_and_parse_back(traced):
    for tr in traced[1]:
        plan = tr.plan.to_swarm_plan()
        validate_plan(plan, Limits(), {"search"})
        for c in tr.conversations:
            if c.kind == "orchestrator_plan":
                parsed = parse_plan(c.messages[-1]["content"])
                assert [s.id for s in parsed.subagents] == [s.id for s in plan.subagents]
                assert [s.task for s in parsed.subagents] == [s.task for s in plan.subagents]


def test_listing_plans_fan_out_over_the_listers_answer_as_the_runtime_does(traced):
    """Every for_each node of a listing plan (a continent's part listers, every filler): each copy's
    conversation opens with exactly the message swarm.fan_out renders for its chunk of its source's
    answer, in chunk order; the part listers' lists merge into the one the filler splits."""
    seen = set()
    for tr in traced[1]:
        t = tr.task.meta["template"]
        if t == "top_cities":
            continue
        nodes = tr.plan.to_swarm_plan().subagents
        answers = _sections(tr.plan_answer)
        assert [n.for_each is not None for n in nodes] == ([False, True] if t == "neighbours" else [False, True, True])
        for node in nodes:
            if node.for_each is None:
                continue
            source = next(n for n in nodes if n.id == node.for_each.source)
            assert source is nodes[nodes.index(node) - 1]
            label, items = fan_out_items(answers[source.id])
            expected = [compose_task_message(node.task, [(source, chunk_text(label, part))])
                        for part in chunks(items, node.for_each.chunk)]
            copies = [c.messages[1]["content"] for c in tr.conversations
                      if c.kind == "subagent" and c.messages[1]["content"].endswith("\n" + node.task)]
            # (a copy whose search showed a test-split country is dropped, like any such conversation)
            assert copies and all(c in expected for c in copies), tr.task.id
            assert [expected.index(c) for c in copies] == sorted(expected.index(c) for c in copies)
        if t != "neighbours":  # the part listers' lists, merged: the whole continent in list order
            listed = fan_out_items(answers[nodes[1].id])[1]
            assert len(listed) == len(set(listed)) >= len(tr.task.gold) and answers[nodes[1].id].startswith("Countries: ")
        seen.add(t)
    assert seen == {"continent_countries", "neighbours", "language_countries"}


def test_city_plans_are_one_range_agent_whose_windows_are_list_documents(traced):
    """Top-cities plans (version 6): one agent with for_range "all the N by CITY_CHUNK", N copied from the
    task; each window's conversation opens with the runtime's task for it and ends at its last rank;
    answered as the sub-agents wrote them ("concat"); no aggregation conversation."""
    cities = [tr for tr in traced[1] if tr.task.meta["template"] == "top_cities"]
    assert cities
    for tr in cities:
        n = tr.task.meta["params"]["n"]
        (agent,) = tr.plan.agents
        assert agent.for_range == f"all the {n} by {CITY_CHUNK}" and f" the {n} " in tr.task.prompt
        (node,) = tr.plan.to_swarm_plan().subagents
        # Version 8: a window copied past its last rank (to its document's end) loses the extra rows.
        assert agent.keep == f"rank at most {n}"
        overrun = "| rank | city | population |\n|---|---|---|\n" + "".join(f"| {r} | X{r} | 1 |\n" for r in range(1, n + 3))
        kept, _ = filter_answer(node.keep_rows, overrun)
        assert [line.split("|")[1].strip() for line in kept.splitlines()[2:]] == [str(r) for r in range(1, n + 1)]
        windows = range_windows(node.for_range)
        assert windows[0][0] == 1 and windows[-1][1] == n
        convs = [c for c in tr.conversations if c.kind == "subagent" and not _is_parts(c)]
        tasks = [range_task(node.task, s, e) for s, e in windows]
        # every window that stops inside its document stays; those ending at a document's end are
        # thinned (version 7), so that stopping at the asked rank is not outweighed
        shown = [tasks.index(c.messages[1]["content"]) for c in convs]
        assert shown == sorted(set(shown))
        assert {k for k, (_, e) in enumerate(windows) if e % CITY_CHUNK} <= set(shown)
        assert tr.balanced_out == len(windows) - len(convs)
        for c, (s, e) in zip(convs, [windows[k] for k in shown]):
            searches = [m for m in c.messages if m["role"] == "tool"]
            assert len(searches) == 1 and f"ranks {s} to" in searches[0]["content"]  # one document
            header, *_, last = c.messages[-1]["content"].splitlines()
            assert header == "| rank | city | population |" and last.startswith(f"| {e} |")
        assert tr.plan.aggregate == "concat"
        assert not [c for c in tr.conversations if c.kind == "aggregate"]


def test_language_chunks_that_keep_no_country_are_mostly_left_out(traced):
    """A language filter keeps nobody in most chunks of three: those conversations are thinned so the
    policy does not learn the empty answer; every other template keeps all of its chunks."""
    for tr in traced[1]:
        t = tr.task.meta["template"]
        if t == "top_cities":
            continue
        filler = tr.plan.to_swarm_plan().subagents[-1]
        chunk_convs = [c for c in tr.conversations if c.kind == "subagent" and (
            c.messages[1]["content"].endswith("\n" + filler.task) or c.messages[1]["content"].startswith("Look up"))]
        listed = fan_out_items(_sections(tr.plan_answer)[filler.for_each.source])[1]
        n_chunks = 2 * len(chunks(listed, 3))  # tool-form lookups and plan-form copies
        # (conversations that showed a test-split country are dropped as well)
        assert len(chunk_convs) + tr.balanced_out + tr.dropped_conversations >= n_chunks
        empty = [c for c in chunk_convs if not fan_out_items(c.messages[-1]["content"])[1]]
        if t == "language_countries":
            assert tr.balanced_out > 0, tr.task.id
            assert len(empty) <= len(chunk_convs) / 2, tr.task.id
            assert len(chunk_convs) > len(empty)  # the chunks that keep a speaker all stay
        else:
            assert tr.balanced_out == 0


def test_tool_calls_parse_back_with_valid_arguments(traced):
    n_calls = 0
    for c in _convs(traced):
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in c.tools or []}
        text = render(c.messages, c.tools, add_generation_prompt=False)
        bodies = [b.split(IM_END)[0] for b in text.split("<|im_assistant|>assistant<|im_middle|>")[1:]]
        assistants = [m for m in c.messages if m["role"] == "assistant"]
        assert len(bodies) == len(assistants)
        for body, msg in zip(bodies, assistants):
            content, _, calls = parse_assistant(body)
            want = msg.get("tool_calls") or []
            assert [k["name"] for k in calls] == [w["function"]["name"] for w in want]
            assert content == (msg["content"] or "").strip()
            for call in calls:
                assert call["name"] in offered
                args = json.loads(call["arguments"])
                jsonschema.validate(args, offered[call["name"]])  # the schema the model was shown
                ARG_MODELS[call["name"]].model_validate(args)  # what the runtime accepts
                n_calls += 1
    assert n_calls > 50


def test_tool_results_are_the_real_search_output_and_answers_copy_them(env, traced):
    corpus = env.corpus_path()
    checked = 0
    for c in _convs(traced):
        if c.kind != "subagent" or _is_parts(c):  # (checked in test_parts_listers_...)
            continue
        calls = {call["id"]: json.loads(call["function"]["arguments"])
                 for m in c.messages if m["role"] == "assistant" for call in m.get("tool_calls") or []}
        results = [m for m in c.messages if m["role"] == "tool"]
        assert results, "a sub-agent trace searches before answering"
        for m in results:
            args = calls[m["tool_call_id"]]
            assert m["content"] == format_hits(search_corpus(corpus, args["query"], args["k"]), args["query"])
        seen = "\n".join(m["content"] for m in results)
        answer = c.messages[-1]["content"]
        cells = [cell.strip() for line in answer.splitlines()[2:] for cell in line.strip("|").split("|")] \
            if answer.startswith("|") else list_items(answer)
        for cell in cells:
            assert cell in seen, f"{cell!r} is not in the search results"
            checked += 1
    assert checked > 100


def test_loss_mask_covers_exactly_the_assistant_tokens(traced):
    tok = ByteTokenizer()
    for c in _convs(traced)[:40]:
        ex = encode_conversation(c, tok)
        assert len(ex.ids) == len(ex.mask)
        masked = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
        unmasked = tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m])
        assistants = [m for m in c.messages if m["role"] == "assistant"]
        assert masked.count(IM_END) == len(assistants)
        assert "<|im_system|>" not in masked and "<|im_user|>" not in masked and "<|im_assistant|>" not in masked
        for m in assistants:
            assert (m["content"] or "") in masked
            for call in m.get("tool_calls") or []:
                assert call["function"]["arguments"] in masked
        for m in c.messages:
            if m["role"] in ("system", "user", "tool"):
                assert m["content"] not in masked
                assert m["content"] in unmasked
        # Masked plus unmasked text is the whole rendering.
        assert sorted(masked + unmasked) == sorted(render(c.messages, c.tools, add_generation_prompt=False))


def test_no_test_split_entity_in_any_trace(env, traced):
    data = env.data
    text = json.dumps([c.messages for c in _convs(traced)], ensure_ascii=False)
    test_iso = {c.iso for c in data.countries.values() if split_of_country(data, c.iso) == "test"}
    assert not any(f"country:{iso}" in text or f"list:cities:{iso}:" in text for iso in test_iso)
    # Test countries whose names are not part of any train country's name must not appear at all.
    train_names = [c.name for c in data.countries.values() if c.iso not in test_iso]
    for iso in test_iso:
        name = data.countries[iso].name
        if not any(name in t for t in train_names):
            assert not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text), name
    # Entities of the held-out evaluation set never appear as document ids.
    for task in env.eval_set("v1"):
        for iso in task.meta["entities"]["countries"]:
            assert f"id=country:{iso}" not in text
        for city in task.meta["entities"]["cities"]:
            assert f"id=city:{city} " not in text


def test_test_tasks_are_refused(env):
    test_task = env.tasks("test", 1, seed=0)[0]
    with pytest.raises(TraceError, match="train tasks only"):
        synthesize(env, [test_task])
    with pytest.raises(TraceError, match="train tasks only"):
        TraceBuilder(env).build(test_task)


def test_test_tasks_can_be_traced_for_measurement_only(env):
    # planner.probe --teacher-forced scores a policy on the held-out tasks' oracle traces.
    tasks = env.eval_set()[:6]
    traces, report = synthesize(env, tasks, allow_test=True)
    assert report.tasks_used >= 4 and report.leaky_conversations == 0
    for tr in traces:
        assert tr.task.split == "test" and tr.conversations
        final = [m["content"] for c in tr.conversations if c.kind == "orchestrator_tools" for m in c.messages
                 if m["role"] == "assistant" and m.get("content")][-1:]
        assert all(env.score(tr.task, f).item_f1 == 1.0 for f in final)


def test_length_stats_report_every_kind(traced):
    tok = ByteTokenizer()
    examples = [encode_conversation(c, tok) for c in _convs(traced)]
    stats = length_stats(examples)
    assert set(stats) == {e.kind for e in examples}
    for kind, s in stats.items():
        lens = sorted(len(e) for e in examples if e.kind == kind)
        assert s["count"] == len(lens) and s["min"] == lens[0] and s["max"] == lens[-1]
        assert s["min"] <= s["median"] <= s["p90"] <= s["max"]


def test_synthesis_in_worker_processes_gives_the_same_traces(env, traced):
    tasks, traces, report = traced
    par_traces, par_report = synthesize(env, tasks, workers=2)
    assert par_report.as_dict() == report.as_dict()
    assert [c.messages for tr in par_traces for c in tr.conversations] == \
        [c.messages for tr in traces for c in tr.conversations]


def test_spaced_names_put_every_copied_name_after_a_space(env, traced):
    from planner.augment import task_entities
    from planner.traces import LIST_LABEL, list_items

    tasks, plain, _ = traced
    spaced, report = synthesize(env, tasks, spaced_names=True)
    assert report.tasks_used == len(plain)
    lists = queries = 0
    for sp, pl in zip(spaced, plain):
        assert sp.task.id == pl.task.id
        assert env.score(sp.task, sp.plan_answer).item_f1 == 1.0
        names = task_entities(sp)
        for c_sp, c_pl in zip(sp.conversations, pl.conversations):
            if c_sp.kind != "subagent":
                continue
            answer, plain_answer = c_sp.messages[-1]["content"], c_pl.messages[-1]["content"]
            if answer.startswith(PARTS_LABEL):  # names no country
                assert answer == plain_answer
            elif not answer.startswith("|"):  # a list: labelled, the same names in the same order
                assert answer.startswith(LIST_LABEL) and list_items(answer) == list_items(plain_answer)
                lists += 1
            for m in c_sp.messages:
                for call in m.get("tool_calls") or []:
                    q = json.loads(call["function"]["arguments"])["query"]
                    assert not any(q.startswith(n) for n in names), q
                    queries += 1
    assert lists >= 4 and queries > 20


def test_filtering_plans_state_the_condition_as_keep_and_their_copies_write_every_row(traced):
    """Trace version 5: a continent or language plan's filler carries the task's condition as a keep
    filter; each copy's table has a row per country of its chunk (with the column the filter reads),
    and only the runtime's filter decides which rows stay, giving exactly the gold rows."""
    from swarm.row_filter import filter_answer

    seen = set()
    for tr in traced[1]:
        t = tr.task.meta["template"]
        if t not in ("continent_countries", "language_countries"):
            continue
        *_, filler = tr.plan.to_swarm_plan().subagents
        keep = filler.keep_rows
        assert keep is not None and keep.column == ("population" if t == "continent_countries" else "languages")
        assert keep.op == (">" if t == "continent_countries" else "contains")
        # written in the task's own words, so the value follows the word it follows in the task
        phrase = tr.plan.agents[-1].keep
        assert phrase.split(" ", 1)[1] in tr.task.prompt, (phrase, tr.task.prompt)
        assert keep.column in filler.task and "Keep only" not in filler.task
        for c in tr.conversations:
            if c.kind == "subagent" and c.messages[1]["content"].endswith(filler.task):
                chunk = fan_out_items(c.messages[1]["content"].split("\n\n")[1].split("\n", 1)[1])[1]
                table = c.messages[-1]["content"]
                assert len(table.splitlines()) == 2 + len(chunk) and keep.column in table.splitlines()[0]
        gold = {r["country"] for r in tr.task.gold}
        rows = [ln.split("|")[1].strip() for ln in filter_answer(keep, tr.plan_answer)[0].splitlines()
                if ln.startswith("| ") and "---" not in ln and not ln.startswith("| country")]
        assert set(rows) == gold and len(rows) == len(gold), tr.task.id
        seen.add(t)
    assert seen == {"continent_countries", "language_countries"}


def test_a_neighbours_lister_copies_the_countrys_own_list(traced) -> None:
    """Trace version 11: the lister searches the words of its task and copies the list document's
    names as they stand ("A; B; C"), not the comma-separated field of the country document."""
    seen = 0
    for tr in traced[1]:
        if tr.task.meta["template"] != "neighbours":
            continue
        lister = next(c for c in tr.conversations if c.kind == "subagent"
                      and c.messages[1]["content"].startswith("List the countries that share a land border with "))
        subject = lister.messages[1]["content"].removeprefix("List the countries that share a land border with ").split(".")[0]
        call = lister.messages[2]["tool_calls"][0]["function"]
        assert json.loads(call["arguments"])["query"] == f"Countries that share a land border with {subject}"
        result, answer = lister.messages[3]["content"], lister.messages[-1]["content"]
        assert "id=list:neighbours:" in result
        names = answer.removeprefix("Countries: ")
        assert f"Countries that share a land border with {subject}: {names}." in result
        seen += 1
    assert seen
