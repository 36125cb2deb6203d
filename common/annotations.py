"""DLBCL-Morph's ``annotations.csv``: ROI boxes per slide, read by column name (any order, case and
spaces ignored, ``pat_id`` for ``patient_id``, extra columns such as a pandas index ignored).
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from pathlib import Path

from common.errors import UserError

# Read by 02 (tiling) and 07 (whole-slide maps scored against the ROIs), so it lives here.


# annotations.csv columns by name (after lower-casing and turning spaces and hyphens into "_"), with the
# other names each may go by; any order, other columns (e.g. a pandas index) ignored.
ANNOTATION_COLUMNS = {"patient_id": ("patient_id", "pat_id"), "tma_id": ("tma_id",), "stain": ("stain",),
                      "xs": ("xs",), "ys": ("ys",), "xe": ("xe",), "ye": ("ye",)}


def _column_name(text: str) -> str:
    return re.sub(r"[\s-]+", "_", text.strip().lower())


def annotation_columns(header: list[str], path: Path) -> dict[str, int]:
    """Index of each of ``ANNOTATION_COLUMNS`` in the header row.

    Raises:
        UserError: a column is missing or given twice (one line: expected names, names found)."""
    names = [_column_name(h) for h in header]
    found, problems = {}, []
    for column, aliases in ANNOTATION_COLUMNS.items():
        where = [i for i, name in enumerate(names) if name in aliases]
        if len(where) == 1:
            found[column] = where[0]
        else:
            problems.append(f"{'no' if not where else 'more than one'} {column!r} column")
    if problems:
        expected = ", ".join(" or ".join(a) for a in ANNOTATION_COLUMNS.values())
        raise UserError(f"{path}: {'; '.join(problems)}; expected a header row with the columns {expected} "
                        f"(any order, case and spaces ignored), found: {', '.join(map(repr, header)) or 'nothing'}")
    return found


def read_annotations(path: Path, stain: str) -> tuple[dict[str, list], list[dict], Counter]:
    """ROIs of one stain grouped by tma_id, the rows skipped as malformed, and the stains seen.

    Columns are found by name in the header row (``annotation_columns``). Blank rows (a trailing empty
    line, or only commas as spreadsheets export them) are ignored.

    Returns:
        ({tma_id: [(row_number, patient_id, (xs, ys, xe, ye)), ...]}, [{item, reason}, ...],
         Counter {stain: rows} over the well-formed rows)

    Raises:
        UserError: the file is missing or its header lacks a column.
    """
    if not path.is_file():
        raise UserError(f"annotations not found: {path} (expected the DLBCL-Morph layout TMA/annotations.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    col = annotation_columns(rows[0] if rows else [], path)
    box_columns = [col[c] for c in ("xs", "ys", "xe", "ye")]
    width = max(col.values()) + 1
    by_slide: dict[str, list] = {}
    skipped, stains = [], Counter()
    for number, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        if len(row) < width or not all(_is_number(row[i]) for i in box_columns):
            skipped.append({"item": f"annotations.csv row {number}", "reason": "malformed_row",
                            "detail": f"expected {width} columns with numeric xs, ys, xe, ye, got {row!r}"})
            continue
        stains[row[col["stain"]].strip()] += 1
        if row[col["stain"]].strip() != stain:
            continue
        box = tuple(int(float(row[i])) for i in box_columns)
        by_slide.setdefault(row[col["tma_id"]].strip(), []).append((number, row[col["patient_id"]].strip(), box))
    return by_slide, skipped, stains


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
