"""One role's megatron-core model on the grid, driven through megatron-core's pipeline schedules.

A `ModelWorker` runs any per-micro-batch computation over a `Sequences` batch: `forward` (no grad;
log-probs, values, scores) and `train` (forward-backward + one optimizer step). It hides the two
things every role shares: pipeline parallelism (outputs live on the last stage and are broadcast to
the rest of the pipeline) and loss scaling (megatron-core divides each micro-batch loss by the
number of micro-batches and DDP averages gradients over DP; the loss function's value is multiplied
back so that the gradient is exactly that of the step's loss, aggregated with global normalizers).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from hybridflow_mg.parallel import faults
from hybridflow_mg.trainer.batch import Sequences, micro_batches

# head(output [mb, L, ·], micro-batch) → {name: [mb, T_mb]} on the last pipeline stage
Head = Callable[[torch.Tensor, Sequences], dict[str, torch.Tensor]]
# loss(output, micro-batch) → (0-dim loss of this micro-batch with global normalizers, {metric: 0-dim sum})
Loss = Callable[[torch.Tensor, Sequences], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _scheduler(optimizer, optim, schedule_steps: int):
    """megatron-core's `OptimizerParamScheduler` for `optim` (counted in RL steps; see `OptimConfig`)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = optim.lr_decay_steps or schedule_steps
    if decay <= optim.lr_warmup_steps:
        raise ValueError(f"lr_warmup_steps={optim.lr_warmup_steps} must be below the decay length {decay} "
                         "(lr_decay_steps, else trainer.total_steps)")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=decay, lr_decay_style=optim.lr_decay,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        # on resume the config wins (a run extended with more steps decays over the new length); only the
        # step count comes from the checkpoint
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)


class ModelWorker:
    """`chunks` (one GPTModel per virtual stage) of one role; trainable roles get DDP, an optimizer and a
    learning-rate schedule (`scheduler`, stepped once per RL step by the loop; `schedule_steps` is the
    decay length when `optim.lr_decay_steps` is left out)."""

    def __init__(self, grid, chunks: list[torch.nn.Module], *, optim=None, name: str = "model",
                 schedule_steps: int = 1):
        self.grid, self.name = grid, name
        self.optimizer = None
        self.scheduler = None
        if optim is not None:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            config = chunks[0].config
            distributed = torch.cuda.is_available()  # the distributed optimizer needs CUDA tensors
            ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)
            chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks]
            config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay, adam_beta1=optim.beta1,
                adam_beta2=optim.beta2, adam_eps=optim.eps, clip_grad=optim.clip_grad,
                params_dtype=next(chunks[0].parameters()).dtype, bf16=config.bf16, fp16=config.fp16,
                use_distributed_optimizer=distributed), chunks)
            self.scheduler = _scheduler(self.optimizer, optim, schedule_steps)
        self.chunks = chunks

    # --- the schedule ----------------------------------------------------------------------------------
    def _groups(self, seqs: Sequences, token_budget: int) -> list[list[int]]:
        """Token-budget micro-batches. With virtual pipeline stages every micro-batch is padded to the
        batch's width, so each holds ⌊budget / width⌋ rows (at least one), and there are a multiple of pp
        of them (megatron-core's interleaved schedule refuses other counts): the largest groups are split
        while one has two rows, then empty groups fill up the count (padding only: no loss, no gradient,
        no metrics)."""
        groups = micro_batches(seqs, token_budget)
        pp = self.grid.layout.pp
        if len(self.chunks) == 1:
            return groups
        # every micro-batch is padded to one [rows, width] shape (see _run): rows × width must keep the budget
        per = max(1, token_budget // int(seqs.tokens.size(1)))
        order = [i for g in groups for i in g]  # longest first
        groups = [order[k:k + per] for k in range(0, len(order), per)]
        while len(groups) % pp or not groups:
            big = max(range(len(groups)), key=lambda i: (len(groups[i]), -i), default=None)
            if big is None or len(groups[big]) < 2:  # fewer rows than pp (e.g. a small data-parallel share)
                return groups + [[] for _ in range(-len(groups) % pp or pp)]
            half = len(groups[big]) // 2
            groups[big:big + 1] = [groups[big][:half], groups[big][half:]]
        return groups

    def _run(self, seqs: Sequences, groups: list[list[int]], step: Callable, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = [seqs.select(rows) if rows else None for rows in groups]
        # [rows, width]: the one activation shape every stage sends and expects when shapes are not exchanged
        rows, width = max(max(map(len, groups), default=0), 1), int(seqs.tokens.size(1))
        fixed_shape = not self.chunks[0].config.variable_seq_lengths  # vpp > 1: see models.build.transformer_config

        def forward_step(data, model):
            mb = next(data)
            tokens = mb.tokens if mb is not None else seqs.tokens[:0]  # [mb, L_mb]
            if fixed_shape:  # right padding and extra rows change no real token's output (causal, per row)
                tokens = torch.nn.functional.pad(tokens, (0, width - tokens.size(1), 0, rows - tokens.size(0)))
            positions = torch.arange(tokens.size(1), device=self.grid.device).expand(tokens.size(0), -1)
            output = model(tokens.to(self.grid.device), positions, None)
            if mb is None:  # a filler micro-batch (see _groups): a zero loss keeps the backward pass uniform
                return output, lambda out: (out.sum() * 0, {})
            return output, lambda out: step(out[:len(mb), :mb.tokens.size(1)], mb)

        iterators = [iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro)
        outs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=self.chunks,
            num_microbatches=len(micro), seq_length=width, micro_batch_size=rows, forward_only=forward_only) or []
        return [out for group, out in zip(groups, outs) if group]  # the real micro-batches' (last stage only)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as the last pipeline stage has it, on every stage of this pipeline."""
        if self.grid.layout.pp == 1:
            return tensor
        last = self.grid.layout.rank_of(self.grid.train.tp, self.grid.layout.pp - 1, self.grid.train.dp)
        dist.broadcast(tensor, src=last, group=self.grid.pp_group)
        return tensor

    # --- no-grad passes ----------------------------------------------------------------------------------
    def forward(self, seqs: Sequences, head: Head, *, names: tuple[str, ...], token_budget: int) -> dict[str, torch.Tensor]:
        """{name: [B, T]} from `head` on every micro-batch, on every rank of the replica."""
        groups = self._groups(seqs, token_budget)
        for c in self.chunks:
            c.eval()
        with torch.no_grad():
            outs = self._run(seqs, groups, lambda out, mb: (out.sum() * 0, head(out, mb)), forward_only=True)
        width = seqs.resp_len
        result = {n: torch.zeros(len(seqs), width, dtype=torch.float32) for n in names}
        if self.grid.is_last_stage:
            for rows, out in zip([g for g in groups if g], outs):
                for n in names:
                    value = out[n].float().cpu()
                    result[n][rows, :value.size(1)] = value
        return {n: self._from_last_stage(t.to(self.grid.device)).cpu() for n, t in result.items()}

    # --- one optimizer step -------------------------------------------------------------------------------
    def train(self, seqs: Sequences, loss: Loss, *, token_budget: int) -> dict[str, float]:
        """Forward-backward over `seqs` (this rank's share of one optimizer step) and the step itself.

        `loss` returns each micro-batch's loss aggregated with the step's GLOBAL normalizers, so that
        the micro-batch losses of all DP ranks add up to the step's loss. Returned metrics: that
        loss, the grad norm, and the sums the loss function reported, all over the whole step; and
        `update_skipped` 1.0 when a loss or a gradient was not finite on some rank, in which case no
        parameter moved (grad_norm is then NaN).
        """
        if self.optimizer is None:
            raise RuntimeError(f"{self.name} has no optimizer")
        groups = self._groups(seqs, token_budget)
        scale = len(groups) * self.grid.layout.dp  # undo megatron-core's 1/num_microbatches and DDP's 1/dp

        def step(out, mb):
            value, stats = loss(out, mb)
            if faults.trigger("loss"):
                value = value * float("nan")
            return value * scale, {"loss": value.detach(), **{k: v.detach() for k, v in stats.items()}}

        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(seqs, groups, step, forward_only=False)
        if self._finite(outs):
            ok, grad_norm, _ = self.optimizer.step()
        else:  # skip the update: a NaN/Inf would spread into every weight and Adam moment
            ok, grad_norm = False, float("nan")
            self.optimizer.zero_grad()
        keys = sorted(outs[0]) if outs else []
        sums = torch.zeros(max(len(keys), 1), dtype=torch.float64, device=self.grid.device)
        if self.grid.is_last_stage and keys:
            sums = torch.stack([sum(o[k].double() for o in outs) for k in keys]).to(self.grid.device)
        names = self._names_from_last_stage(keys)
        sums = self._from_last_stage(self._resize(sums, len(names)))
        dist.all_reduce(sums, group=self.grid.dp_group)
        metrics = {k: float(v) for k, v in zip(names, sums.tolist())}
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["update_skipped"] = 0.0 if ok else 1.0
        return metrics

    def _finite(self, outs: list[dict]) -> bool:
        """Whether every micro-batch loss (last stage) and every gradient (DDP buffers) is finite on
        every rank; all ranks get the same answer (they must all step, or all skip)."""
        ok = all(bool(torch.isfinite(o["loss"]).all()) for o in outs)
        for chunk in self.chunks:
            buffers = getattr(chunk, "buffers", None)  # megatron-core DDP's grad buffers (a list attribute)
            for buffer in buffers if isinstance(buffers, list) else ():  # the largest |g| is NaN/Inf iff one is;
                ok = ok and bool(torch.isfinite(torch.linalg.vector_norm(buffer.grad_data, float("inf"))))  # no copy
        flag = torch.tensor([1.0 if ok else 0.0], device=self.grid.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _names_from_last_stage(self, keys: list[str]) -> list[str]:
        if self.grid.layout.pp == 1:
            return keys
        holder = [keys if self.grid.is_last_stage else None]
        last = self.grid.layout.rank_of(self.grid.train.tp, self.grid.layout.pp - 1, self.grid.train.dp)
        dist.broadcast_object_list(holder, src=last, group=self.grid.pp_group)
        return holder[0]

    @staticmethod
    def _resize(t: torch.Tensor, n: int) -> torch.Tensor:
        return t if t.numel() == n else torch.zeros(n, dtype=t.dtype, device=t.device)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The GPTModel chunks without their DDP wrappers."""
        return [getattr(c, "module", c) for c in self.chunks]
