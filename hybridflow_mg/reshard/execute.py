"""The reshard executor: the mechanics that carry out a `RankPlan` (see plan.py for the data).

Per gather bucket: pack this rank's training tensors straight into its slot of the gathered buffer
(one `torch.cat`), `all_gather_into_tensor` in the micro-DP group (in place: the input is the slot),
then one `CopyProgram` launch scatters every member's tensors into the destinations. Per exchange
bucket: pack the pieces for each peer straight into the send buffer, `all_to_all_single` in the
training replica, one launch to scatter.

Buffers. Every bucket's buffers are carved from one flat workspace of the largest bucket's size
(`RankPlan.peak_buffer_bytes` on NCCL), so the extra memory is one bucket's buffers. On GPU the
workspace is allocated per `run` and released at its end (the caching allocator reuses the block;
`empty_cache` hands it to the rollout engine). On CPU it is kept for the resharder's life: glibc
returns a freed buffer of this size to the OS, and every reshard then page-faults it back in — on
the 2-core test VM ~5k faults per 20 MB, more CPU time than the copies and the transfer together.

Gloo. `all_gather_into_tensor` on gloo is an allgather into a hidden, freshly allocated flat buffer
of the output's size plus a copy-out (ProcessGroupGloo's allgather work), i.e. twice the memory
traffic and a page-faulted temporary every call. On gloo groups the gather bucket is therefore one
`all_to_all_single` from a send buffer that holds this rank's slot once per member: same bytes on
the wire, same one collective per bucket, written straight into the workspace; the send copies take
the place of gloo's hidden buffer (counted in `ReshardStats.peak_buffer_bytes`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow_mg.reshard.kernels import CopyProgram
from hybridflow_mg.reshard.plan import RankPlan


@dataclass
class ReshardStats:
    recv_bytes: int
    """Bytes received from other ranks, counted at the collectives."""
    collectives: int
    seconds: float
    peak_buffer_bytes: int
    """The workspace: bytes of the largest bucket's buffers, alignment included (the extra memory)."""


def _is_gloo(group: dist.ProcessGroup | None) -> bool:
    return dist.get_backend(group) == "gloo"


def _aligned(numel: int) -> int:
    """Offsets inside the workspace, rounded up so every buffer starts 16-byte aligned (vector copies)."""
    return -(-numel // 64) * 64


class Resharder:
    """Moves this rank's training tensors into its generation tensors, as planned.

    `sources[i]` is the live tensor of `plan.train[i]`; `dests[j]` the destination of `plan.dests[j]`
    (e.g. a vLLM parameter, written in place). Both must keep their storage for the resharder's life.
    `keep_workspace`: keep the bucket workspace between runs (default: on CPU only); `gather_by_alltoall`:
    gather buckets by `all_to_all_single` (default: on gloo groups only). See the module docstring.
    """

    def __init__(self, plan: RankPlan, sources: list[torch.Tensor], dests: list[torch.Tensor], *,
                 micro_group: dist.ProcessGroup | None, replica_group: dist.ProcessGroup | None,
                 device: torch.device | None = None, keep_workspace: bool | None = None,
                 gather_by_alltoall: bool | None = None):
        if len(sources) != len(plan.train) or len(dests) != len(plan.dests):
            raise ValueError(f"plan has {len(plan.train)} sources / {len(plan.dests)} destinations, "
                             f"got {len(sources)} / {len(dests)}")
        for ref, t in [*zip(plan.train, sources), *zip(plan.dests, dests)]:
            if tuple(t.shape) != ref.shape:
                raise ValueError(f"{ref.name}: tensor has shape {list(t.shape)}, the plan expects {list(ref.shape)}")
        self.plan = plan
        self.sources = sources
        self.dests = dests
        self.dtype = sources[0].dtype if sources else torch.float32
        self.device = device or (sources[0].device if sources else torch.device("cpu"))
        self.micro_group, self.replica_group = micro_group, replica_group
        self.me = plan.replica_group.index(plan.rank)
        self.slot = plan.micro_group.index(plan.rank)
        n_micro = len(plan.micro_group)
        self.gather_programs = [
            CopyProgram(b.copies, dests, self.dtype, self.device, src_numel=b.elems_per_member * n_micro)
            for b in plan.gathers]
        self.exchange_programs = [
            CopyProgram(e.copies, dests, self.dtype, self.device, src_numel=sum(e.recv_splits))
            for e in plan.exchanges]
        # what each exchange bucket sends, resolved once: (source, split dim, rows on the device, shape)
        self.send_pieces = [[self._piece(p) for peer in e.send for p in peer] for e in plan.exchanges]
        self.gather_by_alltoall = (bool(plan.gathers) and _is_gloo(micro_group) if gather_by_alltoall is None
                                   else gather_by_alltoall)
        sends = 2 if self.gather_by_alltoall else 1  # the gathered buffer, and on gloo its send copies
        self.workspace_numel = max([_aligned(b.elems_per_member * n_micro) * sends for b in plan.gathers]
                                   + [_aligned(sum(e.send_splits)) + sum(e.recv_splits) for e in plan.exchanges],
                                   default=0)
        self.keep_workspace = self.device.type == "cpu" if keep_workspace is None else keep_workspace
        self._workspace: torch.Tensor | None = None
        self._zero_padding()

    def _piece(self, piece) -> tuple[torch.Tensor, int, torch.Tensor, tuple[int, ...]]:
        src, dim = self.sources[piece.tensor], self.plan.train[piece.tensor].rule.index_dim
        shape = list(src.shape)
        shape[dim] = len(piece.rows)
        return src, dim, piece.rows.to(self.device), tuple(shape)

    def _zero_padding(self) -> None:
        """Destination rows that are vocab padding are never written by a reshard: make them zero once."""
        with torch.no_grad():
            for ref, t in zip(self.plan.dests, self.dests):
                pad = (ref.index < 0).nonzero().squeeze(1)
                if len(pad):
                    t.index_fill_(ref.rule.index_dim, pad.to(t.device), 0)

    def _get_workspace(self) -> torch.Tensor:
        if self._workspace is not None:
            return self._workspace
        workspace = torch.empty(self.workspace_numel, dtype=self.dtype, device=self.device)
        if self.keep_workspace:
            self._workspace = workspace
        return workspace

    def release_workspace(self) -> None:
        """Drop a kept workspace (the next `run` allocates it again)."""
        self._workspace = None

    @torch.no_grad()
    def run(self) -> ReshardStats:
        start = time.perf_counter()
        recv = calls = 0
        n_micro = len(self.plan.micro_group)
        workspace = self._get_workspace()
        for bucket, program in zip(self.plan.gathers, self.gather_programs):
            n = bucket.elems_per_member
            out = workspace.narrow(0, 0, n * n_micro)
            if self.gather_by_alltoall:
                send = workspace.narrow(0, _aligned(n * n_micro), n * n_micro)
                mine = send.narrow(0, 0, n)
                torch.cat([self.sources[i].reshape(-1) for i in bucket.tensors], out=mine)
                for k in range(1, n_micro):
                    send.narrow(0, k * n, n).copy_(mine)
                dist.all_to_all_single(out, send, group=self.micro_group)
            else:
                slot = out.narrow(0, self.slot * n, n)
                torch.cat([self.sources[i].reshape(-1) for i in bucket.tensors], out=slot)
                dist.all_gather_into_tensor(out, slot, group=self.micro_group)
            calls += 1
            recv += n * (n_micro - 1) * out.element_size()
            program.run(out)
        for bucket, program, pieces in zip(self.plan.exchanges, self.exchange_programs, self.send_pieces):
            num_send, num_recv = sum(bucket.send_splits), sum(bucket.recv_splits)
            send = workspace.narrow(0, 0, num_send)
            offset = 0
            for src, dim, rows, shape in pieces:
                numel = int(torch.Size(shape).numel())
                torch.index_select(src, dim, rows, out=send.narrow(0, offset, numel).view(shape))
                offset += numel
            incoming = workspace.narrow(0, _aligned(num_send), num_recv)
            dist.all_to_all_single(incoming, send, bucket.recv_splits, bucket.send_splits, group=self.replica_group)
            calls += 1
            recv += (num_recv - bucket.recv_splits[self.me]) * incoming.element_size()
            program.run(incoming)
        del workspace
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return ReshardStats(recv_bytes=recv, collectives=calls, seconds=time.perf_counter() - start,
                            peak_buffer_bytes=self.workspace_numel * self.dtype.itemsize)
