"""Row filters: a plan node may ask the runtime to keep only the rows of its markdown table(s) that
satisfy one condition ("population > 5,000,000", "languages contains English").

Why in the runtime and not in the agent: looking facts up is copying, which a small model does
well; deciding row by row whether a copied number passes a threshold or a list names a language is
reasoning, which it does badly (a 20M-parameter sub-agent that copies every row of a lookup table
exactly drops the wrong rows when asked to filter). The plan states the condition once, the agent
writes the whole table with the column the condition reads, and the filter is exact.

Kept free of Ray: the trace synthesizer (planner.traces) applies the same filter to its oracle answers.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Op = Literal["contains", "=", "!=", ">", ">=", "<", "<="]
NUMERIC_OPS = {">", ">=", "<", "<="}
_SEPARATOR_RE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def is_separator(line: str) -> bool:
    """Whether `line` is a markdown table's header separator (|---|---|)."""
    return _SEPARATOR_RE.match(line.strip()) is not None


# A number as tables write it: "5,000,000", "5 000 000", "-3.5", "1,234 km²".
_NUMBER_RE = re.compile(r"[-+]?\d[\d,\s]*(?:\.\d+)?")


# Words a condition may be written with ("population more than 5,000,000", "languages have English"),
# longest first so "at least" is not read as a column named "... at".
OP_WORDS: dict[str, str] = {
    ">=": ">=", "<=": "<=", "!=": "!=", ">": ">", "<": "<", "=": "=",
    "more than": ">", "greater than": ">", "over": ">", "less than": "<", "under": "<", "at least": ">=",
    "at most": "<=", "is not": "!=", "is": "=", "equals": "=", "contains": "contains", "have": "contains",
    "has": "contains", "includes": "contains", "include": "contains",
}
_TEXT_RE = re.compile(
    r"^\s*(?P<column>.+?)\s*(?P<op>" + "|".join(
        (re.escape(w) if not w[0].isalpha() else rf"\b{re.escape(w)}\b") for w in sorted(OP_WORDS, key=len, reverse=True)
    ) + r")\s*(?P<value>.+?)\s*$", re.IGNORECASE)


class RowFilter(BaseModel):
    """Keep a table row when its cell in `column` satisfies `op value`.

    Also accepted as one string, "COLUMN OP VALUE", with OP a symbol or words: "population > 5,000,000",
    "population more than 5,000,000", "languages have English", "rank at most 120". A plan-writing
    model copies such a phrase from its task ("... a population of more than 5,000,000 ...") where a
    bare value has no words before it to copy after.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1, max_length=64, description="header of the column the condition reads")
    op: Op = Field(description="contains (whole words, any case), =, != (text, any case; numbers by value), >, >=, <, <=")
    value: str = Field(min_length=1, max_length=200, description="what the cell is compared with")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        m = _TEXT_RE.match(data)
        if not m:
            raise ValueError(f"row filter {data!r} is not 'COLUMN OP VALUE' (OP: {', '.join(OP_WORDS)})")
        return {"column": m["column"], "op": OP_WORDS[m["op"].lower()], "value": m["value"]}

    @field_validator("column", "value")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v.strip()

    @field_validator("value")
    @classmethod
    def _numeric_value(cls, v: str, info) -> str:  # noqa: ANN001 - pydantic's ValidationInfo
        op = info.data.get("op")
        if op in NUMERIC_OPS and parse_number(v) is None:
            raise ValueError(f"op {op!r} compares numbers, but value {v!r} is not a number")
        return v

    def describe(self) -> str:
        return f"{self.column} {self.op} {self.value}"


def parse_number(text: str) -> float | None:
    """The first number in `text` ("44,494,502" -> 44494502.0), or None."""
    m = _NUMBER_RE.search(text)
    if not m:
        return None
    try:
        return float(re.sub(r"[,\s]", "", m.group(0)))
    except ValueError:
        return None


def _norm(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).casefold()


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row_passes(f: RowFilter, cell: str) -> bool:
    """Whether one cell satisfies the filter; a cell that cannot be compared does not."""
    if f.op == "contains":
        return re.search(rf"(?<!\w){re.escape(f.value)}(?!\w)", cell, re.IGNORECASE) is not None
    a, b = parse_number(cell), parse_number(f.value)
    if f.op in NUMERIC_OPS:
        if a is None or b is None:
            return False
        return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[f.op]
    same = (a == b) if (a is not None and b is not None) else _norm(cell) == _norm(f.value)
    return same if f.op == "=" else not same


# Columns whose value names one row of a table: a ranking has one row per rank.
UNIQUE_COLUMNS = {"rank"}


def _filter_rows(f: RowFilter, text: str) -> tuple[str, int, int, int]:
    """(text left, rows kept, rows failing the condition, repeated rows dropped)."""
    lines = text.splitlines()
    out: list[str] = []
    kept = dropped = repeats = 0
    col = None  # index of the filtered column in the table being read, None outside such a table
    # A row is a repeat when its key was kept before in the same table: the whole row, or for a unique
    # column its value alone (two rows with the same rank are one too many, equal or not).
    unique = _norm(f.column) in UNIQUE_COLUMNS
    seen: set = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if col is not None and stripped.startswith("|"):
            cells = _cells(stripped)
            if not (col < len(cells) and row_passes(f, cells[col])):
                dropped += 1
            else:
                row = tuple(_norm(c) for c in cells)
                key = row[col] if unique else row
                if key in seen:
                    repeats += 1
                else:
                    seen.add(key)
                    out.append(line)
                    kept += 1
            i += 1
            continue
        col = None
        if stripped.startswith("|") and i + 1 < len(lines) and is_separator(lines[i + 1]):
            header = [_norm(c) for c in _cells(stripped)]
            if _norm(f.column) in header:
                col = header.index(_norm(f.column))
                seen = set()
            out += [line, lines[i + 1]]
            i += 2
            continue
        out.append(line)
        i += 1
    return "\n".join(out), kept, dropped, repeats


def apply_row_filter(f: RowFilter, text: str) -> tuple[str, int, int]:
    """(text with the failing and the repeated rows removed, rows kept, rows dropped).

    Every markdown table whose header names `f.column` (any case; '_' and spaces alike) is filtered;
    other tables and all text outside tables are left as they are. In a filtered table a row that
    repeats an earlier kept row is dropped too, and so is a second row for the same value of a
    column that names one row (UNIQUE_COLUMNS: "rank"): a small model that copies a ranking can loop
    back over rows it already wrote ("| 4 | Takoradi | ..." again), and each repeat would be one more
    wrong row in the answer. The first row wins, as swarm.fan_out.distinct keeps a list's first item."""
    out, kept, dropped, repeats = _filter_rows(f, text)
    return out, kept, dropped + repeats


def filter_answer(f: RowFilter | None, text: str) -> tuple[str, str]:
    """(the answer `f` leaves, a note saying what it did for the job's events); no filter: (text, "")."""
    if f is None:
        return text, ""
    out, kept, dropped, repeats = _filter_rows(f, text)
    total = kept + dropped + repeats
    if total == 0:
        return text, f"keep_rows ({f.describe()}): no table row under a column {f.column!r}; nothing filtered"
    note = f"keep_rows ({f.describe()}): kept {kept} of {total} rows"
    return out, note + (f" ({repeats} repeated {'row' if repeats == 1 else 'rows'} dropped)" if repeats else "")
