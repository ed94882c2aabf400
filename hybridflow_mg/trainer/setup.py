"""Build everything one run needs, once: process grid, data, the four roles, the vLLM engine, rewards.

The order matters in two places: the actor is wrapped for training (DDP may re-point parameter
storage) before the 3D-HybridEngine captures its parameters; the vLLM engine is created after the
Megatron models so that both live in the same torch.distributed world.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hybridflow_mg.algos import build_kl_controller
from hybridflow_mg.data.datasets import PromptBatches
from hybridflow_mg.data.tokenizer import Tokenizer
from hybridflow_mg.parallel import faults
from hybridflow_mg.parallel.grid import Grid, on_rank0
from hybridflow_mg.parallel.launch import init_distributed
from hybridflow_mg.parallel.progress import Progress
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.metrics.tracker import Tracker
from hybridflow_mg.models.build import build_model
from hybridflow_mg.models.hf_io import HFSource, load_into_model
from hybridflow_mg.models.hf_spec import ModelSpec, read_hf_config, spec_from_hf
from hybridflow_mg.rewards import RewardFn, build_reward_fn
from hybridflow_mg.rollout.config import Sampling
from hybridflow_mg.rollout.hybrid_engine import HybridEngine
from hybridflow_mg.rollout.vllm_engine import VLLMEngine
from hybridflow_mg.trainer.bootstrap import prepare_run, run_dir
from hybridflow_mg.trainer.checkpoint import find_resume, reference_source, weights_source
from hybridflow_mg.trainer.config import TrainConfig, check_batch_split
from hybridflow_mg.trainer.inputs import engine_max_model_len, load_inputs
from hybridflow_mg.trainer.workers import ModelWorker


@dataclass
class Run:
    cfg: TrainConfig
    grid: Grid
    run_dir: Path
    tracker: Tracker
    tokenizer: Tokenizer
    train_batches: PromptBatches
    val_batches: PromptBatches | None
    spec: ModelSpec
    naming: str
    """Parameter naming of the built models (`layouts` spec: "local" or "te")."""
    actor: ModelWorker
    ref: ModelWorker | None
    critic: ModelWorker | None
    reward_model: ModelWorker | None
    engine: VLLMEngine
    hybrid: HybridEngine
    reward_fn: RewardFn
    kl_controller: object
    sampling: Sampling
    needs: frozenset[str]
    """What the algorithm's estimator and losses declared they need (`utils.registry.NEEDS`), with
    `ref_logprobs` also when KL is in the objective or monitored (`algo.kl.monitor`); the roles above
    were built for exactly these."""
    critic_spec: ModelSpec | None = None
    reference_trained: bool = False
    """The reference holds weights of its own, not `model.path`'s: the warm-started actor's (copied after
    the warm start, or loaded from a checkpoint's `reference/`); checkpoints then save them."""
    resume: Path | None = None
    """The checkpoint this run continues from (its weights are already in the models), or None."""
    resume_marker: dict | None = None
    """That checkpoint's marker (step, layout, world, files)."""
    progress: Progress | None = None
    """Where each rank is (stage and step), to name a rank that stops making progress."""
    stage_probe: Any = None
    """Measurement hooks `enter(stage)` / `exit(stage)` around each stage of a step (bench step's
    `bench.measure.StageProbe`); they must not change what the step computes."""

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.tracker.close()
        self.engine.shutdown()
        self.grid.destroy()


def _load(grid, spec: ModelSpec, source, role: str, cfg: TrainConfig, *, skip=()) -> tuple[list, str]:
    """(model chunks loaded from `source`, their parameter naming): an HF directory's path, or a
    canonical source (a training checkpoint's `MegatronSource`)."""
    chunks, built = build_model(spec, grid, role=role, layer_spec_name=cfg.model.layer_spec, dtype=cfg.model.dtype)
    if isinstance(source, str):
        source = HFSource(source, spec.dims)
    load_into_model(chunks, source, tp=grid.layout.tp, tp_rank=grid.train.tp, pp=grid.layout.pp,
                    pp_rank=grid.train.pp, vpp=grid.layout.vpp, naming=built.naming, skip=skip)
    return chunks, built.naming


def build_run(cfg: TrainConfig, *, reward_fn: RewardFn | None = None) -> Run:
    """Everything one run needs, built in dependency order on every rank (collective).

    `reward_fn` (a Python callable with the `RewardFn` signature) replaces the config's `reward`
    section; every rank must pass an equal one.
    """
    needs = cfg.algo.needs
    info, device = init_distributed(cfg.dist.backend, cfg.dist.timeout_minutes)
    t, g = cfg.parallel.train, cfg.parallel.gen
    layout = ParallelLayout.create(world=info.world_size, tp=t.tp, pp=t.pp, vpp=t.vpp, dp=t.dp, gen_tp=g.tp,
                                   gen_pp=g.pp)
    check_batch_split(cfg, layout.dp)

    def prepare():  # the run directory, the checkpoint to resume from, the resolved config (and the synthetic task)
        return find_resume(cfg, run_dir(cfg)) + (prepare_run(cfg),)

    if cfg.model.synthetic is None:  # the inputs first: a bad one fails every rank before the run directory exists
        tokenizer, (train_batches, val_batches), spec = load_inputs(cfg)
        resume, marker, cfg = on_rank0(prepare)
    else:  # the synthetic task's files are written by `prepare`
        resume, marker, cfg = on_rank0(prepare)
        tokenizer, (train_batches, val_batches), spec = load_inputs(cfg)
    grid = Grid.create(layout, device, seed=cfg.run.seed, timeout_minutes=cfg.dist.timeout_minutes)
    out = run_dir(cfg)
    tracker = Tracker(out if grid.is_logging_rank else None, resume_step=marker["step"] if marker else None,
                      loggers=cfg.run.loggers, config=cfg,
                      console_keys=("reward_mean", "val_reward", "response_len", "kl", "rollout_kl", "pg_loss", "grad_norm",
                                    "rollout_logprob_diff", "seconds"))
    if grid.is_logging_rank:
        for split, batches in (("train", train_batches), ("validation", val_batches)):
            if batches is not None:
                print(f"{split} data: {batches.dataset.summary()}", flush=True)
    faults.trigger("setup")  # tests fail a setup here: the run directory exists, with its config and trackers

    def weights(role_spec, role: str, default: str):  # the checkpoint's when resuming, else the HF directory's
        return weights_source(resume, role_spec, role) if resume is not None else default

    steps = cfg.trainer.total_steps
    actor_chunks, naming = _load(grid, spec, weights(spec, "actor", cfg.model.path), "actor", cfg)
    actor = ModelWorker(grid, actor_chunks, optim=cfg.actor.optim, name="actor", schedule_steps=steps)
    ref, reference_trained = None, False
    if "ref_logprobs" in needs:
        source, reference_trained = reference_source(cfg, resume, spec)
        ref = ModelWorker(grid, _load(grid, spec, source, "ref", cfg)[0], name="ref")
    critic = critic_spec = None
    if "values" in needs:
        path = cfg.model.critic_path or cfg.model.path
        critic_spec = spec_from_hf(read_hf_config(path), head="value", vocab_divisor=cfg.model.vocab_divisor)
        # from the actor's HF weights: trunk loaded, head starts at 0
        skip = () if cfg.model.critic_path or resume is not None else ("value_head",)
        critic = ModelWorker(grid, _load(grid, critic_spec, weights(critic_spec, "critic", path), "critic", cfg,
                                         skip=skip)[0], optim=cfg.critic.optim, name="critic", schedule_steps=steps)
    reward_model = None
    if cfg.model.reward_model_path:
        rm_spec = spec_from_hf(read_hf_config(cfg.model.reward_model_path), head="value",
                               vocab_divisor=cfg.model.vocab_divisor)
        reward_model = ModelWorker(grid, _load(grid, rm_spec, cfg.model.reward_model_path, "reward", cfg)[0],
                                   name="reward_model")

    engine = VLLMEngine(cfg.model.path, layout, replace(cfg.rollout, max_model_len=engine_max_model_len(cfg, spec)),
                        load_weights=False, num_decodable_ids=tokenizer.vocab_size)
    sync = cfg.rollout.reshard
    hybrid = HybridEngine(grid, actor.modules, spec.dims, engine, naming=naming, bucket_bytes=sync.bucket_bytes,
                          overlap=sync.overlap, max_workspace_bytes=sync.max_workspace_bytes)
    stop = tuple(cfg.rollout.stop_token_ids) or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
    sampling = cfg.rollout.sampling(stop_token_ids=stop)
    return Run(cfg=cfg, grid=grid, run_dir=out, tracker=tracker, tokenizer=tokenizer, train_batches=train_batches,
               val_batches=val_batches, spec=spec, naming=naming, actor=actor, ref=ref, critic=critic, reward_model=reward_model,
               engine=engine, hybrid=hybrid, reward_fn=reward_fn if reward_fn is not None else build_reward_fn(cfg.reward),
               kl_controller=build_kl_controller(cfg.algo.kl), sampling=sampling, needs=needs,
               critic_spec=critic_spec, resume=resume, resume_marker=marker, reference_trained=reference_trained,
               progress=Progress.of_world(cfg.dist.timeout_minutes))
