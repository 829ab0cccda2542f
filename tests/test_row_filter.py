"""Row filters (swarm.row_filter): which rows a keep_rows condition keeps, and what it leaves alone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from swarm.row_filter import RowFilter, apply_row_filter, filter_answer, row_passes

TABLE = """Some words first.
| country | languages | population |
|---|---|---|
| Argentina | Spanish, English, Italian | 44,494,502 |
| Bolivia | Spanish, Quechua | 11,353,142 |
| Falkland Islands | English | 2,638 |
| Suriname | Dutch, English, srn | 575,991 |

## other
| city | population |
|---|---|
| Lima | 7,737,002 |"""


def test_a_numeric_threshold_keeps_only_the_rows_above_it():
    out, kept, dropped = apply_row_filter(RowFilter(column="population", op=">", value="5,000,000"), TABLE)
    assert (kept, dropped) == (3, 2)  # both tables have a population column
    assert "Argentina" in out and "Bolivia" in out and "Lima" in out
    assert "Falkland" not in out and "Suriname" not in out
    assert out.startswith("Some words first.\n| country | languages | population |\n|---|---|---|")
    assert "## other" in out


def test_contains_matches_whole_words_in_any_case():
    f = RowFilter(column="languages", op="contains", value="english")
    out, kept, dropped = apply_row_filter(f, TABLE)
    assert (kept, dropped) == (3, 1)
    assert "Bolivia" not in out
    assert "Lima" in out  # a table without the column is left as it is
    assert not row_passes(RowFilter(column="l", op="contains", value="Malay"), "Malayalam, Tamil")
    assert row_passes(RowFilter(column="l", op="contains", value="Malay"), "English, Malay")


@pytest.mark.parametrize("op,value,cell,passes", [
    (">=", "2,638", "2,638", True), ("<", "1000", "2,638", False), ("<=", "2,638.0", "2638 km²", True),
    ("=", "44494502", "44,494,502", True), ("=", "sucre", "Sucre", True), ("!=", "Sucre", "La Paz", True),
    (">", "10", "unknown", False),  # a cell that cannot be compared does not pass
])
def test_operators(op, value, cell, passes):
    assert row_passes(RowFilter(column="c", op=op, value=value), cell) is passes


def test_column_names_match_ignoring_case_and_underscores():
    text = "| Country | Area km2 |\n|---|---|\n| A | 10 |\n| B | 1 |"
    out, kept, dropped = apply_row_filter(RowFilter(column="area_km2", op=">", value="5"), text)
    assert (kept, dropped) == (1, 1) and "| A |" in out and "| B |" not in out


def test_an_answer_without_the_column_is_kept_whole_and_the_note_says_so():
    text, note = filter_answer(RowFilter(column="capital", op="=", value="Lima"), "Argentina; Peru")
    assert text == "Argentina; Peru" and "nothing filtered" in note
    assert filter_answer(None, "x") == ("x", "")
    out, note = filter_answer(RowFilter(column="population", op=">", value="5,000,000"), TABLE)
    assert note == "keep_rows (population > 5,000,000): kept 3 of 5 rows" and "Suriname" not in out


def test_bad_filters_are_refused_naming_the_problem():
    with pytest.raises(ValidationError, match="not a number"):
        RowFilter(column="population", op=">", value="a lot")
    with pytest.raises(ValidationError, match="op"):
        RowFilter(column="population", op="~", value="1")
    with pytest.raises(ValidationError, match="blank"):
        RowFilter(column=" ", op="=", value="1")


@pytest.mark.parametrize("text,column,op,value", [
    ("population more than 5,000,000", "population", ">", "5,000,000"),
    ("population > 5,000,000", "population", ">", "5,000,000"),
    ("languages have English", "languages", "contains", "English"),
    ("rank at most 120", "rank", "<=", "120"),
    ("area km2 at least 10", "area km2", ">=", "10"),
    ("country is not Peru", "country", "!=", "Peru"),
    ("capital is La Paz", "capital", "=", "La Paz"),
])
def test_a_filter_reads_from_one_phrase(text, column, op, value):
    assert RowFilter.model_validate(text) == RowFilter(column=column, op=op, value=value)


def test_a_phrase_without_an_operator_is_refused_with_the_operators_listed():
    with pytest.raises(ValidationError, match="is not 'COLUMN OP VALUE'.*more than"):
        RowFilter.model_validate("population roughly five million")


LOOPED_RANKING = """| rank | city | population |
|---|---|---|
| 1 | Kumasi | 2,544,530 |
| 2 | Accra | 1,963,264 |
| 3 | Tamale | 464,316 |
| 2 | Accra | 1,963,264 |
| 3 | Teshi Old Town | 144,013 |
| 9 | Obuasi | 175,043 |
| 3 | Tamale | 464,316 |"""


def test_a_looped_ranking_keeps_the_first_row_of_each_rank():
    # A copy that loops back over its ranking: exact repeats and a second row for rank 3 go, the
    # first row of every rank stays, and the rank past the window fails the condition as before.
    out, note = filter_answer(RowFilter.model_validate("rank at most 8"), LOOPED_RANKING)
    rows = [ln for ln in out.splitlines()[2:]]
    assert rows == ["| 1 | Kumasi | 2,544,530 |", "| 2 | Accra | 1,963,264 |", "| 3 | Tamale | 464,316 |"]
    assert note == "keep_rows (rank <= 8): kept 3 of 7 rows (3 repeated rows dropped)"
    assert apply_row_filter(RowFilter.model_validate("rank at most 8"), LOOPED_RANKING)[1:] == (3, 4)


def test_repeats_are_dropped_per_table_and_only_whole_rows_outside_unique_columns():
    text = ("| country | population |\n|---|---|\n| Peru | 31,989,256 |\n| Peru | 31,989,256 |\n"
            "| Peru | 32,000,000 |\n\n| country | population |\n|---|---|\n| Peru | 31,989,256 |")
    out, kept, dropped = apply_row_filter(RowFilter(column="population", op=">", value="1"), text)
    # The exact repeat in the first table goes; a differing row for the same country is not a repeat
    # (no unique column says so), and the second table keeps its own copy.
    assert (kept, dropped) == (3, 1)
    assert out.count("| Peru | 31,989,256 |") == 2 and "| Peru | 32,000,000 |" in out
