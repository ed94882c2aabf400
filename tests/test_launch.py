"""Rank discovery from each launcher's variables (pure: the environments are written here).

SLURM itself cannot run on this machine; these tests cover our side of the seam: the variables srun
sets, as documented by SLURM, turned into rank, world, local rank and rendezvous address."""
import pytest

from hybridflow_mg.parallel.launch import DEFAULT_PORT, LaunchError, discover, first_host


def test_torchrun_variables():
    info = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                     "MASTER_ADDR": "node7", "MASTER_PORT": "29411"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.launcher) == \
        (5, 8, 1, "node7", 29411, "torchrun")


def test_torchrun_started_by_srun_uses_torchrun_numbers():
    # srun starts one torchrun per node (SLURM_NTASKS=2); torchrun's own world of 16 wins
    info = discover({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (info.rank, info.world_size, info.launcher) == (9, 16, "torchrun")


def test_slurm_variables():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3",
           "SLURM_STEP_NODELIST": "gpu-a[003-004,9]", "SLURM_JOB_ID": "123456"}
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 8, 3, "slurm")
    assert info.master_addr == "gpu-a003"
    assert info.master_port == 15000 + 123456 % 20000  # every rank derives the same port
    assert discover({**env, "MASTER_PORT": "4000", "MASTER_ADDR": "head"}).master_port == 4000


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("n[01-04]", "n01"), ("a[7,9],b[1-2]", "a7"),
                                            ("c001,c002", "c001"), ("rack1-n[100-101]", "rack1-n100")])
def test_slurm_node_lists(nodelist, first):
    assert first_host(nodelist) == first


def test_openmpi_single_node_uses_loopback():
    info = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                     "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "29555"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.launcher) == \
        (1, 2, 1, "127.0.0.1", 29555, "openmpi")


def test_mpich_pmi_variables():
    info = discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                     "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == (2, 4, 0, "10.0.0.1", "pmi")


def test_no_launcher_is_one_process():
    info = discover({})
    assert (info.rank, info.world_size, info.master_port, info.launcher) == (0, 1, DEFAULT_PORT, "single")


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0"}, "needs both RANK and WORLD_SIZE"),
    ({"RANK": "8", "WORLD_SIZE": "8"}, "rank 8 is outside the world of 8"),
    ({"RANK": "x", "WORLD_SIZE": "8"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "not below the local world size"),
    ({"SLURM_PROCID": "0"}, "neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "outside the world"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "is not a TCP port"),
])
def test_inconsistent_variables_fail_with_one_line(env, message):
    with pytest.raises(LaunchError, match=message) as err:
        discover(env)
    assert "\n" not in str(err.value)


def test_local_launch_passes_our_arguments_through_and_decides_the_job_status(tmp_path):
    from hybridflow_mg.parallel.local_launch import EXIT_RESUMABLE, _verdict, without_nproc

    argv = ["generate", "--nproc", "2", "--hf", "m", "--n", "4", "--nproc=3", "--prompts", "p.jsonl"]
    assert without_nproc(argv) == ["generate", "--hf", "m", "--n", "4", "--prompts", "p.jsonl"]
    assert _verdict([(0, 1.0), (0, 2.0)], tmp_path) == (0, None)
    assert _verdict([(EXIT_RESUMABLE, 1.0), (EXIT_RESUMABLE, 1.1)], tmp_path) == (EXIT_RESUMABLE, None)
    assert _verdict([(0, 1.0), (-9, 2.0)], tmp_path) == (1, "rank 1 was killed by SIGKILL; the other ranks were stopped")
    (tmp_path / "rank_1").write_text("RuntimeError: boom")
    (tmp_path / "rank_0").write_text("RuntimeError: a peer closed the connection")
    assert _verdict([(1, 5.0), (1, 4.0)], tmp_path) == (1, "rank 1: RuntimeError: boom")  # the first to fail
    (tmp_path / "rank_0").write_text("bad key")
    (tmp_path / "rank_1").write_text("bad key")
    assert _verdict([(2, 1.0), (2, 1.0)], tmp_path) == (2, "bad key")  # bad input: said once, no rank
