"""Multi-rank checks for pytest on gloo: one launch runs many checks.

A *check module* (tests/ranks/*.py) defines functions decorated with `@rank_check`. The pytest side
calls `results(module, nproc)`, which launches the module ONCE per session under torchrun with
`nproc` CPU processes; the worker (`tests/ranks/worker.py`) runs every check in order on every rank,
recording pass/fail per rank as JSON lines. Each pytest test then asserts one check's result, so a
failure is reported under its own name with the failing ranks' tracebacks, while the launch cost
(about 3 s per rank of imports on 2 cores) is paid once.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CHECKS: dict[str, list[str]] = {}
# One folder per pytest session, known to every launch (HFMG_TEST_SHARED), for results that checks of
# different launches compare (e.g. a 1-rank reference against a 4-rank layout).
SHARED = os.environ.get("HFMG_TEST_SHARED") or tempfile.mkdtemp(prefix="hf_shared_")


def rank_check(fn):
    """Mark `fn` (no arguments) as a check that every rank runs; order of definition is run order."""
    _CHECKS.setdefault(fn.__module__, []).append(fn.__name__)
    fn.rank_check = True
    return fn


def check_names(module: str) -> list[str]:
    __import__(module)
    return list(_CHECKS.get(module, []))


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR", HFMG_TEST_SHARED=SHARED, **extra)
    return env


@functools.cache
def results(module: str, nproc: int, timeout: int = 900) -> dict:
    """{check: {rank: {"ok": bool, "error": str}}} plus "_launch" with the launch's output tail."""
    out_dir = Path(tempfile.mkdtemp(prefix="hf_ranks_"))
    cmd = torchrun_command(nproc, "-m", "tests.ranks.worker", module, str(out_dir))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)
        tail, code = (proc.stdout + proc.stderr)[-6000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        tail, code = f"launch timed out after {timeout}s\n{(e.stdout or b'')[-3000:]!r}", -1
    table: dict = {"_launch": {"returncode": code, "tail": tail}}
    for path in sorted(out_dir.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            table.setdefault(rec["check"], {})[rank] = rec
    shutil.rmtree(out_dir, ignore_errors=True)
    return table


def assert_rank_check(module: str, nproc: int, name: str) -> None:
    table = results(module, nproc)
    per_rank = table.get(name, {})
    launch = table["_launch"]
    if len(per_rank) != nproc:
        pytest.fail(f"check {name} reported on {sorted(per_rank)} of {nproc} ranks "
                    f"(launch exit {launch['returncode']}):\n{launch['tail']}")
    failed = {r: rec["error"] for r, rec in sorted(per_rank.items()) if not rec["ok"]}
    if failed:
        first = next(iter(failed))
        pytest.fail(f"check {name} failed on ranks {sorted(failed)}; rank {first}:\n{failed[first]}")
