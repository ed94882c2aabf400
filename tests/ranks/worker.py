"""Runs every `@rank_check` of one module on this rank and records results (see tests/multirank.py).

Usage (under torchrun): python -m tests.ranks.worker tests.ranks.<module> OUT_DIR
"""
from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path


def main(module_name: str, out_dir: str) -> int:
    import torch.distributed as dist

    from hybridflow_mg.parallel.launch import init_distributed
    from tests.multirank import _CHECKS

    # A check that fails on one rank leaves the others waiting in a collective: the timeout turns
    # that hang into failures of this check instead of a stuck test run.
    init_distributed(backend="gloo", timeout_minutes=3)
    rank = dist.get_rank()
    module = importlib.import_module(module_name)
    out = Path(out_dir) / f"rank{rank}.jsonl"
    failures = 0
    for name in _CHECKS.get(module_name, []):
        start = time.perf_counter()
        try:
            getattr(module, name)()
            rec = {"check": name, "ok": True, "error": ""}
        except Exception:  # noqa: BLE001 - every failure is recorded and reported by pytest
            rec = {"check": name, "ok": False, "error": traceback.format_exc()[-4000:]}
            failures += 1
        rec["seconds"] = round(time.perf_counter() - start, 2)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        try:
            dist.monitored_barrier(timeout=timedelta(minutes=3), wait_all_ranks=True)
        except Exception:  # noqa: BLE001 - a rank died or hung; stop rather than cascade
            return 1
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
