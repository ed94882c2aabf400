"""`--nproc N`: N local workers of one `hybridflow-mg` command, run as one job.

torchrun starts workers too, but three things a user of `hybridflow-mg train --nproc N` relies on it
does not give, so this small launcher does (torchrun stays the documented launcher for `torchrun ...
-m hybridflow_mg.cli`, and srun/mpirun for clusters):

* Exit codes pass through: 0 done, 2 bad input (`EXIT_USAGE`), 75 preempted and resumable
  (`EXIT_RESUMABLE`); any other failure is 1. torchrun turns every failure into 1.
* One line: the first rank that fails writes its one-line error to a file this launcher gives it;
  the launcher prints that line (naming the rank) and stops the other workers, instead of 30–60 lines
  of a launcher's report. A rank that dies by a signal is named with the signal.
* Signals reach every worker: SIGTERM, SIGINT and SIGUSR1 sent to the command are forwarded (the
  trainer then finishes its step, saves and exits resumable); workers die with the launcher
  (PR_SET_PDEATHSIG), so a killed launcher leaves no orphans.

Workers are started with torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so `launch.discover` sees an ordinary torchrun launch.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXIT_USAGE = 2
"""Bad input: a config, file or flag the user must fix (one line says which)."""
EXIT_RESUMABLE = 75
"""Preempted (SIGTERM/SIGUSR1, or the time limit): a checkpoint was saved and the same command resumes
(EX_TEMPFAIL in sysexits.h: "try again later"). A requeue script requeues on this code only."""
ERROR_DIR_ENV = "HYBRIDFLOW_ERROR_DIR"
"""Set for workers of this launcher: where each failing rank writes its one-line error (`rank_R`)."""
SETTLE_S = 3.0
"""After the first failure, how long the other workers get to exit on their own (a bad config fails
every rank at once) before they are stopped."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SAID_BEFORE_S = 1.0
"""A rank's line written this long before the first worker exited explains that exit (see `_verdict`)."""


def _worker_preexec() -> None:  # runs in the child between fork and exec
    os.setsid()  # its own process group: signals and kills reach what it spawns too
    try:  # die with the launcher (Linux): a SIGKILLed launcher leaves no orphan workers
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def write_error_line(rank: int, line: str) -> bool:
    """Under this launcher, leave `line` for it to print (True); elsewhere do nothing (False)."""
    where = os.environ.get(ERROR_DIR_ENV)
    if not where:
        return False
    path = Path(where) / f"rank_{rank}"
    path.with_suffix(".tmp").write_text(line.strip().splitlines()[0] if line.strip() else "failed")
    os.replace(path.with_suffix(".tmp"), path)
    return True


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` without its `--nproc N` / `--nproc=N` (what each worker is given)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run `hybridflow-mg <argv>` as `nproc` local workers; returns the job's exit code (see module doc)."""
    from hybridflow_mg.parallel.launch import free_port

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    errors = Path(tempfile.mkdtemp(prefix="hybridflow_errors_"))
    port = free_port()
    workers: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **{ERROR_DIR_ENV: str(errors)})
        workers.append(subprocess.Popen([sys.executable, "-m", "hybridflow_mg.cli", *argv], env=env,
                                        preexec_fn=_worker_preexec))

    def forward(signum, _frame):
        for w in workers:
            _signal_group(w, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        codes = _wait(workers)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for w in workers:  # whatever is left of the job (grandchildren included) goes with it
            _signal_group(w, signal.SIGKILL)
    code, line = _verdict(codes, errors)
    for f in errors.iterdir():
        f.unlink()
    errors.rmdir()
    if line:
        print(f"hybridflow-mg: error: {line}", file=sys.stderr)
    return code


def _signal_group(worker: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(worker.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(workers: list[subprocess.Popen]) -> list[tuple[int, float]]:
    """(exit code, wall-clock time of exit) per worker; after the first failure the rest get `SETTLE_S` to exit,
    then are killed."""
    done: dict[int, tuple[int, float]] = {}
    deadline = None
    while len(done) < len(workers):
        for rank, w in enumerate(workers):
            if rank not in done and w.poll() is not None:
                done[rank] = (w.returncode, time.time())  # wall clock: compared with error files' mtimes
                if w.returncode not in (0, EXIT_RESUMABLE) and deadline is None:  # 75: the others are saving too
                    deadline = time.monotonic() + SETTLE_S
        if deadline is not None and time.monotonic() > deadline:
            for rank, w in enumerate(workers):
                if rank not in done:
                    _signal_group(w, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
    return [done[r] for r in range(len(workers))]


def _verdict(codes: list[tuple[int, float]], errors: Path) -> tuple[int, str | None]:
    """The job's exit code, and the one line to print (None when there is nothing to say)."""
    if all(c == 0 for c, _ in codes):
        return 0, None
    if all(c == EXIT_RESUMABLE for c, _ in codes):
        return EXIT_RESUMABLE, None  # the trainer said so itself
    failed = sorted((t, r, c) for r, (c, t) in enumerate(codes) if c not in (0, EXIT_RESUMABLE))
    written = {int(p.name[5:]): p.read_text().strip() for p in errors.glob("rank_*")}
    usage = [r for r in written if codes[r][0] == EXIT_USAGE]
    if usage:  # bad input: every rank says the same, or one rank met it (a bad reward) and the others lost it
        return EXIT_USAGE, written[min(usage, key=lambda r: (codes[r][1], r))]
    died, rank, code = failed[0]
    # lines written well before the first exit (a progress watchdog's, before NCCL aborts its process),
    # not the echoes of that exit in the other ranks
    said = [r for r in written if (errors / f"rank_{r}").stat().st_mtime <= died - SAID_BEFORE_S]
    if code < 0 and not said:  # the first to go was killed by a signal, and nobody had said why
        return 1, f"rank {rank} was killed by {signal.Signals(-code).name}; the other ranks were stopped"
    first = min(said, key=lambda r: (errors / f"rank_{r}").stat().st_mtime) if said else (
        min(written, key=lambda r: codes[r][1]) if written else None)
    if first is not None:  # a line that names its ranks itself (parallel/progress.py) is printed as it is
        line = written[first] if written[first].startswith("rank ") else f"rank {first}: {written[first]}"
        return (EXIT_USAGE if codes[first][0] == EXIT_USAGE else 1), line
    return 1, f"rank {rank} exited with status {code}; the other ranks were stopped"
