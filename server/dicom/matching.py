"""In-memory attribute matching (PS3.4 C.2.2.2), for keys that have no catalog column.

The SQL compiler in ``server.catalog.search`` implements the same rules for catalog columns; one
table-driven test runs both so they cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from server.dicom.json import text_values
from server.dicom.query import Constraint, MatchKind, Term


@lru_cache(maxsize=1024)
def wildcard_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """``*`` matches any run of characters, ``?`` exactly one (PS3.4 C.2.2.2.4)."""
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _fold(vr: str, ignore_case: bool, text: str) -> str:
    return text.casefold() if vr == "PN" and ignore_case else text


def term_matches(term: Term, vr: str, value: str, ignore_case: bool) -> bool:
    """Does one stored (non-empty) value satisfy one term?"""
    if term.kind is MatchKind.SINGLE:
        if vr in ("IS", "DS", "US", "UL", "SS", "SL"):
            try:
                return float(value) == float(term.value)
            except ValueError:
                return False
        return _fold(vr, ignore_case, value.rstrip(" ")) == _fold(vr, ignore_case, term.value)
    if term.kind is MatchKind.WILDCARD:
        return wildcard_regex(term.value, vr == "PN" and ignore_case).fullmatch(value) is not None
    if term.kind is MatchKind.RANGE:
        return (not term.value or value >= term.value) and (not term.upper or value <= term.upper)
    return False


def values_match(c: Constraint, values: Sequence[str], ignore_case: bool) -> bool:
    """A stored attribute matches if any of its values satisfies any term.

    An attribute that is absent or empty in the archive matches only universal matching.
    """
    if c.universal:
        return True
    present = [v for v in values if v not in ("", None)]
    return any(term_matches(t, c.vr, v, ignore_case) for t in c.terms for v in present)


def matches_json(c: Constraint, dataset: Mapping[str, Any], ignore_case: bool) -> bool:
    """Match a constraint against a dataset in DICOM JSON form; sequences match if any item does."""
    element = dataset.get(f"{c.tag:08X}")
    if c.universal:
        return True
    if c.vr == "SQ":
        items = (element or {}).get("Value", [])
        return any(
            all(matches_json(sub, item, ignore_case) for sub in term.items)
            for term in c.terms
            for item in items
        )
    return values_match(c, text_values(element), ignore_case)
