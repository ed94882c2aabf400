"""One actor update (PPO clip + KL + entropy, several micro-batches) on a fixed batch, at any layout.

The 1-rank launch (update1) computes the (1,1,1) reference; the 4-rank launch (update4) the layouts
(2,1,2) and (1,2,2); each writes loss and grad norm to the session's shared folder for the comparison."""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from hybridflow_mg.algos.config import AlgoConfig, EntropyConfig, KLConfig
from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.build import build_model
from hybridflow_mg.models.hf_io import HFSource, load_into_model
from hybridflow_mg.models.hf_spec import spec_from_hf
from hybridflow_mg.rollout.hybrid_engine import dp_slice
from hybridflow_mg.trainer.batch import Experience, Sequences
from hybridflow_mg.trainer.config import OptimConfig
from hybridflow_mg.trainer.roles import actor_loss
from hybridflow_mg.trainer.workers import ModelWorker
from tests.multirank import SHARED
from tests.tiny import llama_config, on_rank0_then_barrier, save_random_hf, shared_tmpdir

CONFIG = llama_config(num_hidden_layers=2, vocab_size=256)


def fixed_batch() -> Experience:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (8,), generator=g)]
    responses = [torch.randint(1, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 7, (8,), generator=g)]
    seqs = Sequences.build(prompts, responses, group=[i // 2 for i in range(8)])
    mask = seqs.response_mask
    old = (-5.5 + 0.3 * torch.randn(mask.shape, generator=g)) * mask
    ref = (-5.5 + 0.3 * torch.randn(mask.shape, generator=g)) * mask
    adv = torch.randn(mask.shape, generator=g) * mask
    return Experience.of(seqs, old_logprobs=old, ref_logprobs=ref, advantages=adv, returns=adv, loss_mask=mask)


def update(tp: int, pp: int, world: int) -> dict:
    hf_dir = os.path.join(shared_tmpdir(), "hf")
    on_rank0_then_barrier(save_random_hf, CONFIG, hf_dir, seed=3)
    grid = Grid.create(ParallelLayout(world=world, tp=tp, pp=pp, gen_tp=tp))
    try:
        spec = spec_from_hf(CONFIG)
        chunks, _ = build_model(spec, grid, role="actor", layer_spec_name="local")
        load_into_model(chunks, HFSource(hf_dir, spec.dims), tp=tp, tp_rank=grid.train.tp, pp=pp, pp_rank=grid.train.pp)
        worker = ModelWorker(grid, chunks, optim=OptimConfig(lr=1e-3, clip_grad=1e6), name="actor")
        algo = AlgoConfig(kl=KLConfig(use_in_loss=True, coef=0.1), entropy=EntropyConfig(coef=0.01))
        full = fixed_batch()
        mask = full.response_mask
        num_tokens, num_seqs = float(mask.sum()), float((mask.sum(1) > 0).sum())
        part = dp_slice(len(full), grid.layout.dp, grid.train.dp)
        mine = full.select(list(range(part.start, part.stop)))
        metrics = worker.train(mine, actor_loss(grid, algo, num_tokens=num_tokens, num_seqs=num_seqs, kl_coef=0.1),
                               token_budget=24)  # several micro-batches per rank
        if dist.get_rank() == 0:
            with open(os.path.join(SHARED, f"update_{tp}{pp}{grid.layout.dp}.json"), "w") as f:
                json.dump(metrics, f)
        return metrics
    finally:
        grid.destroy()


def update_moves_towards_the_advantage() -> None:
    """After one policy-gradient step, Σ advantage · (log π_new − log π_old) > 0 (the update goes uphill)."""
    from hybridflow_mg.trainer.roles import actor_head

    hf_dir = os.path.join(shared_tmpdir(), "hf")
    on_rank0_then_barrier(save_random_hf, CONFIG, hf_dir, seed=3)
    grid = Grid.create(ParallelLayout(world=1, tp=1, pp=1, gen_tp=1))
    try:
        spec = spec_from_hf(CONFIG)
        chunks, _ = build_model(spec, grid, role="actor", layer_spec_name="local")
        load_into_model(chunks, HFSource(hf_dir, spec.dims), tp=1, tp_rank=0, pp=1, pp_rank=0)
        worker = ModelWorker(grid, chunks, optim=OptimConfig(lr=1e-3, clip_grad=1e6), name="actor")
        seqs = fixed_batch()
        before = worker.forward(seqs, actor_head(grid), names=("logprobs",), token_budget=64)["logprobs"]
        seqs.old_logprobs = before
        mask = seqs.response_mask
        algo = AlgoConfig()
        worker.train(seqs, actor_loss(grid, algo, num_tokens=float(mask.sum()), num_seqs=8.0, kl_coef=0.0), token_budget=24)
        after = worker.forward(seqs, actor_head(grid), names=("logprobs",), token_budget=64)["logprobs"]
        gain = float((seqs.advantages * (after - before) * mask).sum())
        assert gain > 0, f"the update moved log-probs against the advantages (Σ A·Δlogπ = {gain})"
    finally:
        grid.destroy()
