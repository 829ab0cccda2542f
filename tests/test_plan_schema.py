"""The plan-mode schema: parse_plan's conversions and errors, and that the engine's grammar admits
exactly the text the policy is trained to write."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model_shards.engine_api import Constraint
from model_shards.structured import GrammarCache
from model_shards.tokenizer import ByteTokenizer
from planner.plan_schema import (
    CompactAgent,
    CompactPlan,
    PlanParseError,
    compact_plan_json,
    parse_plan,
    plan_json_schema,
)
from planner.prompts import SUBAGENT_SYSTEM_PROMPT
from swarm.row_filter import RowFilter
from swarm.dag import validate_plan
from swarm.plans import Limits


def _plan() -> CompactPlan:
    return CompactPlan(
        agents=[
            CompactAgent(name="lister", task="List all countries of Europe. Answer with names separated by '; '."),
            CompactAgent(name="filler", task="For each country give its area in km².", depends_on=[1]),
        ],
        aggregate="llm",
        aggregate_prompt="Merge into one table with columns: country, area_km2.",
    )


def test_parse_plan_fills_prompt_and_tools_and_validates():
    plan = parse_plan(compact_plan_json(_plan()))
    assert [s.id for s in plan.subagents] == ["lister-1", "filler-2"]
    assert [s.name for s in plan.subagents] == ["lister", "filler"]
    assert plan.subagents[1].depends_on == ["lister-1"]
    assert all(s.system_prompt == SUBAGENT_SYSTEM_PROMPT and s.tools == ["search"] for s in plan.subagents)
    assert plan.aggregate == "llm" and plan.aggregate_prompt.startswith("Merge")
    graph = validate_plan(plan, Limits(), {"search"})
    assert list(graph.edges) == [("lister-1", "filler-2")]


def test_parse_plan_accepts_a_code_fence_and_custom_tools():
    text = "```json\n" + compact_plan_json(_plan()) + "\n```"
    plan = parse_plan(text, system_prompt="be brief", tools=["search", "calculator"])
    assert plan.subagents[0].system_prompt == "be brief"
    assert plan.subagents[0].tools == ["search", "calculator"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"agents": []}', "agents"),
        ('{"agents": [{"name": "a", "task": "t"}], "extra": 1}', "extra"),
        ('{"agents": [{"name": "bad id!", "task": "t"}]}', "agents.0.name"),
        ('{"agents": [{"name": "a", "task": ""}]}', "agents.0.task"),
        ('{"agents": [{"name": "a", "task": "t", "depends_on": ["zz"]}]}', "agents.0.depends_on.0"),
        ('{"agents": [{"name": "a", "task": "t", "depends_on": [1]}]}', "agent 1 ('a') depends on 1"),
        # a forward reference is how a cycle or an unknown agent looks in the positional form
        ('{"agents": [{"name": "a", "task": "t", "depends_on": [2]}, {"name": "b", "task": "t", "depends_on": [1]}]}',
         "agent 1 ('a') depends on 2, but an agent may only depend on agents listed before it"),
        ('{"agents": [{"name": "a", "task": "t"}, {"name": "b", "task": "u", "depends_on": [7]}]}',
         "agent 2 ('b') depends on 7"),
        ('{"agents": [{"name": "a", "task": "t"}], "aggregate": "vote"}', "aggregate"),
    ],
)
def test_parse_plan_errors_name_the_problem(text, fragment):
    with pytest.raises(PlanParseError) as e:
        parse_plan(text)
    assert fragment in str(e.value)


def test_parse_plan_respects_limits():
    agents = [{"name": "a", "task": "t"} for i in range(5)]
    with pytest.raises(PlanParseError, match="max_subagents=3"):
        parse_plan(json.dumps({"agents": agents}), limits=Limits(max_subagents=3))


def test_schema_accepts_the_trained_text_and_rejects_bad_plans():
    schema = plan_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(compact_plan_json(_plan())), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"agents": [{"name": "a", "task": "t", "depends_on": [], "x": 1}], "aggregate": "concat"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"agents": [], "aggregate": "concat"}, schema)
    # forward references (the positional form of cycles and unknown agents) are outside the schema
    two = [{"name": "a", "task": "t", "depends_on": [2]}, {"name": "b", "task": "u", "depends_on": []}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"agents": two, "aggregate": "concat"}, schema)
    with pytest.raises(jsonschema.ValidationError):  # more agents than the limit
        jsonschema.validate({"agents": [{"name": "a", "task": "t", "depends_on": []}] * 3, "aggregate": "concat"},
                            plan_json_schema(max_agents=2))


def _fan_out_plan() -> CompactPlan:
    return CompactPlan(agents=[CompactAgent(name="lister", task="List the countries of Asia."),
                               CompactAgent(name="filler", task="Give the capital of each.", depends_on=[1], for_each=3)])


def test_a_fan_out_agent_becomes_a_for_each_node_over_its_first_dependency():
    text = compact_plan_json(_fan_out_plan())
    assert '"depends_on": [1], "for_each": 3}' in text and text.count("for_each") == 1
    plan = parse_plan(text)
    lister, filler = plan.subagents
    assert lister.for_each is None
    assert filler.for_each is not None and (filler.for_each.source, filler.for_each.chunk) == ("lister-1", 3)
    schema = plan_json_schema()
    jsonschema.validate(json.loads(text), schema)
    # for_each without a dependency to split is outside the schema, and parse_plan names it
    no_dep = {"agents": [{"name": "a", "task": "t", "depends_on": []},
                         {"name": "b", "task": "u", "depends_on": [], "for_each": 2}], "aggregate": "concat"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(no_dep, schema)
    with pytest.raises(PlanParseError, match="for_each but no dependency"):
        parse_plan(json.dumps(no_dep))
    with pytest.raises(jsonschema.ValidationError):  # the first agent has nothing to split
        jsonschema.validate({"agents": [{"name": "a", "task": "t", "depends_on": [], "for_each": 2}],
                             "aggregate": "concat"}, schema)


def test_engine_grammar_admits_exactly_the_trained_plan_text():
    tok = ByteTokenizer()
    matcher = GrammarCache(tok).matcher(Constraint("json_schema", json.dumps(plan_json_schema())))
    for plan in (_plan(), CompactPlan(agents=[CompactAgent(name="cities", task="List the cities é ²")]), _fan_out_plan()):
        matcher.reset()
        assert all(matcher.accept(i) for i in tok.encode(compact_plan_json(plan)))
        assert matcher.accept(tok.eos_id) and matcher.is_terminated()
    # A plan with an unknown key is outside the grammar.
    matcher.reset()
    bad = '{"agents": [{"name": "a", "task": "t", "depends_on": [], "tools": []}]'
    assert not all(matcher.accept(i) for i in tok.encode(bad))
    # ... and so is a dependency on a later agent.
    matcher.reset()
    fwd = '{"agents": [{"name": "a", "task": "t", "depends_on": [2]'
    assert not all(matcher.accept(i) for i in tok.encode(fwd))
    # ... and a fan-out with nothing to split.
    matcher.reset()
    lone = '{"agents": [{"name": "a", "task": "t", "depends_on": []}, {"name": "b", "task": "u", "depends_on": [], "for_each"'
    assert not all(matcher.accept(i) for i in tok.encode(lone))


def test_compact_plan_json_refuses_text_the_grammar_cannot_write():
    with pytest.raises(ValueError, match="constrained format"):
        compact_plan_json(CompactPlan(agents=[CompactAgent(name="a", task='say "hi"')]))
    with pytest.raises(ValueError, match="depends on 1"):
        compact_plan_json(CompactPlan(agents=[CompactAgent(name="a", task="t", depends_on=[1])]))


def _grammar_admits_whole(text: str):
    """(tokenizer, matcher) after checking that the schema and the engine's grammar admit `text` whole."""
    schema = plan_json_schema()
    jsonschema.validate(json.loads(text), schema)
    tok = ByteTokenizer()
    matcher = GrammarCache(tok).matcher(Constraint("json_schema", json.dumps(schema)))
    assert all(matcher.accept(i) for i in tok.encode(text))
    assert matcher.accept(tok.eos_id) and matcher.is_terminated()
    return tok, matcher


def _keep_plan() -> CompactPlan:
    return CompactPlan(agents=[
        CompactAgent(name="lister", task="List the countries of Asia."),
        CompactAgent(name="filler", task="Give the population of each.", depends_on=[1], for_each=3,
                     keep="population more than 5,000,000"),
        CompactAgent(name="one", task="Look up Laos.", keep="languages have Lao"),
    ])


def test_a_keep_filter_reaches_the_node_and_the_grammar_admits_it():
    text = compact_plan_json(_keep_plan())
    assert '"for_each": 3, "keep": "population more than 5,000,000"}' in text
    plan = parse_plan(text)
    assert plan.subagents[0].keep_rows is None
    assert plan.subagents[1].keep_rows == RowFilter(column="population", op=">", value="5,000,000")
    assert plan.subagents[2].keep_rows == RowFilter(column="languages", op="contains", value="Lao")
    tok, matcher = _grammar_admits_whole(text)
    # a keep that is not a readable phrase is outside the grammar: not a string, no operator, or a
    # comparison with something other than a number
    for bad in ('{', '"population roughly 5"', '"population more than many"'):
        matcher.reset()
        text_bad = '{"agents": [{"name": "a", "task": "t", "depends_on": [], "keep": ' + bad + '}'
        assert not all(matcher.accept(i) for i in tok.encode(text_bad)), bad
    # parse_plan names a condition it cannot read, or one whose value is not a number
    raw = json.loads(text)
    raw["agents"][1]["keep"] = "population roughly 5"
    with pytest.raises(PlanParseError, match="is not 'COLUMN OP VALUE'"):
        parse_plan(json.dumps(raw))
    raw["agents"][1]["keep"] = "population more than many"
    with pytest.raises(PlanParseError, match="not a number"):
        parse_plan(json.dumps(raw))


def test_a_range_agent_becomes_a_for_range_node_with_its_window_in_the_task():
    plan = CompactPlan(agents=[
        CompactAgent(name="cities", task="List the cities of Peru ranked {start} to {end}.", for_range="all the 50 by 15"),
        CompactAgent(name="pages", task="Read the results.", for_range="all the 7 by 3"),  # no {start}/{end}
    ])
    text = compact_plan_json(plan)
    assert '"depends_on": [], "for_range": "all the 50 by 15"}' in text
    cities, pages = parse_plan(text).subagents
    assert cities.for_range is not None and (cities.for_range.start, cities.for_range.end, cities.for_range.chunk) == (1, 50, 15)
    assert cities.task == "List the cities of Peru ranked {start} to {end}."
    assert pages.task == "Read the results. Your part: {start} to {end}." and pages.for_range.chunk == 3
    _grammar_admits_whole(text)
    # unconstrained models may write "S to E by C"; a phrase it cannot read is named
    raw = json.loads(text)
    raw["agents"][0]["for_range"] = "the 30 by 5"
    fr = parse_plan(json.dumps(raw)).subagents[0].for_range
    assert (fr.start, fr.end, fr.chunk) == (1, 30, 5)
    raw["agents"][0]["for_range"] = "16 to 30 by 5"
    fr = parse_plan(json.dumps(raw)).subagents[0].for_range
    assert (fr.start, fr.end, fr.chunk) == (16, 30, 5)
    for bad, fragment in (("all the fifty by 15", "is not 'all the N by C'"), ("30 to 16 by 5", "below its start"),
                          ("all the 50 by 0", "greater than or equal to 1")):
        raw["agents"][0]["for_range"] = bad
        with pytest.raises(PlanParseError, match=fragment):
            parse_plan(json.dumps(raw))
    # for_each and for_range together: an agent fans out one way
    raw = json.loads(text)
    raw["agents"][1].update(depends_on=[1], for_each=2)
    with pytest.raises(PlanParseError, match="both for_each and for_range"):
        parse_plan(json.dumps(raw))


def test_range_windows_widen_to_keep_the_copies_within_max_subagents():
    plan = CompactPlan(agents=[CompactAgent(name="lister", task="List them."),
                               CompactAgent(name="rows", task="Rows {start} to {end}.", for_range="all the 1000 by 1")])
    text = compact_plan_json(plan)
    limited = parse_plan(text, limits=Limits(max_subagents=10))
    fr = limited.subagents[1].for_range
    assert (fr.start, fr.end, fr.chunk) == (1, 1000, 112)  # 9 windows: with the lister, 10 agents
    assert parse_plan(text).subagents[1].for_range.chunk == 11  # 100 agents: 91 windows
    # the grammar admits only "all the N by C" with positive numbers, so what it admits is a valid plan
    tok, matcher = _grammar_admits_whole(text)
    for bad in ('"all the 0 by 5"', '"1 to 9 by 2"', '"all the 5"', '"all the 5 by -1"', '"the 5 by 2"'):
        matcher.reset()
        text_bad = '{"agents": [{"name": "a", "task": "t", "depends_on": [], "for_range": ' + bad + '}'
        assert not all(matcher.accept(i) for i in tok.encode(text_bad)), bad


def test_parallel_caps_a_fan_outs_copies_and_only_a_fan_out_may_have_it():
    plan = CompactPlan(agents=[
        CompactAgent(name="lister", task="List the countries of Asia."),
        CompactAgent(name="filler", task="Give the capital of each.", depends_on=[1], for_each=3, parallel=1,
                     keep="capital has a"),
        CompactAgent(name="cities", task="List the cities of Peru ranked {start} to {end}.",
                     for_range="all the 30 by 10", parallel=2),
    ])
    text = compact_plan_json(plan)
    # After the fan-out and before keep; absent where unset (the parallel plans' text is unchanged).
    assert '"for_each": 3, "parallel": 1, "keep": "capital has a"}' in text
    assert '"for_range": "all the 30 by 10", "parallel": 2}' in text and text.count("parallel") == 2
    assert "parallel" not in compact_plan_json(_fan_out_plan())
    _, filler, cities = parse_plan(text).subagents
    assert filler.for_each is not None and filler.for_each.max_parallel == 1 and filler.for_each.chunk == 3
    assert cities.for_range is not None and cities.for_range.max_parallel == 2
    jsonschema.validate(json.loads(text), plan_json_schema())
    _grammar_admits_whole(text)
    raw = json.loads(text)
    raw["agents"][0]["parallel"] = 2  # a plain agent: nothing runs in parallel
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, plan_json_schema())
    with pytest.raises(PlanParseError, match="has parallel but no for_each or for_range"):
        parse_plan(json.dumps(raw))
    raw = json.loads(text)
    raw["agents"][1]["parallel"] = 0
    with pytest.raises(PlanParseError, match="parallel"):
        parse_plan(json.dumps(raw))
