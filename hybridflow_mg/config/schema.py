"""The config tree: one keyword-only dataclass per component, each field documented.

Presets live in `configs/*.yaml`; `load.py` fills these from YAML and `a.b=value` overrides. Each
`__post_init__` checks what can be checked without knowing the world size; the layout against the
world is checked by `parallel.layout.ParallelLayout` when the run starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


MAX_SEED = 2**63

DEFAULT_LOGGERS = ("jsonl", "console", "tensorboard")
"""`run.loggers` left out: metrics.jsonl, a console line per step and TensorBoard (when installed)."""


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(kw_only=True)
class TrainParallelConfig:
    """The training layout of every model (actor, critic, reference, reward): Megatron's grid."""

    tp: int = 1
    """Tensor-parallel size t: each weight matrix is split over t ranks."""
    pp: int = 1
    """Pipeline-parallel size p: the layers are split into p stages."""
    vpp: int = 1
    """Virtual pipeline chunks per stage (interleaved schedule); 1 means off, >1 needs pp > 1."""
    dp: int | None = None
    """Data-parallel size d; left out, it is world / (tp·pp). Given, tp·pp·dp must equal the world."""

    def __post_init__(self):
        for name in ("tp", "pp", "vpp"):
            _positive(name, getattr(self, name))
        if self.dp is not None:
            _positive("dp", self.dp)
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp={self.vpp} needs pp > 1 (virtual stages interleave real ones); set vpp=1 or pp>1")


@dataclass(kw_only=True)
class GenParallelConfig:
    """The generation (rollout) layout of the actor inside vLLM: HybridFlow's p_g-t_g-d_g-d."""

    tp: int | None = None
    """Generation tensor-parallel size t_g; left out, it equals the training tp."""
    pp: int = 1
    """Generation pipeline size p_g (vLLM PP under external_launcher is limited; 1 is the usual)."""

    def __post_init__(self):
        if self.tp is not None:
            _positive("tp", self.tp)
        _positive("pp", self.pp)


@dataclass(kw_only=True)
class ParallelConfig:
    """Both layouts of the 3D-HybridEngine; d_g = tp·pp / (gen.tp·gen.pp) micro-DP ranks per shard."""

    train: TrainParallelConfig = field(default_factory=TrainParallelConfig)
    """Megatron layout for training and for every model's forward passes."""
    gen: GenParallelConfig = field(default_factory=GenParallelConfig)
    """vLLM layout for sampling."""


@dataclass(kw_only=True)
class DistConfig:
    """How the processes find each other and talk."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: auto picks NCCL when CUDA is present, else gloo."""
    timeout_minutes: int = 30
    """Collective timeout; a hung rank fails the run after this long instead of hanging forever."""

    def __post_init__(self):
        _positive("timeout_minutes", self.timeout_minutes)


@dataclass(kw_only=True)
class WandbConfig:
    """The `wandb` logger (used when `run.loggers` names it; needs `pip install wandb`)."""

    project: str = "hybridflow_mg"
    """W&B project; the run is named and grouped by `run.name`."""
    entity: str | None = None
    """W&B team or user; left out, the account's default (online) or none (offline)."""
    mode: Literal["offline", "online", "disabled"] | None = None
    """Left out: the `WANDB_MODE` environment variable, else offline (the run is written under
    `<run dir>/wandb/`; `wandb sync` uploads it later from a machine with network)."""
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"project must name a W&B project, got {self.project!r}")


@dataclass(kw_only=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    """Run name: the run directory is output_dir/name."""
    output_dir: str = "runs"
    """Parent folder of run directories (resolved config, metrics, checkpoints)."""
    seed: int = 1234
    """Seed of every random stream (data order, init, sampling)."""
    overwrite: bool = False
    """Start afresh (`trainer.resume=never`) in a run directory that holds an earlier run's checkpoints,
    deleting them, its metrics.jsonl and its TensorBoard events; without it such a start is refused
    rather than mixing two runs."""
    imports: list[str] = field(default_factory=list)
    """Modules (`my_pkg.my_module`) or Python files (`path/to/file.py`, relative to the working
    directory) imported on every rank before the config is validated, so that the estimators, losses
    and rewards they register can be named in YAML and in overrides."""
    loggers: list[str] = field(default_factory=lambda: list(DEFAULT_LOGGERS))
    """Where each step's metrics go (logging rank): `jsonl` (metrics.jsonl), `console` (a line per
    step), `tensorboard` (`tensorboard/`, when installed), `wandb` (see `wandb`), or a sink that a
    module of `imports` registers with `@LOGGERS.register` (hybridflow_mg/metrics/sinks.py)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Options of the `wandb` logger."""

    def __post_init__(self):
        if (not isinstance(self.name, str) or self.name.strip() in ("", ".") or self.name.startswith("/")
                or ".." in self.name.replace("\\", "/").split("/")):
            raise ValueError(f"name must name a run directory under output_dir (no absolute path, no '..'), "
                             f"got {self.name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63) (torch's generators take at most 64 bits, and "
                             f"megatron-core adds offsets), got {self.seed!r}")
        _check_loggers(self.loggers)


def _check_loggers(names: list[str]) -> None:
    """Each name registered (after `run.imports`), none twice, and each sink able to run here (wandb
    installed): one line naming the key, before anything starts."""
    from hybridflow_mg.metrics.sinks import LOGGERS  # lazy: the config layer sits below metrics

    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"loggers must be a list of logger names, e.g. [jsonl, console], got {names!r}")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"loggers names {name!r} twice")
        try:
            sink = LOGGERS.get(name)
            if hasattr(sink, "check"):  # a plain factory function has none
                sink.check()
        except ValueError as e:
            raise ValueError(f"loggers[{i}]: {e}") from None


@dataclass(kw_only=True)
class Config:
    """Everything one `hybridflow-mg` run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run name, output folder, seed."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Training and generation layouts."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process-group backend and timeouts."""
