"""Files written whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` under a temporary name beside it (`<name>.tmp`), then rename it into place:
    a reader (or a crash) never sees half a file. Returns the path. Raises OSError as `open` does."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
