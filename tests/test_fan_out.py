"""swarm.fan_out: how a list answer is split into items and chunks, and how copies' answers merge."""

from __future__ import annotations

import pytest

from swarm.fan_out import chunk_text, chunks, copy_spec, distinct, list_items, merge_results
from swarm.plans import ForEach, SubAgentSpec


def test_list_items_reads_labelled_semicolon_lists_lines_and_tables():
    assert list_items("Countries: Peru; Chile; ; Bolivia.") == ("Countries: ", ["Peru", "Chile", "Bolivia"])
    assert list_items("Peru; Chile") == ("", ["Peru", "Chile"])
    assert list_items("- Peru\n- Chile\n2. Bolivia\n\n") == ("", ["Peru", "Chile", "Bolivia"])
    label, rows = list_items("Here:\n\n| country | capital |\n|---|---|\n| Peru | Lima |\n| Chile | Santiago |\n\nDone.")
    assert label == "| country | capital |\n|---|---|" and rows == ["| Peru | Lima |", "| Chile | Santiago |"]
    assert list_items("   ") == ("", [])
    # a name with a colon later in the text is not a label when the label would hold the separator
    assert list_items("A; B: C") == ("", ["A", "B: C"])


def test_distinct_drops_repeats_of_a_looping_list_keeping_the_first():
    items = ["Laos", "Lebanon", "Vietnam", "laos", " Lebanon", "Viet  nam", "Viet Nam", "China"]
    assert distinct(items) == ["Laos", "Lebanon", "Vietnam", "Viet  nam", "China"]
    assert distinct([]) == []


def test_chunks_keep_order_and_the_lists_own_form():
    assert chunks(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="chunk size"):
        chunks(["a"], 0)
    assert chunk_text("Countries: ", ["Peru", "Chile"]) == "Countries: Peru; Chile"
    assert chunk_text("| a |\n|---|", ["| 1 |"]) == "| a |\n|---|\n| 1 |"


def test_copies_share_the_role_and_merge_tables_with_one_header():
    parent = SubAgentSpec(id="filler-2", name="filler", task="t", tools=["search"], depends_on=["lister-1"],
                          for_each=ForEach(source="lister-1", chunk=3))
    c1, c2, c3 = (copy_spec(parent, k) for k in (1, 2, 3))
    assert (c1.id, c1.name, c1.tools, c1.depends_on, c1.for_each) == ("filler-2.1", "filler", ["search"], ["lister-1"], None)
    merged = merge_results([
        (c1, "| country | capital |\n|---|---|\n| Peru | Lima |"),
        (c2, "| Country | Capital |\n|---|---|"),  # kept no row: adds none
        (c3, "| country | capital |\n|---|---|\n| Chile | Santiago |\n| Bolivia | Sucre |"),
    ])
    assert merged == "| country | capital |\n|---|---|\n| Peru | Lima |\n| Chile | Santiago |\n| Bolivia | Sucre |"
    # different headers or prose: each answer under its label
    mixed = merge_results([(c1, "| a |\n|---|\n| 1 |"), (c2, "no table here")])
    assert "## filler-2.1 (filler)\n| a |" in mixed and "## filler-2.2 (filler)\nno table here" in mixed


def test_lists_with_one_label_merge_into_one_list_that_splits_again():
    parent = SubAgentSpec(id="lister-2", name="lister", task="t", tools=["search"], depends_on=["parts-1"],
                          for_each=ForEach(source="parts-1", chunk=1))
    c1, c2 = copy_spec(parent, 1), copy_spec(parent, 2)
    merged = merge_results([(c1, "Countries: Peru; Chile"), (c2, "countries:  Bolivia; Peru")])
    assert merged == "Countries: Peru; Chile; Bolivia; Peru"
    label, items = list_items(merged)
    assert label == "Countries: " and distinct(items) == ["Peru", "Chile", "Bolivia"]
    # lists under different labels, or unlabelled ones, stay apart
    apart = merge_results([(c1, "Countries: Peru"), (c2, "Cities: Lima")])
    assert "## lister-2.1 (lister)\nCountries: Peru" in apart and "## lister-2.2 (lister)\nCities: Lima" in apart
    bare = merge_results([(c1, "Peru; Chile"), (c2, "Bolivia")])
    assert bare.startswith("## lister-2.1 (lister)")
    # answers of several lines (prose, a message with its results) are never taken for lists
    prose = merge_results([(c1, "Results: here\n\nmore"), (c2, "Results: there\n\nmore")])
    assert prose.startswith("## lister-2.1 (lister)\nResults: here")
