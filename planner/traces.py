"""Supervised traces for the built-in policy, synthesised from WideGeo TRAIN tasks.

For each task an oracle that knows the GeoNames records plays every role, but everything a model
would see is real: search calls run the real `search` tool over the real corpus and their results
are rendered exactly as the tool returns them (`format_hits`), and every value an answer states is
checked to be present in the search results it was read from. Conversations per task:

- sub-agent: task -> `search` calls with keyword queries -> tool results -> final answer (a markdown
  table, or a '; '-separated list of names for listing subtasks);
- orchestrator, tool form: `create_subagent` / `assign_task` calls (weakly parallel: lookups in
  chunks of 3 entities, city ranks in chunks of 10) -> the sub-agents' answers -> the final table;
- orchestrator, plan form: the task -> a compact JSON plan (planner.plan_schema): a lister, then a
  fan-out filler (`for_each`: one copy per 3 listed countries, swarm.fan_out) for listing tasks; one
  agent per 10 city ranks, concatenated, for top-cities tasks;
- aggregation: the plan's results -> one final table (plans with aggregate == "llm"; no plan of
  trace version 4 has one, so version 4 gives no such conversation).

Then `encode_conversation` renders a conversation with the Kimi chat template into token ids and a
loss mask that is 1 exactly on assistant-written tokens (never system, user or tool text).
Train tasks only: a trace that shows a test-split country (by name or by document id) is dropped.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from planner.envs.base import Task
from planner.envs.corpus import CITY_LIST_PART, NAME_LIST_PART, part_word, part_words
from planner.envs.geodata import (CONTINENT_NAMES, LANGUAGE_NAMES, Country, GeoData, format_int, language_name,
                                  split_of_continent, split_of_country)
from planner.plan_schema import CompactAgent, CompactPlan, compact_plan_json
from planner.prompts import PLAN_MODE_PROMPT, SUBAGENT_SYSTEM_PROMPT
from swarm.fan_out import (chunk_text, chunks, copy_id, copy_spec, list_items as fan_out_items, merge_results, range_task,
                           range_windows)
from swarm.messages import compose_task_message, concat_results
from swarm.orchestrator import ASSIGN_TASK, CREATE_SUBAGENT, orchestrator_system_prompt, orchestrator_tools
from swarm.plans import JobSpec
from swarm.row_filter import filter_answer
from workers.tools.search import CorpusIndex, SearchArgs, build_index, format_hits, make_search_tool
from model_shards.chat_template import render_segments

KINDS: tuple[str, ...] = ("subagent", "orchestrator_tools", "orchestrator_plan", "aggregate")

AGENT_NAME = "geo_researcher"
# Bumped whenever the traces built from the same tasks change (their form, or the search ranking they
# show): encoded data files are keyed by it, so a stale file is rebuilt, not reused.
TRACE_VERSION = 12
LOOKUP_CHUNK = 3  # entities per lookup sub-agent: each lookup shows ~600 characters of results
# City ranks per sub-agent: one list document each (CITY_LIST_PART ranks), so a copy never crosses
# from one search result to another, where stage 17's copies of 10 (windows 11-20, 21-30 ...) looped.
# Only a task's last window can stop inside a document, at the rank its task names (version 6); the
# windows that end where their document ends are kept one time in FULL_WINDOW_KEEP_EVERY (version 7):
# with all of them (~4 in 5 windows), stage 18 copied every window to its document's end, 3 cities
# asked for and 15 written.
CITY_CHUNK = CITY_LIST_PART
FULL_WINDOW_KEEP_EVERY = 4
PARTS_LABEL = "Parts: "
# A language filter keeps no country in two chunks of three out of three. Sub-agent conversations of
# language chunks that keep no country are kept only one time in EMPTY_KEEP_EVERY (chosen by a hash,
# so the data is reproducible): up to version 4 the policy learnt to answer every chunk with an empty
# table; since version 5 the copies write every row (the plan's keep filter drops rows), and thinning
# keeps language lookups from crowding out the rest.
EMPTY_KEEP_EVERY = 4
ATTR_WORDS = {"capital": "capital", "population": "population", "area_km2": "area",
              "currency": "currency", "continent": "continent", "languages": "languages"}
ATTR_TEXT = {"capital": "its capital", "population": "its population", "area_km2": "its area in km²",
             "currency": "its currency (ISO 4217 code)", "continent": "its continent", "languages": "its languages"}


class TraceError(ValueError):
    """A task cannot be turned into a correct trace (the reason names the task and the problem)."""


@dataclass
class Conversation:
    """One SFT example: OpenAI-format messages (assistant turns are the targets) and the tools offered."""

    kind: str
    task_id: str
    template: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class TaskTrace:
    """All conversations of one task, plus the final answers each orchestrator form produces."""

    task: Task
    conversations: list[Conversation]
    tool_form_answer: str  # the tool-form orchestrator's final message
    plan: CompactPlan
    plan_answer: str  # what the runtime returns for the plan (concat, or the aggregation's answer)
    dropped_conversations: int = 0  # conversations left out because they showed a test entity
    balanced_out: int = 0  # left out for balance: empty language chunks, city windows ending at a document end


@dataclass
class EncodedExample:
    kind: str
    task_id: str
    ids: list[int]
    mask: list[int]  # 1 where the token was written by the assistant

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------------- formatting

def _cell(value: Any) -> str:
    return format_int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _country_value(c: Country, col: str) -> Any:
    if col == "languages":  # as the country's document writes them
        return ", ".join(language_name(code) for code in c.languages)
    return {"country": c.name, "capital": c.capital, "population": c.population, "area_km2": c.area_km2,
            "currency": c.currency_code, "continent": c.continent_name}[col]


# --------------------------------------------------------------------------------- sub-agent oracle

@dataclass
class _SubAgentRun:
    """Builds one sub-agent conversation while running real searches."""

    index: CorpusIndex
    task_text: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    seen_text: str = ""
    n_calls: int = 0

    def __post_init__(self) -> None:
        self.messages = [{"role": "system", "content": SUBAGENT_SYSTEM_PROMPT},
                         {"role": "user", "content": self.task_text}]

    def step(self, searches: list[tuple[str, int]]) -> list[list[str]]:
        """One assistant message issuing `searches` in parallel; returns the doc ids each returned."""
        calls, results, ids = [], [], []
        for query, k in searches:
            args = SearchArgs(query=query, k=k)  # what the tool would validate
            cid = f"functions.search:{self.n_calls}"
            self.n_calls += 1
            hits = self.index.search(args.query, args.k)
            text = format_hits(hits, args.query)
            calls.append({"id": cid, "type": "function",
                          "function": {"name": "search", "arguments": json.dumps({"query": query, "k": k}, ensure_ascii=False)}})
            results.append({"role": "tool", "tool_call_id": cid, "name": "search", "content": text})
            ids.append([h.doc.id for h in hits])
            self.seen_text += "\n" + text
        self.messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        self.messages.extend(results)
        return ids

    def answer(self, text: str, needed: list[str]) -> str:
        """Final answer; every needed string must have been shown by the searches."""
        missing = [v for v in needed if v not in self.seen_text]
        if missing:
            raise TraceError(f"sub-agent answer needs {missing[:3]} which its searches did not show")
        self.messages.append({"role": "assistant", "content": text})
        return text


def _find_doc(index: CorpusIndex, doc_id: str, queries: list[str], max_k: int = 3) -> tuple[str, int]:
    """The first (query, k) with the smallest k whose results contain `doc_id`."""
    for k in range(1, max_k + 1):
        for q in queries:
            if any(h.doc.id == doc_id for h in index.search(q, k)):
                return q, k
    raise TraceError(f"no query among {queries} finds {doc_id} within {max_k} results")


# With `spaced_names`, every name a sub-agent copies follows a space, as it does in the documents it
# copies from: the BPE tokenises "Ethiopia" at the start of a message or a JSON string ("E"+"th"...)
# unlike " Ethiopia" in a result (" E"+"th"...), so a name written there cannot be copied token by
# token. List answers get a label; queries put the name after a word.
LIST_LABEL = "Countries: "


def _in_order(countries: list[Country], names: list[str]) -> list[Country]:
    """`countries` in the order of `names` (the lister's answer; the filler looks them up in it)."""
    by_name = {c.name: c for c in countries}
    return [by_name[n] for n in names]


def list_answer(names: list[str], spaced: bool = False) -> str:
    return (LIST_LABEL if spaced else "") + "; ".join(names)


def list_items(answer: str) -> list[str]:
    """The names of a list answer, either form."""
    return [p.strip() for p in answer.removeprefix(LIST_LABEL).split(";") if p.strip()]


def lookup_queries(name: str, words: str, spaced: bool = False) -> list[str]:
    return [f"{words} of {name}", f"about {name}"] if spaced else [f"{name} {words}", name]


def lookup_task_text(names: list[str], attrs: list[str]) -> str:
    cols = ["country", *attrs]
    return (f"Look up these countries: {'; '.join(names)}. For each give {_listing([ATTR_TEXT[a] for a in attrs])}."
            f" Answer with a markdown table whose columns are: {', '.join(cols)}.")


def run_lookup(index: CorpusIndex, countries: list[Country], attrs: list[str], task_text: str | None = None,
               spaced: bool = False) -> tuple[list[dict], str]:
    """Searches one country document per entity (all in one parallel step); the table has a row per
    entity with the country and `attrs`."""
    run = _SubAgentRun(index, task_text or lookup_task_text([c.name for c in countries], attrs))
    words = " ".join(ATTR_WORDS[a] for a in attrs)
    searches = [_find_doc(index, f"country:{c.iso}", lookup_queries(c.name, words, spaced)) for c in countries]
    run.step(searches)
    cols = ["country", *attrs]
    needed = [_cell(_country_value(c, col)) for c in countries for col in cols]
    table = markdown_table(cols, [[_country_value(c, col) for col in cols] for c in countries])
    return run.messages, run.answer(table, needed)


def run_paged_list(index: CorpusIndex, queries: list[str], doc_prefix: str, n_parts: int,
                   names: list[str], task_text: str, part_size: int = 25,
                   spaced: bool = False) -> tuple[list[dict], str, list[str]]:
    """A list spread over parts `doc_prefix`1..n: one search first (its title tells how many parts
    there are), then the parts still missing, in one parallel step. The answer lists the parts in
    the order the results showed them, so writing it is one sequential copy. Returns the messages,
    the answer and its names in that order."""
    run = _SubAgentRun(index, task_text)
    first = run.step([(queries[0], 1)])[0]
    parts = list(range(1, n_parts + 1))
    shown = [p for p in parts if f"{doc_prefix}{p}" in first]
    rest, fetched = [], []
    for p in parts:
        if p in shown:
            continue
        s, e = (p - 1) * part_size + 1, min(p * part_size, len(names))
        q, k = _find_doc(index, f"{doc_prefix}{p}", [f"{q0} {s} to {e}" for q0 in queries] + [f"{q0} part {p}" for q0 in queries], max_k=6)
        rest.append((q, k))
        fetched.append(p)
    if rest:
        run.step(rest)
    ordered = [n for p in shown + fetched for n in names[(p - 1) * part_size : p * part_size]]
    return run.messages, run.answer(list_answer(ordered, spaced), ordered), ordered


def city_task_text(country: str, start: int | str, end: int | str) -> str:
    # The rank column is the stopping cue: a row whose rank is `end` is the last one.
    return (f"List the cities of {country} ranked {start} to {end} by population in GeoNames, with the "
            f"population of each. Answer with a markdown table whose columns are: rank, city, population.")


def run_city_ranks(index: CorpusIndex, data: GeoData, iso: str, start: int, end: int) -> tuple[list[dict], str]:
    c = data.country(iso)
    cities = data.cities_of(iso)[start - 1 : end]
    run = _SubAgentRun(index, city_task_text(c.name, start, end))
    part_size = CITY_LIST_PART
    parts = range((start - 1) // part_size + 1, (end - 1) // part_size + 2)
    searches = []
    for p in parts:
        s, e = (p - 1) * part_size + 1, min(p * part_size, len(data.cities_of(iso)))
        # A window inside one document is searched with the task's own numbers (copied, not computed).
        own = [f"Most populous cities of {c.name} ranks {start} to {end}"] if len(parts) == 1 else []
        searches.append(_find_doc(index, f"list:cities:{iso}:{p}", [*own,
            f"Most populous cities of {c.name} ranks {s} to {e}", f"Cities of {c.name} by population ranks {s} to {e}",
            f"Most populous cities of {c.name}"], max_k=len(parts) + 4))
    run.step(searches)
    needed = [t.name for t in cities] + [format_int(t.population) for t in cities]
    table = markdown_table(["rank", "city", "population"],
                           [[start + i, t.name, t.population] for i, t in enumerate(cities)])
    return run.messages, run.answer(table, needed)


def parts_task_text(list_words: str) -> str:
    """The task of naming a list's parts; `list_words`: "countries and territories of Africa". The
    list is named after " of", where a plan copies a continent's name well: stages 20-21, whose
    parts task also named "the Africa list", wrote a name from memory after " the" (version 10)."""
    return (f"Find the contents of the alphabetical list of {list_words} and name its parts. "
            "Answer with the part words separated by '; '.")


def continent_parts_text(cname: str) -> str:
    return parts_task_text(f"countries and territories of {cname}")


def continent_part_text(cname: str) -> str:
    return (f"List the countries and territories of {cname} in the part of their alphabetical list that you "
            "receive. Answer with their names separated by '; '.")


def run_list_parts(index: CorpusIndex, doc_prefix: str, list_words: str, subject: str, n_parts: int
                   ) -> tuple[list[dict], str]:
    """One search for a list's contents document (`doc_prefix`contents), whose "Parts: Africa first;
    Africa second" the answer copies: the words a part's title is found by (version 8; before, the
    answer counted the parts from a part's "(first part of 3)", and stages 18-19 wrote names there
    instead), each after the list's subject, the cue its lister copies the word by (version 12)."""
    run = _SubAgentRun(index, parts_task_text(list_words))
    q, k = _find_doc(index, f"{doc_prefix}contents", [f"contents of the alphabetical list of {list_words}"], max_k=1)
    run.step([(q, k)])
    words = part_words(n_parts, subject)
    return run.messages, run.answer(PARTS_LABEL + words, [f"{PARTS_LABEL}{words}."])


def run_continent_part(index: CorpusIndex, code: str, cname: str, part: int, names: list[str], user: str
                       ) -> tuple[list[dict], str]:
    """One part of a continent's list: one search for it, its names copied in order. Labelled in
    either name form: the runtime merges the parts' lists into one only when they share a label."""
    run = _SubAgentRun(index, user)
    word = part_word(part)
    run.step([_find_doc(index, f"list:continent:{code}:{part}", [f"Countries and territories of {cname} {word} part",
                                                                f"{cname} {word} part"], max_k=3)])
    return run.messages, run.answer(list_answer(names, spaced=True), names)


def _keep_one_in(task_id: str, key: str, every: int = EMPTY_KEEP_EVERY) -> bool:
    """Whether a conversation thinned for balance stays in the data: one in `every`, by a stable hash
    (Python's hash() is salted per process)."""
    return zlib.crc32(f"{task_id}/{key}".encode()) % every == 0


# --------------------------------------------------------------------------------- per-template plans

@dataclass
class _SubTask:
    """One assignment: its id in the swarm, its task text, its conversation and answer."""

    id: str
    task: str
    messages: list[dict[str, Any]]
    answer: str
    depends_on: list[str] = field(default_factory=list)


class TraceBuilder:
    """Synthesises TaskTraces for WideGeo train tasks over one corpus."""

    def __init__(self, env: Any, corpus_path: str | Path | None = None, spaced_names: bool = False) -> None:
        if getattr(env, "name", None) != "widegeo":
            raise ValueError(f"TraceBuilder supports the 'widegeo' environment, got {getattr(env, 'name', env)!r}")
        self.env = env
        self.data: GeoData = env.data
        self.corpus_path = Path(corpus_path) if corpus_path else env.corpus_path()
        self.index = build_index(self.corpus_path)
        self.search_tools = [make_search_tool(str(self.corpus_path)).spec().to_openai()]
        self.orch_tools = [t.to_openai() for t in orchestrator_tools()]
        self.test_names = _test_country_names(self.data)
        self.spaced = spaced_names

    # ---- stage builders --------------------------------------------------------------------
    def _lookups(self, countries: list[Country], attrs: list[str], prefix: str) -> list[_SubTask]:
        """The tool form's lookup sub-agents: LOOKUP_CHUNK countries each, every row written (the
        orchestrator filters when it writes the final table)."""
        out = []
        for i in range(0, len(countries), LOOKUP_CHUNK):
            chunk = countries[i : i + LOOKUP_CHUNK]
            text = lookup_task_text([c.name for c in chunk], attrs)
            msgs, ans = run_lookup(self.index, chunk, attrs, text, self.spaced)
            out.append(_SubTask(f"{prefix}-{len(out) + 1}", text, msgs, ans))
        return out

    def _lister(self, task: Task) -> tuple[str, list[dict], str, list[Country]]:
        """(task text, conversation, answer, countries) of the listing subtask of a non-city template."""
        p = task.meta["params"]
        t = task.meta["template"]
        if t == "neighbours":
            subj = self.data.country(p["country"])
            # In the order the country's document lists them: a copy, not a sort, which a small
            # model cannot do (sorted, the first name is a guess among the capital letters).
            names = self.data.neighbours_of(subj.iso)
            text = (f"List the countries that share a land border with {subj.name}. "
                    "Answer with their names separated by '; '.")
            run = _SubAgentRun(self.index, text)
            fallback = f"about {subj.name}" if self.spaced else subj.name
            run.step([_find_doc(self.index, f"list:neighbours:{subj.iso}", [f"Countries that share a land border with {subj.name}", fallback])])
            ans = run.answer(list_answer([c.name for c in names], self.spaced), [c.name for c in names])
            return text, run.messages, ans, names
        if t in ("continent_countries", "language_countries"):
            # Language tasks list the continent too (at most 58 names, where a language's own list
            # runs to 125); the fillers then keep the countries that speak it.
            code = p["continent"]
            members = self.data.countries_in(code)
            cname = CONTINENT_NAMES[code]
            text = f"List all countries and territories of {cname}. Answer with their names separated by '; '."
            n_parts = math.ceil(len(members) / NAME_LIST_PART)
            msgs, ans, order = run_paged_list(self.index, [f"Countries and territories of {cname} alphabetical",
                                                   f"Countries and territories of {cname}"],
                                       f"list:continent:{code}:", n_parts, [c.name for c in members], text,
                                       spaced=self.spaced)
            return text, msgs, ans, _in_order(members, order)
        raise TraceError(f"task {task.id}: template {t!r} has no listing subtask")

    def _filter(self, task: Task) -> tuple[list[str], Any, str | None]:
        """(lookup attributes, row predicate, the plan's keep filter) of a listing template. The filter
        is written in the task's own words ("... of more than 5,000,000", "have English among ..."),
        so the policy copies the value after the word that precedes it in the task: teacher-forced,
        stage 17 wrote bare values' first token from memory ("5" for every threshold)."""
        p = task.meta["params"]
        attrs = [c for c in task.columns if c != "country"]
        t = task.meta["template"]
        if t == "continent_countries":
            lookup = attrs if "population" in attrs else ["population", *attrs]
            thr = p["min_population"]
            return lookup, (lambda c: c.population > thr), f"population more than {format_int(thr)}"
        if t == "language_countries":
            code = p["language"]
            lang = LANGUAGE_NAMES[code]
            return ["languages", *attrs], (lambda c: code in c.languages), f"languages have {lang}"
        return attrs, None, None

    # ---- one task ----------------------------------------------------------------------------
    def build(self, task: Task, allow_test: bool = False) -> TaskTrace:
        """The oracle trace of `task`. `allow_test` (measurement only, never training data) builds
        traces of test-split tasks too, keeping the test entities they must show."""
        if task.split != "train" and not allow_test:
            raise TraceError(f"task {task.id} is from the {task.split!r} split: traces use train tasks only")
        if task.env != "widegeo":
            raise TraceError(f"task {task.id} belongs to env {task.env!r}, not 'widegeo'")
        t = task.meta["template"]
        if t == "top_cities":
            trace = self._build_cities(task)
        else:
            trace = self._build_listing(task)
        if t in ("neighbours", "top_cities"):
            trace.conversations.append(self._extra_parts(task))
        # A search may show a test-split country next to the wanted document (e.g. in a list of
        # another continent): such a conversation is dropped; the answers built from it name only
        # train entities, so the task's other conversations stay.
        kept = []
        for conv in trace.conversations:
            if not allow_test and self.find_test_entities(json.dumps(conv.messages, ensure_ascii=False)):
                trace.dropped_conversations += 1
            else:
                kept.append(conv)
        trace.conversations = kept
        return trace

    def _build_cities(self, task: Task) -> TaskTrace:
        iso = task.meta["params"]["country"]
        n = task.meta["params"]["n"]
        # Plan form: one range agent, its windows one list document each. The count is written as
        # "the N", after the word the task puts before it ("What are the 120 most ..."): stage 17,
        # writing a copy per window, wrote 5 agents for 10 cities and for 120, and wrong ranges.
        # The keep filter drops rows past the N-th: stages 18-19 copied a window that ends inside its
        # document (1 to 8 of 1 to 15) to the document's end (version 8).
        plan = CompactPlan(agents=[CompactAgent(name="cities", task=city_task_text(self.data.country(iso).name, "{start}", "{end}"),
                                                for_range=f"all the {n} by {CITY_CHUNK}", keep=f"rank at most {n}")],
                           aggregate="concat")
        (node,) = plan.to_swarm_plan().subagents
        assert node.for_range is not None
        windows = range_windows(node.for_range)
        subs = []
        for k, (s, e) in enumerate(windows, start=1):
            msgs, ans = run_city_ranks(self.index, self.data, iso, s, e)
            if msgs[1]["content"] != compose_task_message(range_task(node.task, s, e), []):
                raise TraceError(f"task {task.id}: a window's task differs from the runtime's")
            subs.append(_SubTask(copy_id(node.id, k), msgs[1]["content"], msgs, ans))
        final_rows = [[r["city"], r["population"]] for r in task.gold]
        final = markdown_table(task.columns, final_rows)
        orch = self._tool_form(task, [subs], final)
        # The sub-agents' tables are the answer as they stand (concat): the scorer reads every table
        # whose header names the key column, and an aggregation step that rewrote 120 rows was where
        # the large tasks were lost (trace version 3).
        kept = [s for s, (_, e) in zip(subs, windows)
                if e % CITY_LIST_PART or _keep_one_in(task.id, s.id, FULL_WINDOW_KEEP_EVERY)]
        convs = [Conversation("subagent", task.id, "top_cities", s.messages, self.search_tools) for s in kept]
        convs.append(orch)
        convs.append(self._plan_conv(task, plan))
        merged = merge_results([(copy_spec(node, k), s.answer) for k, s in enumerate(subs, start=1)])
        return TaskTrace(task, convs, final, plan, concat_results([(node, merged)]), balanced_out=len(subs) - len(kept))

    def _build_listing(self, task: Task) -> TaskTrace:
        t = task.meta["template"]
        list_text, list_msgs, list_ans, entities = self._lister(task)
        lookup_attrs, keep_fn, keep = self._filter(task)
        lister = _SubTask(f"{AGENT_NAME}-1", list_text, list_msgs, list_ans)
        tool_entities = entities
        # Tool form: the orchestrator reads the list, then splits the lookups in chunks of 3.
        lookups = self._lookups(entities, lookup_attrs, AGENT_NAME)
        for i, s in enumerate(lookups):
            s.id = f"{AGENT_NAME}-{i + 2}"
        gold_by_key = {r["country"]: r for r in task.gold}
        rows = [c for c in entities if (keep_fn(c) if keep_fn else True)]
        if sorted(c.name for c in rows) != sorted(gold_by_key):
            raise TraceError(f"task {task.id}: the oracle's rows differ from the gold rows")
        final = markdown_table(task.columns, [[_country_value(c, col) for col in task.columns] for c in rows])
        orch = self._tool_form(task, [[lister], lookups], final)
        # Plan form. Neighbours: lister -> filler. Continents (language tasks list the continent too):
        # parts -> a lister per part (for_each 1) -> filler, so each copy copies one list document:
        # stage 17's one lister of Africa's 58 names jumped between the three documents and looped
        # (version 6). The filler is a fan-out, one copy per LOOKUP_CHUNK listed countries, each
        # seeing only its chunk of the list (swarm.fan_out renders it exactly so at run time). The
        # copies write every row with the column the task's condition reads; the plan's `keep`
        # filter (swarm.row_filter, applied by the runtime to each copy's table) drops the rows
        # that fail it, since a small model copies rows well and decides them badly (version 5).
        filler_text = (f"For each country in the list you receive, give {_listing([ATTR_TEXT[a] for a in lookup_attrs])}."
                       f" Answer with a markdown table whose columns are: {', '.join(['country', *lookup_attrs])}.")
        # The list answers of the plan's listing agents, in plan order.
        convs: list[Conversation] = []
        if t == "neighbours":
            listers = [CompactAgent(name="lister", task=list_text)]
            list_answers = [lister.answer]
            convs.append(Conversation("subagent", task.id, t, lister.messages, self.search_tools))
        else:
            code = task.meta["params"]["continent"]
            cname = CONTINENT_NAMES[code]
            members = self.data.countries_in(code)
            by_part = chunks([c.name for c in members], NAME_LIST_PART)
            parts_msgs, parts_ans = run_list_parts(self.index, f"list:continent:{code}:",
                                                   f"countries and territories of {cname}", cname, len(by_part))
            listers = [CompactAgent(name="parts", task=continent_parts_text(cname)),
                       CompactAgent(name="lister", task=continent_part_text(cname), depends_on=[1], for_each=1)]
            parts_spec, part_spec = CompactPlan(agents=listers).to_swarm_plan().subagents
            convs.append(Conversation("subagent", task.id, t, parts_msgs, self.search_tools))
            part_answers = []
            for k, names in enumerate(by_part, start=1):
                user = compose_task_message(part_spec.task, [(parts_spec, chunk_text(PARTS_LABEL, [f"{cname} {part_word(k)}"]))])
                msgs, ans = run_continent_part(self.index, code, cname, k, names, user)
                convs.append(Conversation("subagent", task.id, t, msgs, self.search_tools))
                part_answers.append((copy_spec(part_spec, k), ans))
            list_answers = [parts_ans, merge_results(part_answers)]
            if t == "language_countries":
                # The language's own list named in parts too (not in the plan): mostly one part (a
                # test continent's list can be one, South America's), where continents of the train
                # split but Antarctica have two or three (version 7).
                lang = task.meta["params"]["language"]
                n_lang = math.ceil(self._speakers[lang] / NAME_LIST_PART)
                l_msgs, _ = run_list_parts(self.index, f"list:language:{lang}:",
                                           f"countries and territories where {LANGUAGE_NAMES[lang]} is spoken",
                                           LANGUAGE_NAMES[lang], n_lang)
                convs.append(Conversation("subagent", task.id, t, l_msgs, self.search_tools))
            entities = [c for names in by_part for c in _in_order(members, names)]
        plan = CompactPlan(agents=[*listers, CompactAgent(name="filler", task=filler_text, depends_on=[len(listers)],
                                                          for_each=LOOKUP_CHUNK, keep=keep)],
                           aggregate="concat")
        nodes = plan.to_swarm_plan().subagents
        filler_spec = nodes[-1]
        label, items = fan_out_items(list_answers[-1])
        if items != [c.name for c in entities]:
            raise TraceError(f"task {task.id}: the listers' answer does not split into its countries")
        parts = chunks(entities, LOOKUP_CHUNK)
        copies = []
        for k, part in enumerate(parts, start=1):
            user = compose_task_message(filler_text, [(nodes[-2], chunk_text(label, [c.name for c in part]))])
            f_msgs, f_ans = run_lookup(self.index, part, lookup_attrs, user, self.spaced)
            copies.append((copy_spec(filler_spec, k), f_msgs, f_ans))
        # (id, messages, the chunk's countries): the tool form's lookups, then the plan form's copies
        chunk_convs = [(s.id, s.messages, part) for s, part in zip(lookups, chunks(tool_entities, LOOKUP_CHUNK))]
        chunk_convs += [(spec.id, msgs, part) for (spec, msgs, _), part in zip(copies, parts)]
        kept = [msgs for key, msgs, part in chunk_convs
                if t != "language_countries" or any(keep_fn(c) for c in part) or _keep_one_in(task.id, key)]
        # (A continent's tool form keeps its one lister of the whole list, not trained since version 6.)
        convs += [Conversation("subagent", task.id, t, msgs, self.search_tools) for msgs in kept]
        convs.append(orch)
        convs.append(self._plan_conv(task, plan))
        merged = merge_results([(spec, filter_answer(filler_spec.keep_rows, ans)[0]) for spec, _, ans in copies])
        plan_answer = concat_results([*zip(nodes[:-1], list_answers), (filler_spec, merged)])
        return TaskTrace(task, convs, final, plan, plan_answer, balanced_out=len(chunk_convs) - len(kept))

    @cached_property
    def _speakers(self) -> Counter[str]:
        """Countries and territories per language code (the length of the language's list)."""
        return Counter(code for c in self.data.countries.values() for code in set(c.languages))

    @cached_property
    def _multi_part_lists(self) -> list[tuple[str, str, str, int]]:
        """(doc prefix, list words, subject, parts) of every list of two parts or more that a task
        without parts may name: train continents' and languages', in a fixed order."""
        lists = [(f"list:continent:{code}:", f"countries and territories of {name}", name,
                  len(self.data.countries_in(code))) for code, name in sorted(CONTINENT_NAMES.items())
                 if split_of_continent(code) == "train"]
        lists += [(f"list:language:{code}:", f"countries and territories where {name} is spoken", name,
                   self._speakers[code]) for code, name in sorted(LANGUAGE_NAMES.items())]
        return [(prefix, words, subject, math.ceil(n / NAME_LIST_PART))
                for prefix, words, subject, n in lists if n > NAME_LIST_PART]

    def _extra_parts(self, task: Task) -> Conversation:
        """A parts agent's conversation for a list of two parts or more that the task does not use (a
        train continent's, or a language's spoken in 26 countries or more), chosen by the task id. In
        "Parts: Europe first; Europe second", the word after "first; Europe" is found by counting
        on from the word before, not by a copy (the copy's last two tokens occur before every part):
        stage 27 wrote "Africa first; Africa third", after 60-odd parts conversations of training.
        Tasks without parts of their own give one more each (version 12)."""
        lists = self._multi_part_lists
        prefix, words, subject, n_parts = lists[zlib.crc32(task.id.encode()) % len(lists)]
        msgs, _ = run_list_parts(self.index, prefix, words, subject, n_parts)
        return Conversation("subagent", task.id, task.meta["template"], msgs, self.search_tools)

    # ---- orchestrator conversations ------------------------------------------------------------
    def _tool_form(self, task: Task, stages: list[list[_SubTask]], final: str) -> Conversation:
        spec = JobSpec(task=task.prompt, subagent_tools=["search"])
        messages: list[dict[str, Any]] = [{"role": "system", "content": orchestrator_system_prompt(spec)},
                                          {"role": "user", "content": task.prompt}]
        n = 0
        for si, stage in enumerate(stages):
            calls, results = [], []
            if si == 0:
                cid = f"functions.{CREATE_SUBAGENT}:{n}"
                n += 1
                calls.append({"id": cid, "type": "function", "function": {
                    "name": CREATE_SUBAGENT,
                    "arguments": json.dumps({"name": AGENT_NAME, "system_prompt": SUBAGENT_SYSTEM_PROMPT}, ensure_ascii=False)}})
                results.append({"role": "tool", "tool_call_id": cid, "name": CREATE_SUBAGENT,
                                "content": f"created sub-agent {AGENT_NAME!r}; give it work with assign_task(agent={AGENT_NAME!r}, task=...)"})
            for sub in stage:
                cid = f"functions.{ASSIGN_TASK}:{n}"
                n += 1
                calls.append({"id": cid, "type": "function", "function": {
                    "name": ASSIGN_TASK, "arguments": json.dumps({"agent": AGENT_NAME, "task": sub.task}, ensure_ascii=False)}})
                results.append({"role": "tool", "tool_call_id": cid, "name": ASSIGN_TASK,
                                "content": f"[{sub.id}] final answer:\n{sub.answer}"})
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            messages.extend(results)
        messages.append({"role": "assistant", "content": final})
        return Conversation("orchestrator_tools", task.id, task.meta["template"], messages, self.orch_tools)

    def _plan_conv(self, task: Task, plan: CompactPlan) -> Conversation:
        messages = [{"role": "system", "content": PLAN_MODE_PROMPT}, {"role": "user", "content": task.prompt},
                    {"role": "assistant", "content": compact_plan_json(plan)}]
        return Conversation("orchestrator_plan", task.id, task.meta["template"], messages, None)

    # ---- leakage ---------------------------------------------------------------------------------
    def find_test_entities(self, text: str) -> list[str]:
        """Test-split country names or documents shown in `text` (train names containing one are masked)."""
        return find_test_entities(text, self.test_names, self.data)


def _test_country_names(data: GeoData) -> tuple[list[str], list[str], set[str]]:
    test = sorted({c.name for c in data.countries.values() if split_of_country(data, c.iso) == "test"}
                  | {a for c in data.countries.values() if split_of_country(data, c.iso) == "test"
                     for a in data.country_aliases(c.iso)}, key=len, reverse=True)
    train = sorted({c.name for c in data.countries.values() if split_of_country(data, c.iso) == "train"}
                   | {a for c in data.countries.values() if split_of_country(data, c.iso) == "train"
                      for a in data.country_aliases(c.iso)}, key=len, reverse=True)
    test_iso = {c.iso for c in data.countries.values() if split_of_country(data, c.iso) == "test"}
    return test, train, test_iso


_DOC_ID_RE = re.compile(r"id=(country|list:cities|list:continent):([A-Z]{2})|id=city:(\d+)")


def find_test_entities(text: str, names: tuple[list[str], list[str], set[str]], data: GeoData) -> list[str]:
    test, train, test_iso = names
    masked = text
    for name in train:
        if any(t in name and t != name for t in test):
            masked = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", " ", masked)
    found = [n for n in test if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", masked)]
    test_continents = {"AF", "SA"}
    for m in _DOC_ID_RE.finditer(text):
        kind, code, city = m.groups()
        if city is not None:
            c = data.cities.get(int(city))
            if c is not None and c.country in test_iso:
                found.append(f"city:{city}")
        elif (kind == "list:continent" and code in test_continents) or (kind != "list:continent" and code in test_iso):
            found.append(f"{kind}:{code}")
    return found


# --------------------------------------------------------------------------------- datasets

@dataclass
class SynthesisReport:
    tasks_seen: int = 0
    tasks_used: int = 0
    dropped: Counter = field(default_factory=Counter)  # "template: reason" -> tasks skipped
    conversations: Counter = field(default_factory=Counter)  # kind -> conversations kept
    leaky_conversations: int = 0  # conversations left out for showing a test-split entity
    balanced_out: int = 0  # left out for balance: empty language chunks, city windows ending at a document end

    def as_dict(self) -> dict[str, Any]:
        return {"tasks_seen": self.tasks_seen, "tasks_used": self.tasks_used, "dropped": dict(self.dropped),
                "conversations": dict(self.conversations), "leaky_conversations": self.leaky_conversations,
                "balanced_out": self.balanced_out}


def synthesize(env: Any, tasks: list[Task], corpus_path: str | Path | None = None,
               allow_test: bool = False, workers: int = 1,
               spaced_names: bool = False) -> tuple[list[TaskTrace], SynthesisReport]:
    """Traces of the given train tasks; tasks that cannot give a correct, leak-free trace are skipped.
    `allow_test` admits test-split tasks: for measuring a policy on held-out tasks, never for training.
    `workers` > 1 builds contiguous chunks of tasks in that many processes; the result is the same.
    `spaced_names`: list answers and queries in the form where every copied name follows a space."""
    bad = [t.id for t in tasks if t.split != "train"]
    if bad and not allow_test:
        raise TraceError(f"traces are built from train tasks only; got test tasks {bad[:3]}")
    if workers <= 1 or len(tasks) < 2 * workers:
        return _synthesize_with(TraceBuilder(env, corpus_path, spaced_names), tasks, allow_test)
    size = -(-len(tasks) // workers)
    chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    # Spawned, not forked: a fork copies locks held by other threads (torch's, JAX's) and can hang.
    # An executor, not a Pool: a worker that dies (or whose initializer fails) raises BrokenProcessPool
    # here instead of being replaced forever.
    try:
        with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(env, corpus_path, spaced_names)) as pool:
            parts = list(pool.map(_synthesize_in_worker, chunks, [allow_test] * len(chunks)))
    except BrokenProcessPool as e:
        raise TraceError("a trace-synthesis worker process died (its error is printed above); "
                         "with one worker the synthesis runs, and fails, in this process") from e
    out: list[TaskTrace] = []
    report = SynthesisReport()
    for traces, rep in parts:
        out += traces
        report.tasks_seen += rep.tasks_seen
        report.tasks_used += rep.tasks_used
        report.leaky_conversations += rep.leaky_conversations
        report.balanced_out += rep.balanced_out
        report.dropped.update(rep.dropped)
        report.conversations.update(rep.conversations)
    return out, report


_WORKER_BUILDER: TraceBuilder | None = None


def _init_worker(env: Any, corpus_path: str | Path | None, spaced_names: bool) -> None:
    global _WORKER_BUILDER
    _WORKER_BUILDER = TraceBuilder(env, corpus_path, spaced_names)


def _synthesize_in_worker(tasks: list[Task], allow_test: bool) -> tuple[list[TaskTrace], SynthesisReport]:
    assert _WORKER_BUILDER is not None
    return _synthesize_with(_WORKER_BUILDER, tasks, allow_test)


def _synthesize_with(builder: TraceBuilder, tasks: list[Task], allow_test: bool) -> tuple[list[TaskTrace], SynthesisReport]:
    report = SynthesisReport()
    out = []
    for task in tasks:
        report.tasks_seen += 1
        try:
            trace = builder.build(task, allow_test=allow_test)
        except TraceError as e:
            reason = "oracle rows differ" if "gold rows" in str(e) else "search cannot show the facts"
            report.dropped[f"{task.meta['template']}: {reason}"] += 1
            continue
        out.append(trace)
        report.tasks_used += 1
        report.leaky_conversations += trace.dropped_conversations
        report.balanced_out += trace.balanced_out
        report.conversations.update(c.kind for c in trace.conversations)
    return out, report


def encode_conversation(conv: Conversation, tokenizer: Any) -> EncodedExample:
    """Token ids of the rendered conversation and a mask that is 1 on assistant-written tokens.

    Targets are the body of each assistant turn (content and tool-call section) and its closing
    <|im_end|>; the turn's opening `<|im_assistant|>assistant<|im_middle|>` is the generation prompt
    and stays unmasked, as does every system, user and tool block.
    """
    segs = render_segments(conv.messages, conv.tools, add_generation_prompt=False)
    ids: list[int] = []
    mask: list[int] = []
    in_assistant = False
    header = 0  # position within the 3-piece assistant header
    for text, control in segs:
        toks = tokenizer.encode(text, allow_special=control)
        target = 0
        if control and text == "<|im_assistant|>":
            header = 1
        elif header == 1 and not control and text == "assistant":
            header = 2
        elif header == 2 and control and text == "<|im_middle|>":
            header = 0
            in_assistant = True
        elif in_assistant:
            target = 1
            if control and text == "<|im_end|>":
                in_assistant = False
        else:
            header = 0
        ids += toks
        mask += [target] * len(toks)
    return EncodedExample(conv.kind, conv.task_id, ids, mask)


def length_stats(examples: list[EncodedExample]) -> dict[str, dict[str, float]]:
    """Per kind: count, min, median, p90, max token length."""
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({e.kind for e in examples}):
        lens = sorted(len(e) for e in examples if e.kind == kind)
        out[kind] = {"count": len(lens), "min": lens[0], "median": lens[len(lens) // 2],
                     "p90": lens[min(len(lens) - 1, int(0.9 * len(lens)))], "max": lens[-1]}
    return out
