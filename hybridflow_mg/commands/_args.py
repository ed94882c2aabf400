"""Small argument parsers shared by commands."""
from __future__ import annotations

import difflib
import os


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


def check_out_file(path: str | None, flag: str = "--out") -> None:
    """A one-line ValueError when the file `path` cannot be written: it is a directory, or its folder
    does not exist. None (no file asked for) passes."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give the path of a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: folder {folder!r} does not exist; create it or choose another path")


def parse_bytes(text: str) -> int:
    """'500MB' → 500_000_000; '2GiB' → 2·2**30; a bare number is bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = text.strip().upper()
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"size {text!r} is not a size like 500MB or 2GB") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


def launched_world():
    """(rank, world, barrier) for commands that run alone or under a launcher (gloo, CPU work)."""
    from hybridflow_mg.parallel.launch import discover

    if discover().world_size == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    from hybridflow_mg.parallel.launch import init_distributed

    init_distributed(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), lambda: dist.barrier()
