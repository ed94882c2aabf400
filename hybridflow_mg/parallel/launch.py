"""Rank discovery for SPMD launches (torchrun, srun, mpirun/mpiexec) and torch.distributed init.

`discover(env)` is pure: it reads one launcher's variables and returns a `LaunchInfo`, or raises
`LaunchError` with one line when they are missing or contradict each other. Precedence, first
match wins: torchrun (RANK/WORLD_SIZE; also correct for torchrun started by srun, where SLURM_NTASKS
counts nodes), SLURM (SLURM_PROCID), Open MPI (OMPI_COMM_WORLD_*), MPICH/Intel MPI/PMI (PMI_RANK,
PMIX_RANK), else one process. For MPI launches the master address and port come from MASTER_ADDR /
MASTER_PORT when set, else from rank 0 through mpi4py when it imports, else loopback when every
rank is on one node.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Mapping

DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The launcher's environment is missing or inconsistent; the message says which variable."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun, slurm, openmpi, pmi or single."""
    local_world_size: int | None = None


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"launch variable {name}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu-a[003-005,9],cpu1' → 'gpu-a003'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise LaunchError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port_from_job(job_id: str | None) -> int:
    """Every rank of a SLURM job derives the same port without talking: 15000 + job id mod 20000."""
    if not job_id or not job_id.isdigit():
        return DEFAULT_PORT
    return 15000 + int(job_id) % 20000


def _checked(info: LaunchInfo, source: str) -> LaunchInfo:
    if info.world_size <= 0:
        raise LaunchError(f"{source}: world size {info.world_size} must be positive")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{source}: rank {info.rank} is outside the world of {info.world_size} processes")
    if not 0 <= info.local_rank < info.world_size:
        raise LaunchError(f"{source}: local rank {info.local_rank} is outside the world of {info.world_size}")
    if info.local_world_size is not None and not 0 <= info.local_rank < info.local_world_size:
        raise LaunchError(f"{source}: local rank {info.local_rank} is not below the local world size {info.local_world_size}")
    if not 0 < info.master_port < 65536:
        raise LaunchError(f"{source}: master port {info.master_port} is not a TCP port")
    return info


def discover(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank, world, local rank and rendezvous address from the launcher's environment."""
    env = os.environ if env is None else env
    port_env = _int(env, "MASTER_PORT")
    addr_env = env.get("MASTER_ADDR") or None

    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if rank is None or world is None:
            raise LaunchError("torchrun-style launch needs both RANK and WORLD_SIZE; one of them is missing")
        local = _int(env, "LOCAL_RANK")
        return _checked(LaunchInfo(rank, world, 0 if local is None else local, addr_env or "127.0.0.1",
                                   port_env or DEFAULT_PORT, "torchrun", _int(env, "LOCAL_WORLD_SIZE")), "torchrun")

    if "SLURM_PROCID" in env:
        rank = _int(env, "SLURM_PROCID")
        # inside an srun step SLURM_STEP_NUM_TASKS is the step's size; SLURM_NTASKS is the allocation's
        world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
        if world is None:
            raise LaunchError("SLURM launch: SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = addr_env or (first_host(nodes) if nodes else "127.0.0.1")
        local = _int(env, "SLURM_LOCALID")
        return _checked(LaunchInfo(rank, world, 0 if local is None else local, addr,
                                   port_env or _port_from_job(env.get("SLURM_JOB_ID")), "slurm"), "SLURM")

    for launcher, rank_var, size_var, local_vars, local_size_vars in (
        ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
        ("pmi", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
        ("pmi", "PMIX_RANK", "PMIX_SIZE", ("PMIX_LOCAL_RANK",), ("PMIX_LOCAL_SIZE",)),
    ):
        if rank_var not in env:
            continue
        rank, world = _int(env, rank_var), _int(env, size_var)
        if world is None:
            raise LaunchError(f"MPI launch: {rank_var} is set but {size_var} is not")
        local = next((v for v in (_int(env, n) for n in local_vars) if v is not None), None)
        local_size = next((v for v in (_int(env, n) for n in local_size_vars) if v is not None), None)
        single_node = local_size is not None and local_size == world
        info = LaunchInfo(rank, world, rank if local is None and single_node else (local or 0),
                          addr_env or ("127.0.0.1" if single_node else ""), port_env or 0, launcher, local_size)
        return _checked(info, launcher) if info.master_addr and info.master_port else _mpi_rendezvous(info)

    return LaunchInfo(0, 1, 0, addr_env or "127.0.0.1", port_env or DEFAULT_PORT, "single")


def _mpi_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """Fill master address/port from rank 0 over MPI (mpi4py); fail with one line without it."""
    try:
        from mpi4py import MPI  # lazy: only MPI launches pay for it
    except ImportError:
        if info.master_addr and not info.master_port:
            return _checked(replace(info, master_port=DEFAULT_PORT), "MPI")
        raise LaunchError("MPI launch across nodes: set MASTER_ADDR (and MASTER_PORT) or install mpi4py") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise LaunchError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says "
                          f"{info.rank} of {info.world_size}; launch with one mpirun")
    addr, port = info.master_addr, info.master_port
    if info.rank == 0:
        addr = addr or _routable_address()
        port = port or free_port()
    addr, port = comm.bcast((addr, port), root=0)
    return _checked(replace(info, master_addr=addr, master_port=port), "MPI")


def _routable_address() -> str:
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def free_port() -> int:
    """A TCP port free right now on this host (for single-node launches and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(local_rank: int):
    """CUDA device local_rank % count when CUDA is present, else the CPU. Detected once, here."""
    import torch

    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_minutes: int = 30, env: Mapping[str, str] | None = None):
    """Discover the launch, pick the device and start torch.distributed once; returns (info, device).

    Re-entrant: when the default group already exists (tests, or a caller that started it) it is
    reused as is.
    """
    import torch
    import torch.distributed as dist

    info = discover(env)
    if info.launcher == "single" and not (env if env is not None else os.environ).get("MASTER_PORT"):
        info = replace(info, master_port=free_port())  # a lone process (a notebook) may not own 29500
    device = select_device(info.local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("dist.backend=nccl needs CUDA, and this process sees no GPU; use dist.backend=gloo or auto")
    if not dist.is_initialized():
        # Expose the rendezvous the same way torchrun does, for libraries that read it (vLLM does).
        for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                           ("MASTER_ADDR", info.master_addr), ("MASTER_PORT", info.master_port)):
            os.environ[key] = str(value)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    elif dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise LaunchError(f"torch.distributed already runs as rank {dist.get_rank()} of {dist.get_world_size()} "
                          f"but the launcher says {info.rank} of {info.world_size}")
    return info, device
