"""The full config of `hybridflow-mg train`: the foundation sections plus one section per component.

Each component owns its dataclass (`algos.config`, `data.config`, `rewards.config`, `rollout.config`);
this module adds the model, actor, critic and trainer sections and composes the tree. Presets:
`configs/quickstart.yaml` (CPU, synthetic arithmetic) and the model presets next to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from hybridflow_mg.algos.config import AlgoConfig
from hybridflow_mg.config.schema import DistConfig, ParallelConfig, RunConfig
from hybridflow_mg.data.config import DataConfig, _check_files
from hybridflow_mg.rewards.config import RewardConfig
from hybridflow_mg.rollout.config import MIN_SAMPLING_TEMPERATURE, RolloutConfig


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer ≥ {low}, got {value!r}")


def _finite(key: str, value, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
            high_open: bool = False, why: str = "") -> None:
    """A finite number within the bounds (NaN and ±inf never pass)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = (f"{'>' if low_open else '≥'} {low:g}" if high == math.inf else
                f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        raise ValueError(f"{key} must be a finite number {span}{why}, got {value!r}")


@dataclass(kw_only=True)
class SyntheticModelConfig:
    """A tiny random Llama and the synthetic arithmetic task, made at the start of the run (CPU quickstart)."""

    task: Literal["arithmetic", "countdown"] = "arithmetic"
    """Which synthetic task (data/synthetic.py) the prompts, answers and reward come from."""
    num_train: int = 192
    """RL prompts generated (a small pool the run revisits often)."""
    num_val: int = 64
    """Validation problems generated."""
    num_warm_start: int = 600
    """Problems for the supervised warm start, disjoint from the RL and validation prompts."""
    max_operand: int = 49
    """Arithmetic operands are drawn from 0 … max_operand."""
    seed: int | None = None
    """Seed of the generated problems (warm start, RL, validation) and so of the tokenizer; left out, the
    run seed (`run.seed`). `hybridflow-mg sweep` fixes it, so that runs of different seeds train and
    validate on the same problems and differ only in initialisation, data order and sampling."""
    hidden_size: int = 128
    """Width of the tiny model (vLLM on CPU needs head_dim ≥ 64: hidden / heads)."""
    num_layers: int = 2
    num_heads: int = 2
    ffn_hidden_size: int = 384

    def __post_init__(self):
        for key in ("num_train", "num_val", "max_operand", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            _positive(key, getattr(self, key))
        _positive("num_warm_start", self.num_warm_start, allow_zero=True)
        if self.seed is not None:
            _positive("seed", self.seed, allow_zero=True)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads} "
                             "(head_dim = hidden_size / num_heads)")
        space, wanted = (self.max_operand + 1) ** 2, self.num_train + self.num_val + self.num_warm_start
        if self.task == "arithmetic" and wanted > space:
            raise ValueError(f"num_train + num_val + num_warm_start = {wanted} but only {space} distinct problems "
                             f"exist with max_operand={self.max_operand}; raise max_operand or ask for fewer")


@dataclass(kw_only=True)
class ModelConfig:
    """Where the models come from and how they are built."""

    path: str | None = None
    """HF model directory of the actor (and reference); required unless `synthetic` is set."""
    critic_path: str | None = None
    """HF directory of the critic; left out, the critic starts from the actor's weights with a zero head."""
    reward_model_path: str | None = None
    """HF *ForSequenceClassification directory of a reward model; left out, rule rewards only."""
    hf_config: str | None = None
    """An HF config.json of `path`'s model, for `hybridflow-mg plan CONFIG` on a machine without the
    weights (the presets point at configs/models/*.json); a run reads `path`'s own config."""
    synthetic: SyntheticModelConfig | None = None
    """Make a tiny random model and a synthetic task in the run directory instead of loading `path`."""
    layer_spec: Literal["auto", "local", "te", "sdpa"] = "auto"
    """Transformer-layer implementation: local (CPU), te (transformer-engine), sdpa; auto picks."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of every model (bfloat16 on GPUs; float32 keeps CPU runs exact)."""
    vocab_divisor: int = 128
    """Megatron pads the vocab to a multiple of vocab_divisor × tp."""

    def __post_init__(self):
        _positive("vocab_divisor", self.vocab_divisor)


@dataclass(kw_only=True)
class OptimConfig:
    """Adam(W) through megatron-core's optimizer, with megatron-core's learning-rate schedule
    (`OptimizerParamScheduler`) counted in RL steps: linear warmup from 0, then constant, linear or
    cosine decay to `min_lr` (Loshchilov & Hutter 2017 for cosine)."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    lr_warmup_steps: int = 0
    """RL steps of linear warmup from 0 to `lr`."""
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    """After the warmup: keep `lr`, or decay it to `min_lr` by `lr_decay_steps`."""
    lr_decay_steps: int | None = None
    """RL step at which the decay reaches `min_lr`; left out, `trainer.total_steps`."""
    min_lr: float = 0.0
    """Floor of the linear and cosine decays."""

    def __post_init__(self):
        _finite("lr", self.lr, low_open=True)
        _finite("clip_grad", self.clip_grad, why=" (0 turns clipping off)")
        _positive("lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        if self.lr_decay_steps is not None:
            _positive("lr_decay_steps", self.lr_decay_steps)
            if self.lr_warmup_steps >= self.lr_decay_steps:
                raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps} must be below lr_decay_steps="
                                 f"{self.lr_decay_steps} (megatron-core's schedule warms up, then decays)")
        _finite("min_lr", self.min_lr, high=self.lr, why=" (up to lr)")
        _finite("weight_decay", self.weight_decay)
        for key in ("beta1", "beta2"):  # Adam's ranges: torch's Adam refuses others, fused ones diverge
            _finite(key, getattr(self, key), high=1.0, high_open=True)
        _finite("eps", self.eps)


@dataclass(kw_only=True)
class WarmStartConfig:
    """A short supervised warm start of the actor on the synthetic task's answers (0 steps = off)."""

    steps: int = 0
    """Optimizer steps of cross-entropy on prompt → answer; the quickstart uses it so RL starts from a
    model that is right sometimes."""
    files: list[str] = field(default_factory=list)
    """Prompt files (same columns as data.train_files) whose `extra_info.answer` (or ground truth) is the
    target; empty means the RL training prompts. Synthetic runs write their own warm-start file."""
    batch_size: int = 64
    """Examples per warm-start step (over all data-parallel ranks)."""
    lr: float = 3e-3

    def __post_init__(self):
        _positive("steps", self.steps, allow_zero=True)
        _positive("batch_size", self.batch_size)
        _finite("lr", self.lr, low_open=True)
        _check_files("files", self.files)


@dataclass(kw_only=True)
class ActorConfig:
    """Policy updates on the training layout."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the step's prompts (with all their samples) split into this many."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch (sequences × padded length), per data-parallel rank."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def __post_init__(self):
        for key in ("ppo_epochs", "mini_batches", "micro_batch_tokens"):
            _positive(key, getattr(self, key))


@dataclass(kw_only=True)
class CriticConfig:
    """Value-function updates (used when the advantage estimator needs values, e.g. gae)."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 8192

    def __post_init__(self):
        for key in ("ppo_epochs", "mini_batches", "micro_batch_tokens"):
            _positive(key, getattr(self, key))


@dataclass(kw_only=True)
class TrainerConfig:
    """The loop: how long, and when to validate, log and save."""

    total_steps: int = 100
    """RL steps (each: one batch of prompts, rollouts, updates)."""
    val_every: int = 10
    """Greedy validation every this many steps (and before the first); 0 = never."""
    save_every: int = 0
    """Save a training checkpoint (`checkpoints/step_N`) every this many steps; 0 = never during the
    run (the end is `save_final`). What it holds: see the README's "Resume" section."""
    save_final: bool = True
    """Save a training checkpoint (`checkpoints/final`) when the run ends."""
    keep_last: int = 2
    """Keep this many `step_N` checkpoints, deleting older ones once a newer one is complete; 0 keeps
    all. `final` is never deleted."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint of the run directory, if any (a finished
    run says so and exits 0); `never`: start afresh; or the path of a checkpoint directory."""
    save_before_deadline: float | None = None
    """Seconds: when less than this is left before the job's deadline (SLURM's `SLURM_JOB_END_TIME`,
    or `HYBRIDFLOW_DEADLINE`, both Unix times), save and exit resumable (status 75) after the
    current step. Left out, only signals stop a run early."""
    max_bad_steps: int = 3
    """Abort after this many consecutive steps with a non-finite loss or gradient (each such update
    is skipped and counted)."""
    offload_during_rollout: bool = False
    """GPU: move the training models' parameters, gradients and optimizer states to pinned host
    memory while vLLM generates (rollout/offload.py); a no-op on CPU."""

    def __post_init__(self):
        _positive("total_steps", self.total_steps)
        _positive("val_every", self.val_every, allow_zero=True)
        _positive("save_every", self.save_every, allow_zero=True)
        _positive("keep_last", self.keep_last, allow_zero=True)
        _positive("max_bad_steps", self.max_bad_steps)
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError(f"resume must be auto, never or a checkpoint path, got {self.resume!r}")
        if self.save_before_deadline is not None and not 0 < self.save_before_deadline < math.inf:
            raise ValueError(f"save_before_deadline must be a positive number of seconds, got {self.save_before_deadline!r}")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `hybridflow-mg train` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        if self.model.path is None and self.model.synthetic is None:
            raise ValueError("model.path (an HF directory) or model.synthetic is required")
        if self.model.synthetic is None and not self.data.train_files:
            raise ValueError("data.train_files is empty; list parquet/jsonl prompt files")
        if self.rollout.temperature < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(f"rollout.temperature must be positive for RL, at least {MIN_SAMPLING_TEMPERATURE} (vLLM "
                             f"samples lower ones at {MIN_SAMPLING_TEMPERATURE} while log-probs are taken at the "
                             f"configured one), got {self.rollout.temperature}; greedy decoding is only for validation")
        if self.reward.dynamic_sampling and self.rollout.n < 2:
            raise ValueError(f"reward.dynamic_sampling drops the groups whose scores are all equal, and rollout.n="
                             f"{self.rollout.n} makes every group one sample, so every sample would be dropped; set "
                             "rollout.n ≥ 2 or reward.dynamic_sampling=false")
        if "groups" in self.algo.needs and self.rollout.n < 2:
            raise ValueError(f"algo.advantage.estimator={self.algo.advantage.estimator} compares the samples of one "
                             f"prompt, and rollout.n={self.rollout.n} gives one-member groups whose advantages "
                             f"are all 0 (nothing is learned); set rollout.n ≥ 2, or use an estimator without "
                             f"groups (reinforce_plus_plus, gae, remax)")
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        for role in ("actor", "critic"):
            section = getattr(self, role)
            decay = section.optim.lr_decay_steps
            if decay is None and section.optim.lr_warmup_steps >= self.trainer.total_steps:
                raise ValueError(f"{role}.optim.lr_warmup_steps={section.optim.lr_warmup_steps} must be below "
                                 f"trainer.total_steps={self.trainer.total_steps} (the schedule decays after the "
                                 f"warmup, over {role}.optim.lr_decay_steps, else the run); lower it")
            if section.micro_batch_tokens < longest:
                raise ValueError(f"{role}.micro_batch_tokens={section.micro_batch_tokens} cannot hold one sequence of "
                                 f"data.max_prompt_length + rollout.max_new_tokens = {longest} tokens (such a "
                                 f"sequence would run over the budget); raise it to at least {longest}")
        syn, warm = self.model.synthetic, self.actor.warm_start
        if syn is not None and self.data.prompts_per_step > syn.num_train:
            raise ValueError(f"data.prompts_per_step={self.data.prompts_per_step} is more than the "
                             f"model.synthetic.num_train={syn.num_train} prompts; lower it or raise num_train")
        if syn is not None and warm.steps and warm.batch_size > syn.num_warm_start:
            raise ValueError(f"actor.warm_start.batch_size={warm.batch_size} is more than the "
                             f"model.synthetic.num_warm_start={syn.num_warm_start} problems it draws from; lower it, "
                             "raise num_warm_start, or set actor.warm_start.steps=0")


def check_batch_split(cfg: TrainConfig, dp: int) -> None:
    """Each data-parallel rank gets the same whole number of prompts, enough for every mini-batch (and of
    warm-start examples). (Any number of sequences per model pass runs at vpp > 1: the worker pads the
    micro-batch count to a multiple of pp, `trainer/workers.py`.)"""
    per_rank, rest = divmod(cfg.data.prompts_per_step, dp)
    mini_batches = max(cfg.actor.mini_batches, cfg.critic.mini_batches)
    if rest or per_rank < mini_batches:
        raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} must be a multiple of the data-parallel "
                         f"size {dp}, with at least actor/critic mini_batches prompts per rank")
    warm = cfg.actor.warm_start
    if warm.steps and warm.batch_size % dp:
        raise ValueError(f"actor.warm_start.batch_size={warm.batch_size} must be a multiple of the data-parallel size "
                         f"{dp} (each rank trains on an equal share)")
