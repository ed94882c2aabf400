"""The 3D-HybridEngine: the actor's Megatron shards, the in-process vLLM engine, and the resharder between.

Per iteration (HybridFlow §5):

1. `sync_weights()`: wake vLLM's weights (GPU), reshard the actor's training shards straight into
   vLLM's parameters (bucketed all-gathers in micro-DP groups; no rank ever holds the full model),
   reset the prefix cache.
2. `with generating():` wakes vLLM's KV cache for the body and puts vLLM to sleep after it (GPU), so
   training gets the memory back. The trainer offloads its own state (`offload.py`) between steps 1
   and 2, so the KV cache takes memory the training state has left.
3. `generate(prompts)`: the global prompt batch (identical on every rank) is split into the training
   data-parallel slices (`dp_slice`); the d_g generation replicas of each training replica share its
   slice (round robin), and completions are gathered inside that training replica only — every rank
   gets the completions its Megatron forward passes need, and nothing more crosses replicas.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from hybridflow_mg.models.hf_io import model_params
from hybridflow_mg.reshard.execute import Resharder, ReshardStats
from hybridflow_mg.reshard.plan import plan_reshard
from hybridflow_mg.rollout.config import Sampling
from hybridflow_mg.rollout.vllm_engine import Completion, VLLMEngine


def dp_slice(num_items: int, dp: int, dp_rank: int) -> slice:
    """The contiguous part of a global batch that training DP rank `dp_rank` of `dp` owns."""
    if num_items % dp:
        raise ValueError(f"a batch of {num_items} does not split over {dp} data-parallel ranks; "
                         f"make the prompt batch a multiple of {dp}")
    per = num_items // dp
    return slice(dp_rank * per, (dp_rank + 1) * per)


class HybridEngine:
    """Actor (Megatron chunks on the grid) → vLLM engine on the same ranks, via the resharder.

    `bucket_bytes`, `overlap`, `max_workspace_bytes`: the resharder's buckets and its overlap of packing
    and scattering with the collectives (`rollout.reshard` in the train config; reshard/execute.py)."""

    def __init__(self, grid, actor_chunks: list[torch.nn.Module], dims, engine: VLLMEngine, *,
                 naming: str = "local", bucket_bytes: int = 256 << 20, overlap: bool | None = None,
                 max_workspace_bytes: int | None = None):
        if engine.layout.gen_tp_groups != grid.layout.gen_tp_groups or engine.layout.world != grid.layout.world:
            raise ValueError("the vLLM engine's generation groups differ from the grid's plan; build both "
                             "from the same parallel layout")
        self.grid, self.engine = grid, engine
        lay = grid.layout
        params = {(rule.key, layer): p for rule, layer, _, p in
                  model_params(actor_chunks, dims, pp=lay.pp, pp_rank=grid.train.pp, vpp=lay.vpp, naming=naming)}
        element_size = next(iter(params.values())).element_size()
        self.plan = plan_reshard(dims, lay, grid.rank, fmt="vllm", element_size=element_size, bucket_bytes=bucket_bytes)
        vllm_params = dict(engine.named_parameters())
        missing = [d.name for d in self.plan.dests if d.name not in vllm_params]
        if missing:
            raise RuntimeError(f"vLLM has no parameter {missing[0]} (the layouts table and vLLM's model disagree)")
        self.resharder = Resharder(
            self.plan, [params[t.key].data for t in self.plan.train], [vllm_params[d.name].data for d in self.plan.dests],
            micro_group=grid.micro_dp_group, replica_group=grid.model_parallel_group, device=grid.device,
            overlap=overlap, max_workspace_bytes=max_workspace_bytes)
        self.last_stats: ReshardStats | None = None

    def sync_weights(self) -> ReshardStats:
        """Write the actor's current weights into vLLM (collective over the world)."""
        self.engine.wake_up(["weights"])
        self.last_stats = self.resharder.run()
        self.engine.weights_updated()
        return self.last_stats

    @contextlib.contextmanager
    def generating(self):
        """vLLM's KV cache for the body; vLLM asleep after it (GPU; no-ops on CPU)."""
        self.engine.wake_up(["kv_cache"])
        try:
            yield self
        finally:
            self.engine.sleep(level=1)

    def generate(self, prompts: list[list[int]], sampling: Sampling, *, whole_batch: bool = False) -> list[Completion]:
        """Completions of this rank's training-DP slice of the global `prompts` (same list on every
        rank; collective over the training replica, or over the generation replica when it spans
        several training replicas), or of all of them with `whole_batch` (collective over the world;
        for validation and tools)."""
        lay, gen = self.grid.layout, self.grid.gen
        if whole_batch:
            part, group, share = slice(0, len(prompts)), None, (gen.replica, lay.num_gen_replicas)
        elif lay.train_replicas_per_gen > 1:  # replica R spans k training replicas: it serves their slices
            k, own = lay.train_replicas_per_gen, dp_slice(len(prompts), lay.dp, self.grid.train.dp)
            first = self.grid.train.dp - self.grid.train.dp % k
            part = slice(dp_slice(len(prompts), lay.dp, first).start, dp_slice(len(prompts), lay.dp, first + k - 1).stop)
            group, share = self.grid.gen_replica_group, (0, 1)
        else:  # replica R serves its training replica's slice: R = dp·d_g + (its place among d_g)
            part = dp_slice(len(prompts), lay.dp, self.grid.train.dp)
            group, share = self.grid.model_parallel_group, (gen.replica % lay.micro_dp, lay.micro_dp)
        mine = list(range(part.start + share[0], part.stop, share[1]))
        # seeds follow the prompt's global index, so a sample does not depend on which replica drew it
        completions = self.engine.generate([prompts[i] for i in mine], sampling, prompt_indices=mine) if mine else []
        local = {i: c for i, c in zip(mine, completions)} if gen.tp == 0 else {}
        gathered: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
        dist.all_gather_object(gathered, local, group=group)
        merged = {i: c for part_ in gathered for i, c in part_.items()}
        if not whole_batch and lay.train_replicas_per_gen > 1:
            part = own
        return [merged[i] for i in range(part.start, part.stop)]
