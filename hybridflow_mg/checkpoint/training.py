"""Training checkpoints as directories: written atomically, found, verified, pruned. No roles here.

A checkpoint `checkpoints/step_N` (or `checkpoints/final`) is written into `step_N.partial/` by every
rank; when all ranks are done, the logging rank writes the marker `COMPLETE` last (the step, and the
size of every file) and renames the directory into place. So:

* a directory named without `.partial` exists only once complete; a kill at any moment of a save
  leaves the previous checkpoints as they were, and its partial directory is removed at the next start;
* a checkpoint replaces an older one of the same name only after it is itself complete;
* loading checks the marker and every file's size first, so a truncated or missing file is a one-line
  error before anything is read.

What a checkpoint holds is the trainer's business (`trainer/checkpoint.py`, and the README).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"
PARTIAL = ".partial"
FORMAT = "hybridflow_mg.training/1"
FINAL = "final"


def step_name(step: int) -> str:
    """The directory name of the checkpoint after RL step `step`."""
    return f"step_{step}"


def partial_dir(directory: Path) -> Path:
    """Where the checkpoint that will be `directory` is written."""
    return directory.with_name(directory.name + PARTIAL)


def start_partial(directory: Path) -> Path:
    """An empty partial directory for `directory` (a leftover from a killed save is removed). One rank."""
    tmp = partial_dir(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(directory: Path, *, step: int, info: dict) -> Path:
    """Mark the partial checkpoint of `directory` complete and move it into place (logging rank, after
    every rank has written its files). `info` goes into the marker (layout, world, ...)."""
    tmp = partial_dir(directory)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    marker = tmp / MARKER
    with open(marker, "w") as f:
        json.dump({"format": FORMAT, "step": step, **info, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return replace_dir(tmp, directory)


def replace_dir(new: Path, directory: Path) -> Path:
    """Move the complete directory `new` to `directory`. What `directory` held is moved aside to
    `directory.old` first and deleted only after the move (a kill in between leaves it whole there, and
    `remove_partial` puts it back); the parent is fsynced so the rename survives a node crash too."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # replaced only now that its successor is complete
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    os.replace(new, directory)
    _fsync_dir(directory.parent)  # the rename itself survives a crash of the node, not only of the job
    if old.exists():
        shutil.rmtree(old)
    return directory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(directory: Path) -> dict:
    """The marker of a complete checkpoint; a ValueError naming the path when it is missing or corrupt."""
    path = directory / MARKER
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a complete training checkpoint (no {MARKER}); "
                         "was its save interrupted? Resume from an earlier one")
    try:
        marker = json.loads(path.read_text())
        if marker.get("format") != FORMAT or not isinstance(marker.get("step"), int):
            raise ValueError("unknown format or no step")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{str(path)!r} is corrupt ({e}); resume from an earlier checkpoint") from None
    return marker


def verify(directory: Path) -> dict:
    """`read_marker`, and every file it lists present with its size; returns the marker."""
    marker = read_marker(directory)
    for rel, size in marker.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise ValueError(f"checkpoint {str(directory)!r} is missing {rel}; resume from an earlier checkpoint")
        if path.stat().st_size != size:
            raise ValueError(f"checkpoint file {str(path)!r} has {path.stat().st_size} bytes, {size} were written "
                             "(truncated?); resume from an earlier checkpoint")
    return marker


def named(path: str, root: Path) -> tuple[Path, dict]:
    """The checkpoint `trainer.resume` names, verified, with its marker; one-line ValueError otherwise
    (`root` is the run's checkpoint folder, for the hint)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"trainer.resume = {path!r} does not exist; give a checkpoint directory "
                         f"(e.g. {root / step_name(100)}), auto or never")
    return directory, verify(directory)


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under `root`, oldest first (`final` after a
    `step_N` of the same step)."""
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        if d.is_dir() and not d.name.endswith((PARTIAL, ".old")) and (d / MARKER).is_file():
            try:
                found.append((read_marker(d)["step"], d.name == FINAL, d))
            except ValueError:
                continue  # corrupt: not a candidate for `auto`; named explicitly, it is an error
    return [(step, d) for step, _, d in sorted(found)]


def remove_partial(root: Path) -> list[Path]:
    """Delete what killed saves left under `root`; returns what was removed. One rank.

    A kill between `commit`'s two renames leaves `X.old` (the complete predecessor) and no `X`: `X.old`
    is put back as `X` instead of being deleted."""
    if not root.is_dir():
        return []
    for old in [d for d in root.iterdir() if d.is_dir() and d.name.endswith(".old")]:
        original = old.with_name(old.name.removesuffix(".old"))
        if not original.exists() and (old / MARKER).is_file():
            old.rename(original)
    gone = [d for d in root.iterdir() if d.is_dir() and d.name.endswith((PARTIAL, ".old"))]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` `step_N` checkpoints (never `final`). One rank."""
    steps = [d for _, d in complete(root) if d.name != FINAL]
    gone = steps[:-keep_last] if keep_last > 0 else []
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone
