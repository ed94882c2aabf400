"""The reshard executor: the mechanics that carry out a `RankPlan` (see plan.py for the data).

Per gather bucket: pack this rank's training tensors straight into its slot of the gathered buffer
(one `torch.cat`), `all_gather_into_tensor` in the micro-DP group (in place: the input is the slot),
then one `CopyProgram` launch scatters every member's tensors into the destinations. Per exchange
bucket: pack the pieces for each peer, `all_to_all_single` in the training replica, one launch to
scatter. Buffers live for one bucket and are released at the end, so the extra memory is one
bucket's buffers (`RankPlan.peak_buffer_bytes`).
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


class Resharder:
    """Moves this rank's training tensors into its generation tensors, as planned.

    `sources[i]` is the live tensor of `plan.train[i]`; `dests[j]` the destination of `plan.dests[j]`
    (e.g. a vLLM parameter, written in place). Both must keep their storage for the resharder's life.
    """

    def __init__(self, plan: RankPlan, sources: list[torch.Tensor], dests: list[torch.Tensor], *,
                 micro_group: dist.ProcessGroup | None, replica_group: dist.ProcessGroup | None,
                 device: torch.device | None = None):
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
        dst_dtype = dests[0].dtype if dests else self.dtype
        self._dst_dtype = dst_dtype
        n_micro = len(plan.micro_group)
        self.gather_programs = [
            CopyProgram(b.copies, dests, self.dtype, self.device, src_numel=b.elems_per_member * n_micro)
            for b in plan.gathers]
        self.exchange_programs = [
            CopyProgram(e.copies, dests, self.dtype, self.device, src_numel=sum(e.recv_splits))
            for e in plan.exchanges]
        self._zero_padding()

    def _zero_padding(self) -> None:
        """Destination rows that are vocab padding are never written by a reshard: make them zero once."""
        with torch.no_grad():
            for ref, t in zip(self.plan.dests, self.dests):
                pad = (ref.index < 0).nonzero().squeeze(1)
                if len(pad):
                    t.index_fill_(ref.rule.index_dim, pad.to(t.device), 0)

    @torch.no_grad()
    def run(self) -> ReshardStats:
        start = time.perf_counter()
        recv = calls = 0
        n_micro = len(self.plan.micro_group)
        for bucket, program in zip(self.plan.gathers, self.gather_programs):
            out = torch.empty(bucket.elems_per_member * n_micro, dtype=self.dtype, device=self.device)
            slot = out.narrow(0, self.slot * bucket.elems_per_member, bucket.elems_per_member)
            torch.cat([self.sources[i].reshape(-1) for i in bucket.tensors], out=slot)
            dist.all_gather_into_tensor(out, slot, group=self.micro_group)
            calls += 1
            recv += (out.numel() - slot.numel()) * out.element_size()
            program.run(out)
            del out, slot
        for bucket, program in zip(self.plan.exchanges, self.exchange_programs):
            pieces = [self.sources[p.tensor].index_select(self.plan.train[p.tensor].rule.index_dim,
                                                          p.rows.to(self.device)).reshape(-1)
                      for peer in bucket.send for p in peer]
            send = torch.cat(pieces) if pieces else torch.empty(0, dtype=self.dtype, device=self.device)
            incoming = torch.empty(sum(bucket.recv_splits), dtype=self.dtype, device=self.device)
            dist.all_to_all_single(incoming, send, bucket.recv_splits, bucket.send_splits, group=self.replica_group)
            calls += 1
            recv += (incoming.numel() - bucket.recv_splits[self.me]) * incoming.element_size()
            program.run(incoming)
            del send, incoming, pieces
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return ReshardStats(recv_bytes=recv, collectives=calls, seconds=time.perf_counter() - start,
                            peak_buffer_bytes=self.plan.peak_buffer_bytes)
