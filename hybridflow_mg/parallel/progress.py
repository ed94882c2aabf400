"""Which rank stopped making progress: a stage record per rank in the job's rendezvous store.

When one rank blocks (a reward function waiting on a lock, a hung file system), the others wait in
the next collective until `dist.timeout_minutes` runs out and then fail with a timeout that names
only themselves, the victims. So every rank records where it is, one small key per rank in the c10d
store that the process group was started with (`rank → "count|step|stage"`, one store write per stage
of a step), and a rank whose step failed reads the records: the ranks behind the furthest one are the
ones that stopped, and the error says so.

    progress = Progress.of_world()
    progress.arrive("reward", step)           # on entering each stage
    ...
    except Exception as e:
        raise progress.explain(e) from e      # "rank 1 stopped making progress: ..."
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

PREFIX = "hybridflow/progress/"


class StalledRanks(RuntimeError):
    """Some ranks stopped making progress and the others timed out waiting for them; the message says
    which (the CLI prints it as it is)."""

    plain = True


class Progress:
    """Stage records of every rank in a c10d `store` (None: recording off, e.g. no store available)."""

    def __init__(self, store, rank: int, world: int, timeout_minutes: float | None = None):
        self.store, self.rank, self.world = store, rank, world
        self.timeout_minutes = timeout_minutes
        self.count = 0
        self.arrive("setup", 0)

    @classmethod
    def of_world(cls, timeout_minutes: float | None = None) -> "Progress":
        """Records in the default process group's store (collective-free); off when that is unavailable."""
        try:
            store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):
            store = None
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_minutes)

    def arrive(self, stage: str, step: int) -> None:
        """Record that this rank entered `stage` of `step` (one store write)."""
        self.count += 1
        if self.store is not None:
            try:
                self.store.set(f"{PREFIX}{self.rank}", f"{self.count}|{step}|{stage}")
            except Exception:  # noqa: BLE001 - the store's host is gone: the job is ending anyway
                self.store = None

    def records(self) -> dict[int, tuple[int, int, str]]:
        """rank → (count, step, stage) for every rank that has a record ({} when the store is unreachable)."""
        if self.store is None:
            return {}
        out = {}
        try:
            self.store.set_timeout(timedelta(seconds=10))
            keys = [f"{PREFIX}{r}" for r in range(self.world)]
            for r, key in enumerate(keys):
                if self.store.check([key]):
                    count, step, stage = self.store.get(key).decode().split("|", 2)
                    out[r] = (int(count), int(step), stage)
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) may be dead
            return out
        return out

    def laggards(self) -> str | None:
        """A one-line account of the ranks behind the furthest one (None when none are behind)."""
        records = self.records()
        if len(records) < 2:
            return None
        ahead = max(c for c, _, _ in records.values())
        behind = sorted(r for r, (c, _, _) in records.items() if c < ahead)
        if not behind:
            return None
        first = records[behind[0]]
        lead = next(rec for rec in records.values() if rec[0] == ahead)
        who = f"rank {behind[0]}" if len(behind) == 1 else f"ranks {', '.join(map(str, behind[:8]))}"
        waited = (f" until dist.timeout_minutes={self.timeout_minutes:g} ran out" if self.timeout_minutes else "")
        return (f"{who} stopped making progress in stage {first[2]!r} of step {first[1]}; the other ranks waited "
                f"in {lead[2]!r}{waited}")

    def explain(self, error: BaseException) -> BaseException:
        """`error`, or a `StalledRanks` naming the ranks that stopped making progress when some did and
        `error` is what waiting for them gives (a RuntimeError of a collective: timeout, peer gone); this
        rank's own errors (bad input, a ValueError) stay as they are."""
        if isinstance(error, ValueError) or not isinstance(error, RuntimeError):
            return error
        why = self.laggards()
        if why is None or f"rank {self.rank} " in why or f" {self.rank}," in why:  # this rank failed by itself
            return error
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return StalledRanks(f"{why} (rank {self.rank} then failed with {type(error).__name__}: {text[:160]})")
