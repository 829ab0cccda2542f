"""WideSearch-style scoring of a markdown-table answer, and exact-match scoring of a short answer.

Rules (docs/widegeo.md): the table is parsed leniently from the agent's final text; its rows are
aligned with the gold rows by the key column(s) after normalisation (case, accents, punctuation,
aliases); every requested cell of a row is an item. Item precision = correct cells / (predicted
rows x columns), item recall = correct cells / (gold rows x columns). A row is correct when all its
requested cells are. Success = every gold row correct and no extra rows. Numbers match within a
relative tolerance and may be written "1,234,567", "1.2 million", "1.23e6" or "547,030 km²".
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

from planner.envs.base import GoldValue, Score

DEFAULT_REL_TOL = 0.01

_SEP_CELL = re.compile(r"^:?-+:?$")
_PAREN = re.compile(r"\(([^()]*)\)")
_MARKUP = re.compile(r"[*`~]")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:[,\u00a0\u202f' ]\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?"
    r"|[-+]?\.\d+(?:e[-+]?\d+)?",
    re.IGNORECASE,
)
_EURO_THOUSANDS = re.compile(r"^\d{1,3}(?:\.\d{3}){2,}$")
_SCALES = (
    (re.compile(r"^\s*(?:billion|bn|b)\b", re.IGNORECASE), 1e9),
    (re.compile(r"^\s*(?:million|mio|mn|m)\b", re.IGNORECASE), 1e6),
    (re.compile(r"^\s*(?:thousand|k)\b", re.IGNORECASE), 1e3),
)
_ANSWER_MARK = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)
_ENUMERATION = re.compile(r"^\s*\d+[.)]\s+")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")

# Header words that mean a requested column (after normalisation).
HEADER_SYNONYMS: dict[str, list[str]] = {
    "population": ["pop", "inhabitants", "people", "population total"],
    "country": ["nation", "country name", "territory", "country territory", "neighbour", "neighbor",
                "neighbouring country", "neighboring country", "bordering country"],
    "city": ["town", "city name"],
    "capital": ["capital city"],
    "currency": ["currency code", "iso currency code", "iso 4217"],
    "area km2": ["area", "total area", "area sq km", "surface area", "area square km"],
}


def normalize_text(text: str) -> str:
    """Case, accents, markup and punctuation folded away: 'Côte d’Ivoire' -> 'cote d ivoire'."""
    s = _LINK.sub(r"\1", str(text))
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    s = _MARKUP.sub("", s).lower().replace("&", " and ").replace("_", " ")
    s = re.sub(r"[^\w\s]", " ", s)
    words = s.split()
    if words and words[0] == "the" and len(words) > 1:
        words = words[1:]
    words = ["saint" if w == "st" else w for w in words]
    return " ".join(words)


def parse_number(text: str | float | int) -> float | None:
    """The first number in a cell, with scale words: '1.2 million' -> 1200000.0; None if none."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = _MARKUP.sub("", _LINK.sub(r"\1", str(text))).replace("\u2212", "-")
    token = next(iter(_EURO_THOUSANDS.findall(s.strip())), None)
    if token is not None:  # "1.234.567": dots as thousands separators
        return float(token.replace(".", ""))
    m = _NUMBER.search(s)
    if m is None:
        return None
    raw = re.sub(r"[,\u00a0\u202f' ]", "", m.group(0))
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    rest = s[m.end():]
    for pattern, factor in _SCALES:
        if pattern.match(rest):
            return value * factor
    return value


def _string_variants(cell: str) -> set[str]:
    """A cell's readings: whole, without parentheses, inside parentheses, before a comma."""
    out = {normalize_text(cell)}
    out.add(normalize_text(_ENUMERATION.sub("", cell)))  # "3. Salvador" -> "Salvador"
    out.add(normalize_text(_PAREN.sub(" ", cell)))
    out.update(normalize_text(inner) for inner in _PAREN.findall(cell))
    if "," in cell:
        out.add(normalize_text(cell.split(",", 1)[0]))
    out.discard("")
    return out


@dataclass
class CellMatcher:
    """Decides whether an answer cell matches a gold value (aliases and tolerance included)."""

    aliases: dict[str, list[str]] = field(default_factory=dict)
    rel_tol: float = DEFAULT_REL_TOL
    column_rel_tol: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rel_tol < 0 or any(t < 0 for t in self.column_rel_tol.values()):
            raise ValueError("relative tolerances must be >= 0")
        self._accepted: dict[str, set[str]] = {}
        for gold, names in self.aliases.items():
            self._accepted[normalize_text(gold)] = {normalize_text(n) for n in names} - {""}

    def accepted(self, gold: str) -> set[str]:
        g = normalize_text(gold)
        return {g} | self._accepted.get(g, set())

    def matches(self, cell: str, gold: GoldValue, column: str = "") -> bool:
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            value = parse_number(cell)
            if value is None:
                return False
            tol = self.column_rel_tol.get(column, self.rel_tol)
            return abs(value - gold) <= tol * abs(gold) if gold != 0 else value == 0
        return bool(_string_variants(cell) & self.accepted(str(gold)))


# ---------------------------------------------------------------- markdown tables


def _split_row(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    cells = re.split(r"(?<!\\)\|", s)
    return [c.replace("\\|", "|").strip() for c in cells]


def _is_separator(cells: list[str]) -> bool:
    return bool(cells) and all(_SEP_CELL.match(c.replace(" ", "")) for c in cells if c) and any(cells)


def parse_markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table in `text` as (header cells, body rows). Surrounding prose is ignored."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []

    def flush() -> None:
        rows = [r for r in block if any(c for c in r)]
        block.clear()
        if len(rows) < 2:
            return
        sep = next((i for i, r in enumerate(rows) if _is_separator(r)), None)
        if sep is not None and sep >= 1:
            header, body = rows[sep - 1], [r for r in rows[sep + 1:] if not _is_separator(r)]
        else:
            header, body = rows[0], [r for r in rows[1:] if not _is_separator(r)]
        tables.append((header, body))

    for line in str(text).splitlines():
        if "|" in line and line.count("|") >= 1 and line.strip().strip("|").strip():
            block.append(_split_row(line))
        elif line.strip() and _is_separator(_split_row(line)) and block:
            continue
        else:
            flush()
    flush()
    return tables


def _tokens(s: str) -> set[str]:
    return set(normalize_text(s.replace("²", "2")).split())


def map_header(header: list[str], columns: list[str], key_columns: list[str] | None = None) -> dict[str, int]:
    """Requested column -> index in the answer's header (case, order, synonyms and units tolerated)."""
    norm_headers = [normalize_text(_PAREN.sub(lambda m: " " + m.group(1) + " ", h.replace("²", "2"))) for h in header]
    bare_headers = [normalize_text(_PAREN.sub(" ", h)) for h in header]
    mapping: dict[str, int] = {}
    used: set[int] = set()
    col_norm = {c: normalize_text(c.replace("_", " ")) for c in columns}

    def take(col: str, pred) -> None:
        if col in mapping:
            return
        for i in range(len(header)):
            if i not in used and pred(i):
                mapping[col] = i
                used.add(i)
                return

    # Exact names first, then synonyms, then token overlap: an exact header is never stolen.
    for col in columns:
        take(col, lambda i, c=col: col_norm[c] in (norm_headers[i], bare_headers[i]))
    for col in columns:
        syns = {normalize_text(s) for s in HEADER_SYNONYMS.get(col_norm[col], [])}
        take(col, lambda i, s=syns: norm_headers[i] in s or bare_headers[i] in s)
    for col in columns:
        ct = set(col_norm[col].split())
        take(col, lambda i, ct=ct: bool(_tokens(header[i])) and (ct <= _tokens(header[i]) or _tokens(header[i]) <= ct))
    # A bare "Name" header is the (first) key column's.
    if key_columns and key_columns[0] not in mapping:
        take(key_columns[0], lambda i: bare_headers[i] == "name")
    # Same number of columns as asked: the columns still unnamed take the headers still unused, in order.
    if len(header) == len(columns):
        rest = [i for i in range(len(header)) if i not in used]
        for col, i in zip([c for c in columns if c not in mapping], rest):
            mapping[col] = i
    return mapping


@dataclass
class _Row:
    cells: dict[str, str]


def _rows_from_answer(answer: str, columns: list[str], key_columns: list[str]) -> list[_Row] | None:
    """Rows of every table whose header names all key columns (tables are concatenated, since a
    swarm's answer may join several sub-agents' tables). None when no table is usable."""
    rows: list[_Row] = []
    found = False
    tables = parse_markdown_tables(answer)
    for header, body in tables:
        mapping = map_header(header, columns, key_columns)
        if not all(k in mapping for k in key_columns):
            continue
        found = True
        for r in body:
            rows.append(_Row({c: (r[i] if i < len(r) else "") for c, i in mapping.items()}))
    return rows if found else None


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


ZERO = Score(item_f1=0.0, item_precision=0.0, item_recall=0.0, row_f1=0.0, success=False)


def score_table(
    answer: str,
    columns: list[str],
    key_columns: list[str],
    gold: list[dict[str, GoldValue]],
    aliases: dict[str, list[str]] | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
    column_rel_tol: dict[str, float] | None = None,
) -> Score:
    """Item- and row-level precision/recall/F1 of a markdown-table answer against gold rows."""
    if not gold:
        raise ValueError("score_table needs at least one gold row")
    bad = [k for k in key_columns if k not in columns]
    if bad or not key_columns:
        raise ValueError(f"key columns {key_columns} must be a non-empty subset of columns {columns}")
    matcher = CellMatcher(aliases or {}, rel_tol, column_rel_tol or {})
    pred = _rows_from_answer(answer, columns, key_columns)
    if not pred:
        return ZERO
    gold_used = [False] * len(gold)
    correct_cells = 0
    correct_rows = 0
    for row in pred:
        # Align by key: the first gold row not yet taken whose key cells all match. A duplicated
        # answer row finds its gold row taken and counts as an extra (wrong) row.
        j = next(
            (
                j
                for j, g in enumerate(gold)
                if not gold_used[j] and all(matcher.matches(row.cells.get(k, ""), g[k], k) for k in key_columns)
            ),
            None,
        )
        if j is None:
            continue
        gold_used[j] = True
        hits = sum(1 for c in columns if c in row.cells and matcher.matches(row.cells[c], gold[j][c], c))
        correct_cells += hits
        correct_rows += hits == len(columns)
    n_cols = len(columns)
    ip = correct_cells / (len(pred) * n_cols)
    ir = correct_cells / (len(gold) * n_cols)
    rp = correct_rows / len(pred)
    rr = correct_rows / len(gold)
    return Score(
        item_f1=_f1(ip, ir),
        item_precision=ip,
        item_recall=ir,
        row_f1=_f1(rp, rr),
        success=correct_rows == len(gold) == len(pred),
    )


def answer_candidates(answer: str) -> list[str]:
    """Readings of a short free-text answer: all of it, after 'answer:', its first bold span, its last line."""
    text = str(answer).strip()
    out = [text]
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        out.append(text[marks[-1].end():].strip().splitlines()[0] if text[marks[-1].end():].strip() else "")
    bold = _BOLD.search(text)
    if bold:
        out.append(bold.group(1))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        out.append(lines[-1])
    return [c.strip().rstrip(".").strip() for c in out if c.strip()]


def score_exact(
    answer: str,
    gold: GoldValue,
    aliases: dict[str, list[str]] | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
) -> Score:
    """Exact match after normalisation (numbers within `rel_tol`): all four scores 1 or 0."""
    matcher = CellMatcher(aliases or {}, rel_tol)
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        ok = any(matcher.matches(c, gold) for c in answer_candidates(answer)[1:] or answer_candidates(answer))
    else:
        ok = any(matcher.matches(c, gold) for c in answer_candidates(answer))
    v = 1.0 if ok else 0.0
    return Score(item_f1=v, item_precision=v, item_recall=v, row_f1=v, success=ok)
