"""A real `mpirun -n 2` launch (Open MPI, installed by launch/setup.sh) initialises the process grid.

Rank discovery reads OMPI_COMM_WORLD_*; the master port comes from rank 0 through mpi4py."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.multirank import ROOT, worker_env


def test_mpirun_two_ranks_initialise_the_grid():
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun is missing: launch/setup.sh installs Open MPI (apt-get install openmpi-bin)")
    env = worker_env()
    env.pop("MASTER_PORT", None)
    cmd = [mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           sys.executable, "-m", "hybridflow_mg.cli", "grid", "--train", "tp=2,pp=1", "--gen", "tp=1", "--init", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "process grid initialised on 2 ranks (openmpi, gloo)" in proc.stdout
    plan, _ = json.JSONDecoder().raw_decode(proc.stdout)
    assert [row["micro_dp_group"] for row in plan["ranks"]] == [[0, 1], [0, 1]]
