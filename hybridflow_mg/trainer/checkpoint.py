"""Training checkpoints of a run: what goes in, and how a run resumes from one.

A checkpoint directory (`run_dir/checkpoints/step_N` or `.../final`), written atomically by
`checkpoint/training.py`:

    hybridflow.json, model/, tokenizer/   the actor's weights in the project's shard format (any layout
                                          loads them; `hybridflow-mg export --ckpt DIR` makes HF files)
    critic/                               the critic's weights, same format (runs with a critic)
    reference/                            the reference model's weights, same format (warm-started runs
                                          with a reference: the warm-started actor's)
    optim/actor/, optim/critic/           the optimizer states (Adam moments; fp32 master weights with
                                          mixed precision) through megatron-core dist_checkpointing
    trainer_state.pt                      step, data position (epoch, index, shuffle seed), KL controller,
                                          learning-rate schedules, callbacks' states
    rng/rank_RRRRR.pt                     every RNG stream of each rank
    COMPLETE                              written last: step, layout, world, every file's size

Layout-portable: weights, optimizer states, and everything in trainer_state.pt. The RNG streams are
restored only at the same world size and layout (the loop draws nothing from them that changes a
result: sampling seeds derive from the run seed and the step). The reference and reward models are
frozen and rebuilt from their sources (the reference of a warm-started run from `reference/`).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from hybridflow_mg.checkpoint import training
from hybridflow_mg.checkpoint.megatron import META, CheckpointMeta, MegatronSource, save_shard, write_meta
from hybridflow_mg.checkpoint.optimizer_state import load_optimizer_state, save_optimizer_state
from hybridflow_mg.models.hf_io import copy_tokenizer_files, model_params
from hybridflow_mg.models.layouts import name
from hybridflow_mg.parallel import faults
from hybridflow_mg.parallel.grid import on_rank0

REFERENCE = "reference"
"""The checkpoint's subdirectory with the reference model's weights (warm-started runs only)."""

STATE = "trainer_state.pt"


def _layout(lay) -> dict[str, int]:
    """The training layout as the marker records it (RNG streams are restored only at the same one)."""
    return {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp}


def trainable(run) -> list[tuple[str, object]]:
    """(role, worker) of the roles with an optimizer."""
    return [(role, w) for role, w in (("actor", run.actor), ("critic", run.critic)) if w is not None]


def save_weights(run, worker, spec, directory: Path, *, role: str, source: str) -> None:
    """`worker`'s weights as a checkpoint in the project's shard format (collective). Every rank of
    data-parallel index 0 writes its (tp, pp) shard; the logging rank then writes the meta file with
    the config of the HF directory `source`. The actor's checkpoint also gets the tokenizer the run
    used (`run.tokenizer`: data.tokenizer when set, else model.path), which `export` passes on."""
    grid, lay = run.grid, run.grid.layout
    params = list(model_params(worker.modules, spec.dims, pp=lay.pp, pp_rank=grid.train.pp, vpp=lay.vpp,
                               naming=run.naming))
    if grid.train.dp == 0:
        save_shard(directory, grid.train.tp, grid.train.pp, {name(rule, "mcore", layer): p for rule, layer, _, p in params})
    dist.barrier()

    def meta() -> None:
        src = Path(source)
        if role == "actor":
            copy_tokenizer_files(run.tokenizer.path, directory / "tokenizer", model_dir=src)
        hf_config = json.loads((src / "config.json").read_text())
        dtype = str(params[0][3].dtype).removeprefix("torch.")
        write_meta(directory, CheckpointMeta(hf_config=hf_config, dims=asdict(spec.dims), tp=lay.tp, pp=lay.pp,
                                             vpp=lay.vpp, role=role, dtype=dtype))

    on_rank0(meta)


class NonFiniteWeights(RuntimeError):
    """A trained weight holds NaN or inf: the run diverged (exit status 1; the message says it all)."""

    plain = True


def check_finite(run, directory: Path) -> None:
    """Raise `NonFiniteWeights` on every rank, before anything is written, when a weight of a trained
    role holds NaN or inf on any rank (collective: one all-reduce; one device sync per rank): non-finite
    weights never reach a checkpoint."""
    params = [(role, n, p) for role, w in trainable(run) for chunk in w.modules for n, p in chunk.named_parameters()]
    norms = torch.stack([torch.linalg.vector_norm(p.detach(), float("inf")).float() for _, _, p in params])  # no mask
    bad = None if bool(torch.isfinite(norms).all()) else next(
        f"{role} {n} on rank {run.grid.rank}" for (role, n, _), v in zip(params, norms.tolist()) if v != v or v == float("inf"))
    flag = torch.tensor([run.grid.rank + 1.0 if bad else 0.0], device=run.grid.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = bad or f"rank {int(flag.item()) - 1}"
        raise NonFiniteWeights(f"not saving {directory}: a weight is not finite ({where}); the run diverged: lower "
                               "the learning rate or resume from an earlier checkpoint")


def save_checkpoint(run, directory: Path, state: dict) -> Path:
    """Write the whole training state of `run` as the checkpoint `directory` (collective); `state` is
    the trainer's own part (see `Trainer.state_dict`). Returns `directory`, complete."""
    from hybridflow_mg.trainer.state import process_rng_state

    grid = run.grid
    check_finite(run, directory)
    tmp = on_rank0(lambda: training.start_partial(directory))
    save_weights(run, run.actor, run.spec, tmp, role="actor", source=run.cfg.model.path)
    faults.trigger("save")  # tests kill a rank here: between shard writes
    if run.critic is not None:
        save_weights(run, run.critic, run.critic_spec, tmp / "critic", role="critic",
                     source=run.cfg.model.critic_path or run.cfg.model.path)
    if reference_is_trained(run):  # else it is rebuilt from model.path
        save_weights(run, run.ref, run.spec, tmp / REFERENCE, role=REFERENCE, source=run.cfg.model.path)
    for role, worker in trainable(run):
        on_rank0(lambda: (tmp / "optim" / role).mkdir(parents=True))
        save_optimizer_state(worker, tmp / "optim" / role)
    on_rank0(lambda: (tmp / "rng").mkdir())
    torch.save(process_rng_state(), tmp / "rng" / f"rank_{grid.rank:05d}.pt")
    dist.barrier()  # every rank's files exist: now the marker, last

    def finish() -> Path:
        torch.save(state, tmp / STATE)
        return training.commit(directory, step=int(state["step"]),
                               info={"world": grid.layout.world, "layout": _layout(grid.layout)})

    return on_rank0(finish)


def find_resume(cfg, run_dir: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint `trainer.resume` asks for, verified, and its marker; (None, None) for a fresh
    start. Removes what killed saves left. Rank 0 (file system); raises a one-line ValueError."""
    from hybridflow_mg.trainer.bootstrap import check_fresh_start

    root = run_dir / "checkpoints"
    training.remove_partial(root)
    mode = cfg.trainer.resume
    if mode == "never":
        check_fresh_start(cfg, clear=True)
        return None, None
    if mode != "auto":
        return training.named(mode, root)
    found = training.complete(root)
    return (found[-1][1], training.verify(found[-1][1])) if found else (None, None)


def reference_is_trained(run) -> bool:
    """Whether the run's reference model holds weights of its own (the warm-started actor's, see
    `warm_start.reference_from_actor`, or a checkpoint's `reference/`) that checkpoints must carry,
    rather than `model.path`'s."""
    return run.ref is not None and run.reference_trained


def reference_source(cfg, resume: Path | None, spec) -> tuple[object, bool]:
    """(where the reference model's weights come from, whether they are its own): a resumed checkpoint's
    `reference/` when it has one (a warm-started run's), else `model.path`. A warm-started run resumed
    from a checkpoint without it (saved without a reference model) rebuilds it from `model.path` and
    says so. Collective: rank 0 looks at the checkpoint, every rank gets its answer."""
    if resume is None:
        return cfg.model.path, False

    def look() -> bool:
        held = (resume / REFERENCE / META).is_file()
        if not held and cfg.actor.warm_start.steps:
            print(f"note: checkpoint {resume} holds no reference weights (saved without a reference model): the "
                  "reference is model.path's weights, not the warm-started actor's", flush=True)
        return held

    if on_rank0(look):
        return weights_source(resume, spec, REFERENCE), True
    return cfg.model.path, False


def weights_source(path: Path, spec, role: str) -> MegatronSource:
    """The checkpoint's weights of `role` as a canonical source, checked against the model being built."""
    where = path if role == "actor" else path / role
    if not (where / META).is_file():
        raise ValueError(f"checkpoint {str(path)!r} holds no {role} weights, but this run trains a {role}; "
                         "resume with the algorithm it was saved with")
    source = MegatronSource(where)
    if source.dims != spec.dims:
        diff = [f"{k} {v} (checkpoint) vs {getattr(spec.dims, k)}" for k, v in asdict(source.dims).items()
                if getattr(spec.dims, k) != v]
        raise ValueError(f"checkpoint {str(path)!r} was saved from a different model ({'; '.join(diff[:2])}); "
                         "resume with the model it was trained from, or trainer.resume=never")
    return source


def load_checkpoint(run, path: Path, marker: dict) -> dict:
    """Load the optimizer states and RNG streams of checkpoint `path` into `run` (collective; the
    weights were loaded when the models were built) and return the trainer's part of the state."""
    from hybridflow_mg.trainer.state import set_process_rng_state

    if (path / "critic").is_dir() != (run.critic is not None):
        raise ValueError(f"checkpoint {str(path)!r} was saved {'with' if (path / 'critic').is_dir() else 'without'} "
                         f"a critic and this run {'does not train' if run.critic is None else 'trains'} one; resume "
                         "with the algorithm it was saved with")
    for role, worker in trainable(run):
        try:
            load_optimizer_state(worker, path / "optim" / role)
        except Exception as e:  # noqa: BLE001 - megatron/torch raise many kinds for a damaged checkpoint
            text = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"checkpoint {str(path)!r}: the {role}'s optimizer state cannot be loaded at this "
                             f"layout ({type(e).__name__}: {text[:200]})") from None
    state = torch.load(path / STATE, weights_only=False)
    lay = run.grid.layout
    saved = marker.get("layout", {})
    if marker.get("world") == lay.world and saved == _layout(lay):
        set_process_rng_state(torch.load(path / "rng" / f"rank_{run.grid.rank:05d}.pt", weights_only=False))
    return state
