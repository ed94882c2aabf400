"""Which rank stopped making progress: a stage record per rank in the job's rendezvous store.

When one rank blocks (a reward function waiting on a lock, a hung file system), the others wait in
the next collective until `dist.timeout_minutes` runs out and then fail with a timeout that names
only themselves, the victims. So every rank records where it is, one small key per rank in the c10d
store that the process group was started with (`rank → "count|step|stage"`, one store write per stage
of a step), and a rank that has waited in one stage for most of the timeout reads the records: the
ranks behind the furthest one are the ones that stopped, and its error says so.

Two paths report it, because backends end a timed-out wait differently:

* gloo raises a RuntimeError in the waiting rank: `explain(error)` turns it into `StalledRanks`.
* NCCL's watchdog aborts the process (SIGABRT) without Python seeing an exception; so a watchdog
  thread reports at 90 % of the timeout, before that, through the same one-line channel the CLI
  uses (`local_launch.write_error_line`, else stderr).

    progress = Progress.of_world(timeout_minutes)
    progress.arrive("reward", step)           # on entering each stage
    ...
    except Exception as e:
        raise progress.explain(e) from e      # "rank 1 stopped making progress: ..."
"""
from __future__ import annotations

import sys
import threading
import time

import torch.distributed as dist

PREFIX = "hybridflow/progress/"
WATCH_FRACTION = 0.9
"""The watchdog reports once a rank has waited this share of `dist.timeout_minutes` in one stage."""


class StalledRanks(RuntimeError):
    """Some ranks stopped making progress and the others timed out waiting for them; the message says
    which (the CLI prints it as it is; `already_said` when the watchdog printed it before)."""

    plain = True
    already_said = False


class Progress:
    """Stage records of every rank in a c10d `store` (None: recording off, e.g. no store available).

    `timeout_minutes` (the process groups' timeout) enables the diagnosis: without it, or with one
    rank, `explain` returns errors unchanged and no watchdog runs."""

    def __init__(self, store, rank: int, world: int, timeout_minutes: float | None = None, *, watch: bool = True):
        self.store, self.rank, self.world = store, rank, world
        self.timeout_minutes = timeout_minutes
        self.count, self.entered, self.step = 0, time.monotonic(), 0
        self.reported: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.arrive("setup", 0)
        if watch and store is not None and timeout_minutes and world > 1:
            try:
                reader = store.clone()  # its own connection, off the main thread's
            except Exception:  # noqa: BLE001 - a store without clone: share it (its client locks)
                reader = store
            threading.Thread(target=self._watch, args=(reader,), name="hybridflow-progress", daemon=True).start()

    @classmethod
    def of_world(cls, timeout_minutes: float | None = None) -> "Progress":
        """Records in the default process group's store (collective-free); off when that is unavailable."""
        try:
            store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):
            store = None
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_minutes)

    def arrive(self, stage: str, step: int | None = None) -> None:
        """Record that this rank entered `stage` of `step` (default: the step of the last record; one
        store write). Call it before each collective that a stalled peer would leave waiting."""
        with self._lock:
            self.count += 1
            self.entered = time.monotonic()
            self.step = self.step if step is None else step
            count, step = self.count, self.step
        if self.store is not None:
            try:
                self.store.set(f"{PREFIX}{self.rank}", f"{count}|{step}|{stage}")
            except Exception:  # noqa: BLE001 - the store's host is gone: the job is ending anyway
                self.store = None

    def close(self) -> None:
        """Stop the watchdog (the run is over)."""
        self._stop.set()

    # --- reading the records -----------------------------------------------------------------------------
    def records(self, store=None) -> dict[int, tuple[int, int, str]]:
        """rank → (count, step, stage) of every rank ({} when the store is unreachable or a rank has no
        record yet). Two store requests."""
        store = store if store is not None else self.store
        if store is None:
            return {}
        keys = [f"{PREFIX}{r}" for r in range(self.world)]
        try:
            if not store.check(keys):
                return {}
            values = store.multi_get(keys)
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) may be dead
            return {}
        out = {}
        for r, value in enumerate(values):
            count, step, stage = bytes(value).decode().split("|", 2)
            out[r] = (int(count), int(step), stage)
        return out

    def laggards(self, store=None) -> tuple[list[int], str] | None:
        """(the ranks behind the furthest one, a one-line account of them); None when none are behind."""
        records = self.records(store)
        if len(records) < 2:
            return None
        ahead = max(c for c, _, _ in records.values())
        behind = sorted(r for r, (c, _, _) in records.items() if c < ahead)
        if not behind:
            return None
        _, step, stage = records[behind[0]]
        lead = next(rec for rec in records.values() if rec[0] == ahead)
        who = f"rank {behind[0]}" if len(behind) == 1 else f"ranks {', '.join(map(str, behind[:8]))}"
        more = f" and {len(behind) - 8} more" if len(behind) > 8 else ""
        return behind, (f"{who}{more} stopped making progress in stage {stage!r} of step {step}; the other ranks "
                        f"waited in {lead[2]!r} until dist.timeout_minutes={self.timeout_minutes:g} ran out")

    def _waited(self) -> float:
        """Seconds this rank has been in its current stage."""
        with self._lock:
            return time.monotonic() - self.entered

    def explain(self, error: BaseException) -> BaseException:
        """`error`, or a `StalledRanks` naming the ranks that stopped making progress when this rank
        waited for them for most of the timeout and is not behind itself. Errors of this rank's own
        (bad input, a failure that came early in its stage) stay as they are."""
        if not self.timeout_minutes or not isinstance(error, RuntimeError) or isinstance(error, ValueError):
            return error
        if self.reported is None and self._waited() < 0.5 * 60 * self.timeout_minutes:
            return error
        found = self.laggards()
        if found is None or self.rank in found[0]:
            return error
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        stalled = StalledRanks(f"{found[1]} (rank {self.rank} then failed with {type(error).__name__}: {text[:160]})")
        stalled.already_said = self.reported is not None
        return stalled

    def _watch(self, store) -> None:
        """Report stalled peers once, before a backend's watchdog may abort this process."""
        limit = WATCH_FRACTION * 60 * self.timeout_minutes
        while not self._stop.wait(min(5.0, limit / 10)):
            if self._waited() < limit:
                continue
            found = self.laggards(store)
            if found is None or self.rank in found[0]:
                continue
            self.reported = f"{found[1]} (reported by rank {self.rank} before its own timeout)"
            from hybridflow_mg.parallel.local_launch import write_error_line

            if not write_error_line(self.rank, self.reported):
                print(f"hybridflow-mg: error: {self.reported}", file=sys.stderr, flush=True)
            return


__all__ = ["PREFIX", "Progress", "StalledRanks", "WATCH_FRACTION"]
