"""Small argument parsers shared by commands."""
from __future__ import annotations

import difflib


def parse_sizes(text: str, allowed: tuple[str, ...], flag: str) -> dict[str, int]:
    """'tp=2,pp=4' → {'tp': 2, 'pp': 4}; unknown or malformed parts raise a one-line ValueError."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{flag} {text!r}: write sizes as key=value, e.g. {flag} {allowed[0]}=2")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{flag}: unknown size {key!r}{hint}; valid: {', '.join(allowed)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{flag}: {key}={value!r} is not an integer") from None
    return out
