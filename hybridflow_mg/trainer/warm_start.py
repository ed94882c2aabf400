"""A short supervised warm start of the actor (cross-entropy on the prompts' reference answers).

RL needs a policy that is right sometimes: a random tiny model never is, so its rewards carry no
signal. The quickstart therefore spends a few hundred optimizer steps teaching the actor the answer
format (and some answers) before GRPO/PPO. The answer of each prompt is `extra_info.answer` (the
synthetic task writes it) or the ground truth, followed by EOS.
"""
from __future__ import annotations

import random

from hybridflow_mg.metrics.progress_bar import progress_bar, write
from hybridflow_mg.rollout.hybrid_engine import dp_slice
from hybridflow_mg.trainer.batch import Sequences
from hybridflow_mg.trainer.roles import actor_head


def warm_start(run) -> list[float]:
    cfg, grid, tok = run.cfg.actor.warm_start, run.grid, run.tokenizer
    items = list(run.train_batches.dataset.items)
    if cfg.files:
        from hybridflow_mg.data.datasets import load_prompts

        d = run.cfg.data
        items = load_prompts(cfg.files, tok, prompt_key=d.prompt_key, ground_truth_key=d.ground_truth_key,
                             data_source_key=d.data_source_key, extra_info_key=d.extra_info_key,
                             max_prompt_length=d.max_prompt_length, truncation=d.truncation).items
    pairs = [(it.prompt_ids, tok.encode(str((it.extra_info or {}).get("answer", it.ground_truth))) + [tok.eos_id])
             for it in items]
    if cfg.steps and cfg.batch_size > len(pairs):
        source = "actor.warm_start.files" if cfg.files else "the training prompts"
        raise ValueError(f"actor.warm_start.batch_size={cfg.batch_size} is more than the {len(pairs)} warm-start "
                         f"examples ({source}); lower it or add examples")
    rng = random.Random(run.cfg.run.seed)
    optimizer = run.actor.optimizer
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    losses = []
    head = actor_head(grid)
    for step in progress_bar(range(cfg.steps), desc="warm start", enabled=grid.is_logging_rank):
        batch = [pairs[i] for i in rng.sample(range(len(pairs)), cfg.batch_size)]  # same on every rank
        seqs = Sequences.build([p for p, _ in batch], [a for _, a in batch], group=list(range(len(batch))))
        num_tokens = float(seqs.response_mask.sum())
        part = dp_slice(len(seqs), grid.layout.dp, grid.train.dp)
        mine = seqs.select(list(range(part.start, part.stop)))

        def loss(logits, mb):
            mask = mb.response_mask.to(logits.device)
            nll = -(head(logits, mb)["logprobs"] * mask).sum()
            return nll / num_tokens, {"tokens": mask.sum()}

        metrics = run.actor.train(mine, loss, token_budget=run.cfg.actor.micro_batch_tokens)
        losses.append(metrics["loss"])
        if grid.is_logging_rank and (step % 25 == 0 or step == cfg.steps - 1):
            write(f"warm start {step:4d}/{cfg.steps}: cross-entropy {metrics['loss']:.4f}")
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr
    if run.ref is not None:
        reference_from_actor(run)
    return losses


def reference_from_actor(run) -> None:
    """Copy the actor's weights into the reference model (this rank's shards; no communication).

    After a warm start the reference is the warm-started actor, the policy RL starts from, as the SFT
    model is the reference of RLHF (Ouyang et al. 2022, §3.5): KL to `model.path`'s weights, which the
    warm start left behind, would measure (and with KL in the objective, pull towards) the untrained
    model. Checkpoints then carry the reference's weights (`reference/`), so a resumed run keeps it.
    Raises RuntimeError when the two models' parameters differ in name or shape (built from different specs)."""
    import torch

    for actor, ref in zip(run.actor.modules, run.ref.modules, strict=True):
        mine, theirs = dict(actor.named_parameters()), dict(ref.named_parameters())
        if {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
            raise RuntimeError("the reference model's parameters differ from the actor's; they must be built "
                               "from the same spec")
        with torch.no_grad():
            for key, p in theirs.items():
                p.copy_(mine[key])
    run.reference_trained = True
