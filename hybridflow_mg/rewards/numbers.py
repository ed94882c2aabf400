"""Exact number parsing shared by the rule rewards.

Numbers become `fractions.Fraction`, so `0.5`, `1/2` and `.50` compare equal exactly and no float
tolerance is needed (nor wanted: `0.33` is not `1/3`).
"""
from __future__ import annotations

import re
from fractions import Fraction

# An optionally signed decimal with optional thousands separators: 1,234.5  -7  .25  3.
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")
# The same, as it appears inside free text; the trailing lookahead stops "3." at the 3.
NUMBER_IN_TEXT_RE = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")

_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number, or None.

    Accepts integers and decimals with a sign, thousands commas (`1,234`), a leading `$`, and a simple
    fraction of two such numbers (`-3/4`, `1.5/2`). Anything else (letters, `1,2` as a list, `1e3`,
    empty text) is None.
    """
    text = text.strip().replace("$", "").replace(" ", "")
    if not text:
        return None
    if text.count("/") == 1:
        num, den = (parse_number(part) for part in text.split("/"))
        if num is None or den is None or den == 0:
            return None
        return num / den
    if "," in text:
        if not _THOUSANDS_RE.match(text):
            return None
        text = text.replace(",", "")
    if not NUMBER_RE.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    return Fraction(text)


def numbers_in(text: str) -> list[str]:
    """Every number written in free text, in order, as written (commas and `$` kept)."""
    return NUMBER_IN_TEXT_RE.findall(text)
