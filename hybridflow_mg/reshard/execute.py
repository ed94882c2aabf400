"""The reshard executor: the mechanics that carry out a `RankPlan` (see plan.py for the data).

Every bucket, gather or exchange, is one step of three parts: *pack* this rank's contribution into a
workspace slot, one *collective*, *scatter* the received buffer into the destinations (one
`CopyProgram` launch). Gather buckets: pack this rank's training tensors straight into its place in
the gathered buffer (one `torch.cat`), `all_gather_into_tensor` in the micro-DP group (in place: the
input is that place). Exchange buckets: pack the pieces for each peer straight into the send buffer,
`all_to_all_single` in the training replica. Steps run gathers first, then exchanges, in plan order
(the same order on every rank).

Buffers. A slot holds the buffers of one bucket, carved from one flat workspace; a slot is as large as
the largest bucket's buffers (`RankPlan.peak_buffer_bytes` on NCCL). On GPU the workspace is allocated
per `run` and released at its end (the caching allocator reuses the block; `empty_cache` hands it to
the rollout engine). On CPU it is kept for the resharder's life: glibc returns a freed buffer of this
size to the OS, and every reshard then page-faults it back in — on the 2-core test VM ~5k faults per
20 MB, more CPU time than the copies and the transfer together.

Overlap. Serial (one slot): pack k, collective k, scatter k, then k + 1. Overlapped (two slots, used
in turn): the collectives are launched with `async_op=True`, and while bucket k's is in flight this
rank packs bucket k + 1 into the other slot; once k's completes, k + 1's is launched and bucket k is
scattered while it runs. So one collective is in flight at a time (every rank issues them in the same
order, across the micro-DP and replica groups, which gloo needs), and a slot is packed again only
after its scatter, on the same stream (on NCCL `work.wait()` makes the current stream wait for the
collective's stream; the packs and scatters stay on the current stream). The workspace is then two
slots. Overlap is opt-in (`overlap=True`; `None`, the default, runs serially): on NCCL the collective
runs on its own stream, beside the packs and scatters on the current one, which is where it should
pay, but that is not yet measured on a GPU, and the second slot doubles the extra memory at the
training → generation switch (which `plan` does not count). On CPU gloo's transfer and the copies
compete for the same cores: on the 2-core test VM (4 ranks, load 13–44) the overlapped medians were
0.74–1.92× the serial speed over 2–26 buckets, with the same CPU seconds, i.e. no gain beyond the
run-to-run spread, for twice the extra memory (benchmarks/results/README.md). When two slots would exceed `max_workspace_bytes`, or there is a single bucket, the
resharder runs serially with one slot.

Gloo. `all_gather_into_tensor` on gloo is an allgather into a hidden, freshly allocated flat buffer
of the output's size plus a copy-out (ProcessGroupGloo's allgather work), i.e. twice the memory
traffic and a page-faulted temporary every call. On gloo groups the gather bucket is therefore one
`all_to_all_single` from a send buffer that holds this rank's place once per member: same bytes on
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
    """The workspace in bytes, alignment included (the extra memory): one slot of the largest bucket's
    buffers when serial, two when overlapped."""
    overlapped: bool = False
    """Whether this run overlapped packing and scattering with the collectives (two slots)."""


def _is_gloo(group: dist.ProcessGroup | None) -> bool:
    return dist.get_backend(group) == "gloo"


def _aligned(numel: int) -> int:
    """Offsets inside the workspace, rounded up so every buffer starts 16-byte aligned (vector copies)."""
    return -(-numel // 64) * 64


@dataclass
class _Step:
    """One bucket: `gather` (index into plan.gathers) or `exchange` (index into plan.exchanges)."""

    kind: str
    index: int
    numel: int
    """Workspace elements its buffers take, alignment between them included."""


class Resharder:
    """Moves this rank's training tensors into its generation tensors, as planned.

    `sources[i]` is the live tensor of `plan.train[i]`; `dests[j]` the destination of `plan.dests[j]`
    (e.g. a vLLM parameter, written in place). Both must keep their storage for the resharder's life.
    `keep_workspace`: keep the bucket workspace between runs (default: on CPU only); `gather_by_alltoall`:
    gather buckets by `all_to_all_single` (default: on gloo groups only); `overlap`: two workspace slots
    and async collectives (default: off; see the module docstring); `max_workspace_bytes`: the most the overlapped
    workspace (two slots) may take in bytes, else serial (None: no bound; the serial workspace is one
    slot, set by the plan's bucket size). See the module docstring. Raises ValueError when the tensors do
    not match the plan, or `max_workspace_bytes` is negative.
    """

    def __init__(self, plan: RankPlan, sources: list[torch.Tensor], dests: list[torch.Tensor], *,
                 micro_group: dist.ProcessGroup | None, replica_group: dist.ProcessGroup | None,
                 device: torch.device | None = None, keep_workspace: bool | None = None,
                 gather_by_alltoall: bool | None = None, overlap: bool | None = None,
                 max_workspace_bytes: int | None = None):
        if len(sources) != len(plan.train) or len(dests) != len(plan.dests):
            raise ValueError(f"plan has {len(plan.train)} sources / {len(plan.dests)} destinations, "
                             f"got {len(sources)} / {len(dests)}")
        for ref, t in [*zip(plan.train, sources), *zip(plan.dests, dests)]:
            if tuple(t.shape) != ref.shape:
                raise ValueError(f"{ref.name}: tensor has shape {list(t.shape)}, the plan expects {list(ref.shape)}")
        if max_workspace_bytes is not None and max_workspace_bytes < 0:
            raise ValueError(f"max_workspace_bytes must be >= 0 or None, got {max_workspace_bytes}")
        self.plan = plan
        self.sources = sources
        self.dests = dests
        self.dtype = sources[0].dtype if sources else torch.float32
        self.device = device or (sources[0].device if sources else torch.device("cpu"))
        self.micro_group, self.replica_group = micro_group, replica_group
        self.me = plan.replica_group.index(plan.rank)
        self.place = plan.micro_group.index(plan.rank)  # this rank's place in a gathered buffer
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
        self.steps = ([_Step("gather", i, _aligned(b.elems_per_member * n_micro) * sends)
                       for i, b in enumerate(plan.gathers)]
                      + [_Step("exchange", i, _aligned(sum(e.send_splits)) + sum(e.recv_splits))
                         for i, e in enumerate(plan.exchanges)])
        self.slot_numel = max((s.numel for s in self.steps), default=0)  # one slot: the largest bucket's buffers
        two_slots = (_aligned(self.slot_numel) + self.slot_numel) * self.dtype.itemsize
        wanted = bool(overlap)  # None: serial until the overlap is measured on NCCL (module docstring)
        self.overlap = (wanted and len(self.steps) > 1  # resolved: two slots and async collectives
                        and (max_workspace_bytes is None or two_slots <= max_workspace_bytes))
        self.workspace_numel = (_aligned(self.slot_numel) + self.slot_numel) if self.overlap else self.slot_numel
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

    # --- one bucket: pack, collective, scatter (`slot` is a 1-D view of slot_numel elements) ---------
    def _gather_buffers(self, i: int, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the gathered buffer [n·members], what this rank sends: its place in it, or the send copies)."""
        n, n_micro = self.plan.gathers[i].elems_per_member, len(self.plan.micro_group)
        out = slot.narrow(0, 0, n * n_micro)
        if self.gather_by_alltoall:
            return out, slot.narrow(0, _aligned(n * n_micro), n * n_micro)
        return out, out.narrow(0, self.place * n, n)

    def _exchange_buffers(self, i: int, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the receive buffer [sum(recv_splits)], the send buffer [sum(send_splits)])."""
        bucket = self.plan.exchanges[i]
        num_send = sum(bucket.send_splits)
        return slot.narrow(0, _aligned(num_send), sum(bucket.recv_splits)), slot.narrow(0, 0, num_send)

    def _pack(self, step: _Step, slot: torch.Tensor) -> None:
        if step.kind == "gather":
            bucket = self.plan.gathers[step.index]
            _, send = self._gather_buffers(step.index, slot)
            n = bucket.elems_per_member
            mine = send.narrow(0, 0, n)
            torch.cat([self.sources[i].reshape(-1) for i in bucket.tensors], out=mine)
            if self.gather_by_alltoall:
                for k in range(1, len(self.plan.micro_group)):
                    send.narrow(0, k * n, n).copy_(mine)
            return
        _, send = self._exchange_buffers(step.index, slot)
        offset = 0
        for src, dim, rows, shape in self.send_pieces[step.index]:
            numel = int(torch.Size(shape).numel())
            torch.index_select(src, dim, rows, out=send.narrow(0, offset, numel).view(shape))
            offset += numel

    def _launch(self, step: _Step, slot: torch.Tensor, async_op: bool) -> tuple[dist.Work | None, int]:
        """Start the step's collective: (its work when `async_op`, else None; bytes it receives from others)."""
        if step.kind == "gather":
            out, send = self._gather_buffers(step.index, slot)
            n_micro = len(self.plan.micro_group)
            if self.gather_by_alltoall:
                work = dist.all_to_all_single(out, send, group=self.micro_group, async_op=async_op)
            else:
                work = dist.all_gather_into_tensor(out, send, group=self.micro_group, async_op=async_op)
            return work, self.plan.gathers[step.index].elems_per_member * (n_micro - 1) * out.element_size()
        bucket = self.plan.exchanges[step.index]
        incoming, send = self._exchange_buffers(step.index, slot)
        work = dist.all_to_all_single(incoming, send, bucket.recv_splits, bucket.send_splits,
                                      group=self.replica_group, async_op=async_op)
        return work, (sum(bucket.recv_splits) - bucket.recv_splits[self.me]) * incoming.element_size()

    def _scatter(self, step: _Step, slot: torch.Tensor) -> None:
        if step.kind == "gather":
            self.gather_programs[step.index].run(self._gather_buffers(step.index, slot)[0])
        else:
            self.exchange_programs[step.index].run(self._exchange_buffers(step.index, slot)[0])

    @torch.no_grad()
    def run(self) -> ReshardStats:
        """Write every destination (collective over the micro-DP and replica groups; one call per bucket)."""
        start = time.perf_counter()
        recv = 0
        workspace = self._get_workspace()
        steps = self.steps
        if not self.overlap:
            slot = workspace.narrow(0, 0, self.slot_numel)
            for step in steps:
                self._pack(step, slot)
                recv += self._launch(step, slot, async_op=False)[1]
                self._scatter(step, slot)
        elif steps:
            slots = [workspace.narrow(0, 0, self.slot_numel),
                     workspace.narrow(0, _aligned(self.slot_numel), self.slot_numel)]
            self._pack(steps[0], slots[0])
            work, received = self._launch(steps[0], slots[0], async_op=True)
            recv += received
            for k, step in enumerate(steps):
                following = k + 1 < len(steps)
                if following:  # into the slot bucket k − 1 used: its scatter came before, on this stream
                    self._pack(steps[k + 1], slots[(k + 1) % 2])
                work.wait()
                if following:
                    work, received = self._launch(steps[k + 1], slots[(k + 1) % 2], async_op=True)
                    recv += received
                self._scatter(step, slots[k % 2])
        del workspace
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return ReshardStats(recv_bytes=recv, collectives=len(steps), seconds=time.perf_counter() - start,
                            peak_buffer_bytes=self.workspace_numel * self.dtype.itemsize, overlapped=self.overlap)
