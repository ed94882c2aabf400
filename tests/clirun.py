"""`hybridflow-mg` in this process, for the tests of its commands' answers (no interpreter start per call)."""
from __future__ import annotations

import contextlib
import io
import subprocess


def cli(*args) -> subprocess.CompletedProcess:
    """The command line run in-process (same parsing and dispatch as `hybridflow-mg`): exit status,
    stdout and stderr as a CompletedProcess."""
    from hybridflow_mg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
