"""WideSearch-style table scoring and exact-match scoring, against hand-computed cases."""

from __future__ import annotations

import pytest

from planner.envs.scoring import (
    normalize_text,
    parse_markdown_tables,
    parse_number,
    score_exact,
    score_table,
)

COLS = ["country", "capital", "population"]
KEYS = ["country"]
GOLD = [
    {"country": "France", "capital": "Paris", "population": 66987244},
    {"country": "Germany", "capital": "Berlin", "population": 82927922},
    {"country": "Democratic Republic of the Congo", "capital": "Kinshasa", "population": 84068091},
    {"country": "Ivory Coast", "capital": "Yamoussoukro", "population": 25069229},
]
ALIASES = {"Democratic Republic of the Congo": ["DR Congo", "DRC"], "Ivory Coast": ["Côte d'Ivoire"]}

PERFECT_ROWS = [
    "| France | Paris | 66,987,244 |",
    "| Germany | Berlin | 82,927,922 |",
    "| Democratic Republic of the Congo | Kinshasa | 84,068,091 |",
    "| Ivory Coast | Yamoussoukro | 25,069,229 |",
]


def table(rows: list[str], header: str = "| country | capital | population |") -> str:
    return "\n".join([header, "|---|---|---|", *rows])


def score(answer: str, **kw):
    return score_table(answer, COLS, KEYS, GOLD, aliases=kw.pop("aliases", ALIASES), **kw)


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-9)


def test_perfect_table_scores_one_and_succeeds() -> None:
    s = score(table(PERFECT_ROWS))
    assert (s.item_f1, s.item_precision, s.item_recall, s.row_f1, s.success) == (1.0, 1.0, 1.0, 1.0, True)


def test_missing_row_lowers_recall_only() -> None:
    s = score(table(PERFECT_ROWS[:3]))
    # 9 correct cells of 9 answered, of 12 gold cells.
    assert s.item_precision == approx(1.0)
    assert s.item_recall == approx(9 / 12)
    assert s.item_f1 == approx(2 * 1.0 * 0.75 / 1.75)
    assert s.row_f1 == approx(2 * 1.0 * 0.75 / 1.75)
    assert not s.success


def test_extra_row_lowers_precision_only() -> None:
    s = score(table(PERFECT_ROWS + ["| Spain | Madrid | 46,723,749 |"]))
    assert s.item_precision == approx(12 / 15)
    assert s.item_recall == approx(1.0)
    assert s.row_f1 == approx(2 * 0.8 * 1.0 / 1.8)
    assert not s.success


def test_near_numbers_within_and_outside_tolerance() -> None:
    rows = [
        "| France | Paris | 67 million |",  # 0.02% off: within 1%
        "| Germany | Berlin | 85,000,000 |",  # 2.5% off: outside 1%
        "| DR Congo | Kinshasa | 8.4068e7 |",
        "| Ivory Coast | Yamoussoukro | 25.07M |",
    ]
    s = score(table(rows))
    assert s.item_recall == approx(11 / 12)
    assert s.row_f1 == approx(0.75)
    assert not s.success
    # The tolerance is configurable: at 5% the German figure is accepted too.
    loose = score(table(rows), rel_tol=0.05)
    assert loose.success and loose.item_f1 == 1.0
    # And per column: population strict at 0 makes all but the exact one wrong.
    strict = score(table(rows), column_rel_tol={"population": 0.0})
    assert strict.item_recall == approx(8 / 12)


def test_key_aliases_accents_and_case_align_rows() -> None:
    rows = [
        "| FRANCE | paris | 66987244 |",
        "| **germany** | Berlin | 82 927 922 |",
        "| DRC | Kinshasa | 84,068,091 |",
        "| Cote d’Ivoire | Yamoussoukro | 25,069,229 |",
    ]
    assert score(table(rows)).success
    # Without the aliases, "DRC" and "Cote d'Ivoire" do not align: two rows are extras.
    s = score(table(rows), aliases={})
    assert s.item_precision == approx(6 / 12) and s.item_recall == approx(6 / 12)
    assert s.row_f1 == approx(0.5)


def test_key_mismatch_makes_the_row_an_extra() -> None:
    rows = PERFECT_ROWS[:3] + ["| Ivory Land | Yamoussoukro | 25,069,229 |"]
    s = score(table(rows))
    assert s.item_precision == approx(9 / 12) and s.item_recall == approx(9 / 12)


def test_duplicated_row_counts_once() -> None:
    s = score(table(PERFECT_ROWS + [PERFECT_ROWS[0], PERFECT_ROWS[0]]))
    assert s.item_recall == approx(1.0)
    assert s.item_precision == approx(12 / 18)
    assert s.row_f1 == approx(2 * (4 / 6) / (1 + 4 / 6))
    assert not s.success


def test_reordered_renamed_and_extra_columns() -> None:
    answer = (
        "Sure, here is the table:\n\n"
        "| Population (2023) | Notes | **Country name** | Capital City |\n"
        "|:--|--|--:|:-:|\n"
        "| 66,987,244 | big | France | Paris |\n"
        "| 82,927,922 | | Germany | Berlin |\n"
        "| 84,068,091 | | Democratic Republic of the Congo | Kinshasa |\n"
        "| 25,069,229 | | Ivory Coast | Yamoussoukro |\n\n"
        "All figures from GeoNames."
    )
    assert score(answer).success


def test_missing_column_makes_its_cells_wrong() -> None:
    answer = "| country | capital |\n|---|---|\n" + "\n".join(
        f"| {g['country']} | {g['capital']} |" for g in GOLD
    )
    s = score(answer)
    assert s.item_precision == approx(8 / 12) and s.item_recall == approx(8 / 12)
    assert s.row_f1 == 0.0 and not s.success


def test_no_table_scores_zero() -> None:
    for answer in ["", "I could not find the data.", "France: Paris, 66,987,244", "| a |"]:
        s = score(answer)
        assert (s.item_f1, s.row_f1, s.success) == (0.0, 0.0, False)


def test_tables_without_outer_pipes_and_several_tables_are_joined() -> None:
    first = "country | capital | population\n--- | --- | ---\nFrance | Paris | 66987244\nGermany | Berlin | 82927922"
    second = table(PERFECT_ROWS[2:])
    assert score(first + "\n\nAnd the rest:\n\n" + second).success


def test_wrong_capital_costs_one_cell() -> None:
    rows = PERFECT_ROWS[:3] + ["| Ivory Coast | Abidjan | 25,069,229 |"]
    s = score(table(rows))
    assert s.item_f1 == approx(11 / 12)
    assert s.row_f1 == approx(0.75)


def test_parenthesised_code_and_comma_suffix_match() -> None:
    gold = [{"country": "United States", "capital": "Washington", "currency": "USD"}]
    answer = "| Country | Capital | Currency |\n|--|--|--|\n| United States | Washington, D.C. | US Dollar (USD) |"
    assert score_table(answer, ["country", "capital", "currency"], ["country"], gold).success


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="gold row"):
        score_table("| a |", COLS, KEYS, [])
    with pytest.raises(ValueError, match="key columns"):
        score_table("| a |", COLS, ["iso"], GOLD)
    with pytest.raises(ValueError, match="tolerance"):
        score_table("| a |", COLS, KEYS, GOLD, rel_tol=-1)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234,567", 1234567),
        ("1 234 567", 1234567),
        ("1.234.567", 1234567),
        ("1.2 million", 1_200_000),
        ("1.23e6", 1_230_000),
        ("547,030 km²", 547030),
        ("66.99M", 66_990_000),
        ("~12k", 12_000),
        ("2.5 billion", 2_500_000_000),
        ("**3,000**", 3000),
        ("0.5", 0.5),
    ],
)
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text) == pytest.approx(value)


def test_parse_number_without_a_number() -> None:
    assert parse_number("unknown") is None
    assert parse_number("-") is None


def test_normalize_text() -> None:
    assert normalize_text("Côte d’Ivoire") == normalize_text("cote d'ivoire") == "cote d ivoire"
    assert normalize_text("**The Gambia**") == "gambia"
    assert normalize_text("St. Helena") == "saint helena"


def test_parse_markdown_tables_finds_header_and_rows() -> None:
    tables = parse_markdown_tables("intro\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\noutro")
    assert tables == [(["a", "b"], [["1", "2"], ["3", "4"]])]


def test_score_exact() -> None:
    assert score_exact("The currency is the CFA franc.\nAnswer: XOF", "XOF").success
    assert score_exact("Answer: **Euro (EUR)**", "EUR").success
    assert score_exact("lusaka.", "Lusaka").success
    assert score_exact("Answer: Lomé", "Lome").success
    assert score_exact("Answer: Congo", "Democratic Republic of the Congo", aliases=ALIASES).success is False
    assert score_exact("Answer: DRC", "Democratic Republic of the Congo", aliases=ALIASES).success
    wrong = score_exact("Answer: Abidjan", "Yamoussoukro")
    assert (wrong.item_f1, wrong.row_f1, wrong.success) == (0.0, 0.0, False)
    assert score_exact("Answer: 1.2 million", 1_201_000).success
    assert not score_exact("Answer: 1.3 million", 1_201_000).success


def test_unnamed_headers_and_numbered_keys() -> None:
    # "Name" is the key column; with as many columns as asked, the unknown header takes what is left.
    answer = "| Name | Hauptstadt | Population |\n|---|---|---|\n" + "\n".join(
        f"| {i}. {g['country']} | {g['capital']} | {g['population']} |" for i, g in enumerate(GOLD, start=1)
    )
    assert score(answer).success
    # An unrecognised extra column does not take a requested one when the counts differ.
    answer2 = "| Country | Foo | Bar | Population |\n|---|---|---|---|\n" + "\n".join(
        f"| {g['country']} | {g['capital']} | x | {g['population']} |" for g in GOLD
    )
    assert score(answer2).item_recall == approx(8 / 12)


def test_neighbour_header_maps_to_country_key() -> None:
    gold = [{"country": "Chad", "capital": "N'Djamena"}, {"country": "Niger", "capital": "Niamey"}, {"country": "Mali", "capital": "Bamako"}]
    answer = "| Neighboring country | Capital |\n|--|--|\n| Chad | N’Djamena |\n| Niger | Niamey |\n| Mali | Bamako |"
    assert score_table(answer, ["country", "capital"], ["country"], gold).success
