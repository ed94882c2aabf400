"""`hybridflow-mg`: parse the command line, hand over to one command module, turn user errors into one line.

Each command lives in `hybridflow_mg/commands/<name>.py` with `add_parser(subparsers)` and `run(args)`;
they import heavy libraries (torch, megatron-core, vLLM) only inside `run`, so `--help` and the
planning commands stay instant. User mistakes (ValueError, LaunchError, missing files) print one line
`hybridflow-mg: error: ...` and exit 2; set HYBRIDFLOW_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from hybridflow_mg import __version__

COMMANDS = ("train", "generate", "eval", "sweep", "config", "grid", "plan", "convert", "export", "bench", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridflow-mg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hybridflow-mg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hybridflow_mg.commands.{name}").add_parser(sub)
    return parser


# Library warnings that repeat on every rank and ask nothing of the user (CPU fallbacks, deprecations
# inside megatron-core and vLLM); HYBRIDFLOW_DEBUG=1 shows them again.
QUIET_WARNINGS = (
    "Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated",
    "When using async grad allreduce", "`torch.distributed.reduce_op` is deprecated",
)


def _quiet_libraries() -> None:
    import warnings

    if os.environ.get("HYBRIDFLOW_DEBUG"):
        return
    for text in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's per-rank NUMA notes; its errors stay


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # the command line as given, for commands that relaunch themselves (`--nproc`)
    # `key=value` overrides may follow options (`train CONFIG --nproc 4 a.b=1`); anything else is an error
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (HYBRIDFLOW_DEBUG=1: the traceback)
        return _fail(e)


def _fail(e: Exception) -> int:
    """One line for `e` and the exit code: 2 for bad input (the same on every rank, so rank 0 says it;
    an error marked `one_rank`, such as a bad reward value, is said by the rank that met it), 1 for
    anything else (said by the failing rank, named). Under `--nproc` the line goes to the local
    launcher, which prints the first one and stops the other ranks."""
    from hybridflow_mg.parallel.launch import LaunchError
    from hybridflow_mg.parallel.local_launch import EXIT_USAGE, write_error_line

    if os.environ.get("HYBRIDFLOW_DEBUG"):
        import traceback

        traceback.print_exc()
    rank = _rank()
    if getattr(e, "already_said", False):  # another rank, or this rank's progress watchdog, said it
        return EXIT_USAGE if isinstance(e, ValueError) else 1
    if isinstance(e, (ValueError, LaunchError, FileNotFoundError)):
        line, code = str(e), EXIT_USAGE
        if getattr(e, "one_rank", False) and _world() > 1:  # bad input met by this rank only: say which
            line = f"rank {rank}: {line}"
    elif getattr(e, "plain", False):  # a failure whose message says everything (e.g. parallel/progress.py)
        line, code = str(e), 1
    else:
        text = str(e).strip().splitlines()
        line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
        line, code = line + " (HYBRIDFLOW_DEBUG=1 shows the traceback)", 1
    if write_error_line(rank, line):
        return code
    if code == EXIT_USAGE and (rank == 0 or getattr(e, "one_rank", False)):  # all ranks fail alike: rank 0 says it
        print(f"hybridflow-mg: error: {line}", file=sys.stderr)
    elif code != EXIT_USAGE:
        named = _world() == 1 or line.startswith("rank ")
        print(f"hybridflow-mg: error: {'' if named else f'rank {rank}: '}{line}", file=sys.stderr)
    return code


def _world() -> int:
    for var in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


if __name__ == "__main__":
    sys.exit(main())
