"""The run directory and, for the CPU quickstart, the synthetic task and a tiny random model.

`finished(cfg)` tells, from the checkpoints' markers alone, whether a rerun has anything to do.
`prepare_run` runs on the logging rank before anyone builds models: it creates the run directory,
writes the resolved config, and (with `model.synthetic`) writes the task's parquet files, a
sentencepiece tokenizer, and a tiny random Llama with that tokenizer as an HF directory. Every rank
then reads the returned paths.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hybridflow_mg.config.load import dump_config


def run_dir(cfg) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


SETTING_UP = ".setting_up"
"""Marks a run directory this run's setup created and has not finished: a failed setup removes it."""


def prepare_run(cfg):
    """(cfg with model/data paths filled in for synthetic runs, run directory). Logging rank only."""
    out = run_dir(cfg)
    if not out.exists():
        out.mkdir(parents=True)
        (out / SETTING_UP).write_text("this run's setup has not finished; a failed setup removes this directory\n")
    if cfg.model.synthetic is not None:
        cfg = _synthetic(cfg, out)
    dump_config(cfg, out / "config.yaml")
    return cfg


def synthetic_paths(cfg):
    """The paths `prepare_run` fills in for a synthetic run (every rank computes them the same way)."""
    out = run_dir(cfg)
    model = replace(cfg.model, path=str(out / "model"))
    data = replace(cfg.data, train_files=[str(out / "data" / "train.parquet")],
                   val_files=[str(out / "data" / "val.parquet")], tokenizer=str(out / "model"))
    warm = replace(cfg.actor.warm_start, files=[str(out / "data" / "warm_start.parquet")])
    return replace(cfg, model=model, data=data, actor=replace(cfg.actor, warm_start=warm))


def _synthetic(cfg, out: Path):
    import torch
    import transformers

    from hybridflow_mg.data.synthetic import make_synthetic_task
    from hybridflow_mg.data.tokenizer import Tokenizer, sentencepiece_to_hf

    from hybridflow_mg.data.synthetic import to_verl_rows, write_parquet

    syn = cfg.model.synthetic
    # one pool of distinct problems: the first num_warm_start for the warm start, the rest for RL + val
    task = make_synthetic_task(out / "data", task=syn.task, num_train=syn.num_warm_start + syn.num_train,
                               num_val=syn.num_val, seed=cfg.run.seed if syn.seed is None else syn.seed,
                               max_operand=syn.max_operand)
    warm, rl = task.train_examples[:syn.num_warm_start], task.train_examples[syn.num_warm_start:]
    write_parquet(to_verl_rows(warm, split="warm_start"), out / "data" / "warm_start.parquet")
    write_parquet(to_verl_rows(rl, split="train"), out / "data" / "train.parquet")
    model_dir = out / "model"
    sentencepiece_to_hf(task.tokenizer_file, model_dir)
    tok = Tokenizer.from_path(model_dir)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=syn.hidden_size, intermediate_size=syn.ffn_hidden_size,
        num_hidden_layers=syn.num_layers, num_attention_heads=syn.num_heads, num_key_value_heads=syn.num_heads,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(cfg.run.seed)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    return synthetic_paths(cfg)


def setup_finished(out: Path) -> None:
    """The run's setup succeeded: its directory stays whatever happens next (logging rank)."""
    (out / SETTING_UP).unlink(missing_ok=True)


def abandon_setup(cfg) -> None:
    """After a failed setup: remove the run directory when this setup created it, so a failure leaves
    no half-created run behind (logging rank; a directory that held an earlier run is kept)."""
    import shutil

    out = run_dir(cfg)
    if (out / SETTING_UP).is_file():
        shutil.rmtree(out, ignore_errors=True)


def check_output_dir(cfg) -> None:
    """The run directory can be created and written: no part of its path is a file, and its nearest
    existing ancestor takes a new file (probed with a temporary file, removed at once). A one-line
    ValueError naming `run.output_dir` otherwise; nothing is left behind."""
    import os
    import tempfile

    out = run_dir(cfg)
    probe = out
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise ValueError(f"run.output_dir: {probe} is a broken symbolic link; fix it or choose another run.output_dir")
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"run.output_dir: {probe} is a file, not a directory, so {out} cannot be created; "
                         "choose another run.output_dir or run.name")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".hybridflow_probe_")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(f"run.output_dir: cannot write in {probe} ({e.strerror}); choose a writable "
                         "run.output_dir") from None


def check_fresh_start(cfg, *, clear: bool = False) -> None:
    """With `trainer.resume=never`, the run directory must hold no complete checkpoint of an earlier run
    (a later `auto` would resume that one): a one-line ValueError, or with `run.overwrite=true` and
    `clear`, the earlier run's checkpoints, metrics and TensorBoard events are deleted (one rank)."""
    import shutil

    from hybridflow_mg.checkpoint import training

    out = run_dir(cfg)
    if cfg.trainer.resume != "never" or not training.complete(out / "checkpoints"):
        return
    if not cfg.run.overwrite:
        raise ValueError(f"{out} holds the checkpoints of an earlier run and trainer.resume=never starts afresh: set "
                         "run.overwrite=true to delete them, or give this run another run.name")
    if clear:
        for path in (out / "checkpoints", out / "tensorboard"):
            shutil.rmtree(path, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def finished(cfg) -> str | None:
    """When the checkpoint `trainer.resume` would continue from has already reached `trainer.total_steps`,
    the line to print instead of training (nothing is built or written); else None. Reads markers only,
    so every rank, and the launcher before it starts any, gets the same answer."""
    from hybridflow_mg.checkpoint import training

    root = run_dir(cfg) / "checkpoints"
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = training.complete(root)
        if not found:
            return None
        step, path = found[-1]
    else:
        try:
            path = Path(mode)
            step = training.read_marker(path)["step"]
        except ValueError:
            return None  # setup reports what is wrong with it
    if step < cfg.trainer.total_steps:
        return None
    return (f"run {run_dir(cfg)} already finished at step {step} ({path}); raise trainer.total_steps above {step} "
            "to train on, or start again with another run.name (or trainer.resume=never run.overwrite=true)")
