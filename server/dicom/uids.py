"""UID syntax (PS3.5 9.1)."""

from __future__ import annotations

import re

# Digits and dots, at most 64 characters. Leading zeros in a component are tolerated: they are
# common in real data and harmless, while anything else (letters, '/', '..') is refused.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


# Identifies this implementation in the file meta of every file we write (PS3.7 D.3.3.2) and in
# association negotiation. A UUID-derived UID (PS3.5 B.2): no registered root needed.
IMPLEMENTATION_CLASS_UID = "2.25.196454335432207298347424542232396893057"
IMPLEMENTATION_VERSION_NAME = "IMAGING_010"
