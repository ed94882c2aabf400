"""A policy served outside a training run: `generate` and `eval` share it.

    check_layouts(spec, train={"tp": 2}, gen={"tp": 1}, nproc=2, where=" of runs/m")   # before launch
    check_kv_cache(spec, gen_tp, gen_pp, max_model_len, kv_cache_bytes=None, dtype="float32")
    policy = start_policy(weights, spec, config_dir, train=t, gen=g, rollout=RolloutConfig(...))
    with policy.hybrid.generating():
        completions = policy.hybrid.generate(prompts, sampling, whole_batch=True)
    policy.close()

The weights (an HF directory or any canonical source, e.g. a checkpoint's `MegatronSource` saved at
another layout) are loaded into the Megatron training layout and resharded into the in-process vLLM
engine's generation layout: the path a training run takes, so a model is served with the layouts it
was trained with. The checks are cheap (no weights, no torch.distributed): a launching process runs
them before `--nproc` starts workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybridflow_mg.models.hf_spec import ModelSpec
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.reshard.execute import ReshardStats
    from hybridflow_mg.rollout.config import RolloutConfig
    from hybridflow_mg.rollout.hybrid_engine import HybridEngine
    from hybridflow_mg.rollout.kv_cache import OptionNames
    from hybridflow_mg.rollout.vllm_engine import VLLMEngine


def check_layouts(spec: ModelSpec, *, train: dict[str, int], gen: dict[str, int], nproc: int | None, where: str,
                  gen_flag: str = "--gen") -> None:
    """The training sizes `train` {"tp", "pp"} and generation sizes `gen` {"tp", "pp"} (either may be
    left out: tp 1 and the training tp, pp 1) checked against the model and the world the workers will
    have (`nproc`, or the launcher's): one-line ValueError. `where` names the model (" of DIR")."""
    from hybridflow_mg.models.hf_spec import check_layout
    from hybridflow_mg.models.layouts import check_gen_pp
    from hybridflow_mg.parallel.launch import discover
    from hybridflow_mg.parallel.layout import ParallelLayout

    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    t, g = train, gen
    check_layout(spec, t.get("tp", 1), t.get("pp", 1))
    check_gen_pp(spec.dims.num_layers, g.get("pp", 1), f"{gen_flag} pp", where)
    launched = discover().world_size
    ParallelLayout.create(world=nproc if nproc and launched == 1 else launched, tp=t.get("tp", 1),
                          pp=t.get("pp", 1), gen_tp=g.get("tp"), gen_pp=g.get("pp", 1))  # the grid the workers build


def check_kv_cache(spec: ModelSpec, gen_tp: int, gen_pp: int, max_model_len: int, *, kv_cache_bytes: int | None,
                   dtype: str, names: OptionNames | None = None) -> None:
    """One line, before any engine starts, when vLLM's KV cache cannot hold one sequence of
    `max_model_len` tokens on a rank (a stage's layers, a gen-tp share of the heads)."""
    import torch

    from hybridflow_mg.rollout import kv_cache

    cache = kv_cache.cache_bytes(kv_cache_bytes, on_cpu=not torch.cuda.is_available())
    kv_cache.check_fits(max_model_len, cache, dims=spec.dims, gen_tp=gen_tp, gen_pp=gen_pp,
                        element=kv_cache.element_bytes(dtype, spec.hf_config),
                        names=names or kv_cache.GENERATE_OPTIONS)


def stop_ids(hf_config: dict) -> tuple[int, ...]:
    """The stop tokens an HF config names (`eos_token_id`, an id or a list)."""
    eos = hf_config.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())


@dataclass
class StandalonePolicy:
    """One process's part of a served policy: the grid, the Megatron actor chunks (training layout),
    the vLLM engine (generation layout) and the resharder between them, weights already synced."""

    grid: Grid
    chunks: list[Any]
    naming: str
    """Parameter naming of the built chunks ("local" or "te")."""
    engine: VLLMEngine
    hybrid: HybridEngine
    reshard: ReshardStats
    """What the first weight sync moved (bytes, collectives, seconds)."""

    def close(self) -> None:
        """Release the engine, the grid's groups and torch.distributed (collective)."""
        import torch.distributed as dist

        self.engine.shutdown()
        self.grid.destroy()
        dist.destroy_process_group()


def start_policy(weights: str | Path | Any, spec: ModelSpec, config_dir: str | Path, *, train: dict[str, int],
                 gen: dict[str, int], rollout: RolloutConfig, dtype: str, option_names: OptionNames | None = None,
                 num_decodable_ids: int | None = None) -> StandalonePolicy:
    """Start torch.distributed, build the actor on the training layout `train`, load `weights` (an HF
    directory, or a canonical source such as `MegatronSource`), start vLLM on the generation layout
    `gen` from the config.json in `config_dir`, and reshard the weights into it (collective)."""
    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.models.hf_io import HFSource, load_into_model
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed
    from hybridflow_mg.parallel.layout import ParallelLayout
    from hybridflow_mg.rollout.hybrid_engine import HybridEngine
    from hybridflow_mg.rollout.kv_cache import GENERATE_OPTIONS
    from hybridflow_mg.rollout.vllm_engine import VLLMEngine

    info, device = init_distributed()
    layout = ParallelLayout.create(world=info.world_size, tp=train.get("tp", 1), pp=train.get("pp", 1),
                                   gen_tp=gen.get("tp"), gen_pp=gen.get("pp", 1))
    grid = Grid.create(layout, device)
    chunks, built = build_model(spec, grid, role="actor", dtype=dtype)
    source = HFSource(weights, spec.dims) if isinstance(weights, (str, Path)) else weights
    load_into_model(chunks, source, tp=layout.tp, tp_rank=grid.train.tp, pp=layout.pp, pp_rank=grid.train.pp,
                    naming=built.naming)
    engine = VLLMEngine(str(config_dir), layout, rollout, load_weights=False,
                        option_names=option_names or GENERATE_OPTIONS, num_decodable_ids=num_decodable_ids)
    hybrid = HybridEngine(grid, chunks, spec.dims, engine, naming=built.naming)
    stats = hybrid.sync_weights()
    return StandalonePolicy(grid=grid, chunks=chunks, naming=built.naming, engine=engine, hybrid=hybrid, reshard=stats)
