"""UID syntax (PS3.5 9.1)."""

from __future__ import annotations

import re

# Digits and dots, at most 64 characters. Leading zeros in a component are tolerated: they are
# common in real data and harmless, while anything else (letters, '/', '..') is refused.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None
