"""2-rank checks: megatron-core GPTModel (local spec) at TP=2 equals TP=1, forward and backward."""
from __future__ import annotations

import torch

from hybridflow_mg.parallel.cpu_shims import seed_model_parallel
from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.build import build_model
from hybridflow_mg.models.hf_spec import spec_from_hf
from hybridflow_mg.models.layouts import match, rules_for
from hybridflow_mg.models.rowmaps import locate, shard_index
from tests.multirank import rank_check
from tests.tiny import llama_config


def _loss_and_grads(tp: int):
    grid = Grid.create(ParallelLayout(world=2, tp=tp, pp=1, gen_tp=tp))
    spec = spec_from_hf(llama_config(vocab_size=256))
    seed_model_parallel(1234, grid.train.tp)
    (model,), _ = build_model(spec, grid, role="actor", layer_spec_name="local", init=True)
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(12).expand(3, 12)
    per_token = model(tokens, positions, None, labels=tokens)  # [b, s]: −log p of each label, over TP
    loss = per_token.mean()
    loss.backward()
    params = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    rank = grid.train.tp
    grid.destroy()
    return spec, rank, loss.item(), params


@rank_check
def tp2_equals_tp1_forward_and_backward():
    spec, rank, loss2, shards = _loss_and_grads(tp=2)
    _, _, loss1, full = _loss_and_grads(tp=1)
    assert abs(loss2 - loss1) <= 1e-6 * abs(loss1), (loss2, loss1)
    rules = rules_for(spec.dims)
    for name, (weight, grad) in shards.items():
        rule, _, _ = match(rules, "mcore", name)
        rows = locate(shard_index(rule, "mcore", spec.dims, 2, rank), shard_index(rule, "mcore", spec.dims, 1, 0))
        keep = rows >= 0  # padding rows of the vocab have no TP=1 counterpart
        dim = rule.index_dim
        ref_w, ref_g = (t.index_select(dim, rows[keep]) for t in full[name])
        mine_w, mine_g = (t.index_select(dim, keep.nonzero().squeeze(1)) for t in (weight, grad))
        assert torch.equal(mine_w, ref_w), f"{name}: TP=2 weights differ from the TP=1 weights"
        torch.testing.assert_close(mine_g, ref_g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} grad: {m}")


def _megatron_train_step(model, tokens, num_microbatches):
    """One forward-backward through megatron-core's schedule (PP aware) and one optimizer step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.5), [ddp])
    micro = tokens.chunk(num_microbatches)
    positions = torch.arange(tokens.size(1)).expand(micro[0].size(0), -1)

    def forward_step(data, m):
        batch = next(data)
        out = m(batch, positions, None, labels=batch)
        return out, lambda o: (o.mean(), {"loss": o.mean().detach()})

    ddp.zero_grad_buffer()
    opt.zero_grad()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
                                         num_microbatches=num_microbatches, seq_length=tokens.size(1),
                                         micro_batch_size=micro[0].size(0), forward_only=False)
    ok, grad_norm, _ = opt.step()
    return [l["loss"].item() for l in losses], grad_norm, ok


@rank_check
def pp2_schedule_with_p2p_equals_pp1():
    """Shims 2-4 in use: p2p shape exchange, schedule "cuda" tensors, optimizer and clipping on CPU."""
    from hybridflow_mg.models.layouts import global_layer

    tokens = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(3))
    spec = spec_from_hf(llama_config(vocab_size=256))
    results = {}
    for pp in (1, 2):
        grid = Grid.create(ParallelLayout(world=2, tp=1, pp=pp, gen_tp=1))
        seed_model_parallel(99, 0)
        (model,), _ = build_model(spec, grid, role="actor", layer_spec_name="local", init=(pp == 1))
        if pp == 1:
            full = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:  # the PP=1 weights, each stage taking its layers (stage-local names → global layer)
            for n, p in model.named_parameters():
                parts = n.split(".")
                if parts[:2] == ["decoder", "layers"]:
                    parts[2] = str(global_layer(grid.train.pp, int(parts[2]), spec.dims.num_layers, pp=2))
                p.data.copy_(full[".".join(parts)])
        losses, grad_norm, ok = _megatron_train_step(model, tokens, num_microbatches=2)
        results[pp] = (losses, grad_norm) if grid.is_last_stage else (None, grad_norm)
        assert ok
        grid.destroy()
    if results[2][0] is not None:  # last stage holds the losses
        torch.testing.assert_close(torch.tensor(results[2][0]), torch.tensor(results[1][0]), rtol=1e-6, atol=0)
    assert abs(results[2][1] - results[1][1]) <= 1e-5 * results[1][1], (results[2][1], results[1][1])


@rank_check
def shim_rng_tracker_forks_cpu_state():
    from megatron.core import tensor_parallel

    from hybridflow_mg.parallel.cpu_shims import CpuRNGStatesTracker

    grid = Grid.create(ParallelLayout(world=2, tp=2, pp=1, gen_tp=2))
    try:
        seed_model_parallel(5, grid.train.tp)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        assert isinstance(tracker, CpuRNGStatesTracker)
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
        seed_model_parallel(5, grid.train.tp)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            b = torch.rand(4)
        assert torch.equal(a, b), "same seed, same model-parallel stream"
        gathered = [torch.empty(4) for _ in range(2)]
        torch.distributed.all_gather(gathered, a, group=grid.tp_group)
        assert not torch.equal(gathered[0], gathered[1]), "TP ranks must draw different dropout masks"
    finally:
        grid.destroy()


@rank_check
def shim_cuda_calls_land_on_cpu():
    import importlib

    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32 as in_clip_grads
    from megatron.core.optimizer.optimizer import clip_grad_by_total_norm_fp32 as in_optimizer

    from hybridflow_mg.parallel import cpu_shims

    cpu_shims.apply_cpu_shims()
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.synchronize() is None
    t = torch.ones(2)
    assert t.cuda() is t  # shim 5: tied embeddings with PP > 1
    for name in cpu_shims._MODULES:
        module = importlib.import_module(name)
        t = module.torch.zeros(2, device="cuda")
        assert t.device.type == "cpu", name
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)  # norm 4
    for clip in (in_clip_grads, in_optimizer):
        assert clip is cpu_shims.clip_grad_by_total_norm_cpu
    in_optimizer([p], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))


@rank_check
def vpp2_forward_with_any_micro_batch_count_equals_pp1():
    """megatron-core's interleaved schedule needs a multiple of pp micro-batches; the worker makes one."""
    from hybridflow_mg.trainer.batch import Sequences
    from hybridflow_mg.trainer.roles import actor_head
    from hybridflow_mg.trainer.workers import ModelWorker

    from hybridflow_mg.models.layouts import global_layer

    spec = spec_from_hf(llama_config(vocab_size=256, num_hidden_layers=4))
    g = torch.Generator().manual_seed(9)
    seqs = Sequences.build([torch.randint(1, 256, (4,), generator=g).tolist() for _ in range(5)],
                           [torch.randint(1, 256, (3,), generator=g).tolist() for _ in range(5)], group=list(range(5)))
    results = {}
    for pp, vpp in ((1, 1), (2, 2)):
        grid = Grid.create(ParallelLayout(world=2, tp=1, pp=pp, vpp=vpp, gen_tp=1))
        try:
            seed_model_parallel(4, 0)
            chunks, _ = build_model(spec, grid, role="actor", layer_spec_name="local", init=(pp == 1))
            if pp == 1:
                full = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
            else:
                for vp, chunk in enumerate(chunks):
                    for n, p in chunk.named_parameters():
                        parts = n.split(".")
                        if parts[:2] == ["decoder", "layers"]:
                            parts[2] = str(global_layer(grid.train.pp, int(parts[2]), 4, pp=2, vpp=2, vpp_chunk=vp))
                        p.data.copy_(full[".".join(parts)])
            worker = ModelWorker(grid, chunks)
            # a 21-token budget gives 3 micro-batches of 7-token sequences: not a multiple of pp=2
            results[pp] = worker.forward(seqs, actor_head(grid), names=("logprobs",), token_budget=21)["logprobs"]
        finally:
            grid.destroy()
    torch.testing.assert_close(results[2], results[1], rtol=1e-5, atol=1e-6)
