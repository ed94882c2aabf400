"""Checkpoint directories (checkpoint/training.py) without processes: atomic commit, verification, the
choice of the newest complete one, pruning; and the optimizer-state seam for torch Adam's step."""
import json

import pytest
import torch

from hybridflow_mg.checkpoint import training


def _write(root, name, step, files=("a.bin",)):
    directory = root / name
    tmp = training.start_partial(directory)
    for f in files:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp / f).write_bytes(b"x" * (10 + step))
    return training.commit(directory, step=step, info={"world": 1})


def test_a_checkpoint_appears_only_complete_and_replaces_its_namesake_after(tmp_path):
    root = tmp_path / "checkpoints"
    d = _write(root, "step_2", 2, files=("a.bin", "model/b.bin"))
    marker = training.verify(d)
    assert marker["step"] == 2 and marker["files"] == {"a.bin": 12, "model/b.bin": 12}
    assert not training.partial_dir(d).exists()
    tmp = training.start_partial(root / "final")  # a save killed halfway: a partial directory only
    (tmp / "a.bin").write_bytes(b"half")
    assert training.complete(root) == [(2, d)]
    again = _write(root, "step_2", 3)  # a complete successor replaces it
    assert training.read_marker(again)["step"] == 3 and not (root / "step_2.old").exists()
    assert training.remove_partial(root) == [training.partial_dir(root / "final")]


def test_newest_first_final_last_and_pruning_keeps_final(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _write(root, f"step_{step}", step)
    _write(root, "final", 6)
    assert [d.name for _, d in training.complete(root)] == ["step_2", "step_4", "step_6", "final"]
    gone = training.prune(root, keep_last=2)
    assert [d.name for d in gone] == ["step_2"] and (root / "final").is_dir()
    assert training.prune(root, keep_last=0) == []


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "a.bin").write_bytes(b"cut"), "has 3 bytes, 12 were written (truncated?)"),
    (lambda d: (d / "a.bin").unlink(), "is missing a.bin"),
    (lambda d: (d / training.MARKER).write_text("[]"), "is corrupt"),
    (lambda d: (d / training.MARKER).write_text(json.dumps({"format": "other", "step": 1})), "is corrupt"),
    (lambda d: (d / training.MARKER).unlink(), "is not a complete training checkpoint"),
])
def test_a_damaged_checkpoint_is_one_line(tmp_path, damage, message):
    d = _write(tmp_path, "step_2", 2)
    damage(d)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")) as info:
        training.verify(d)
    assert "\n" not in str(info.value)
    if "corrupt" in message or "complete" in message:
        assert training.complete(tmp_path) == []  # `auto` skips it; named, it is an error


def test_adam_steps_shared_by_a_loader_are_unshared():
    """megatron-core 0.19's distributed optimizer hands every parameter one step tensor when it loads for
    torch Adam; torch's Adam would then count each step once per parameter."""
    from hybridflow_mg.checkpoint.optimizer_state import _unshare_adam_steps

    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    adam = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    shared = torch.tensor(1.0)
    for p in params:
        adam.state[p]["step"] = shared
    _unshare_adam_steps(adam)
    adam.step()
    assert [float(adam.state[p]["step"]) for p in params] == [2.0, 2.0]


def test_a_kill_between_the_renames_keeps_the_predecessor(tmp_path):
    """commit renames X to X.old, then X.partial to X: killed in between, X.old comes back at the next start."""
    root = tmp_path / "checkpoints"
    d = _write(root, "final", 5)
    tmp = training.start_partial(d)
    (tmp / "a.bin").write_bytes(b"new")
    d.rename(d.with_name("final.old"))  # the kill lands here
    training.remove_partial(root)
    assert [(s, p.name) for s, p in training.complete(root)] == [(5, "final")] and not tmp.exists()


def test_a_fresh_start_over_an_earlier_run_needs_overwrite(tmp_path):
    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.trainer.bootstrap import check_fresh_start, finished
    from hybridflow_mg.trainer.config import TrainConfig

    def cfg(*overrides):
        return load_config(TrainConfig, "configs/quickstart.yaml", [f"run.output_dir={tmp_path}", *overrides])

    run = tmp_path / "quickstart"
    _write(run / "checkpoints", "final", 120)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert finished(cfg()).startswith(f"run {run} already finished at step 120")
    assert finished(cfg("trainer.total_steps=200")) is None  # more steps asked for: it resumes
    with pytest.raises(ValueError, match="holds the checkpoints of an earlier run .* set run.overwrite=true"):
        check_fresh_start(cfg("trainer.resume=never"))
    check_fresh_start(cfg("trainer.resume=auto"))  # nothing to refuse
    check_fresh_start(cfg("trainer.resume=never", "run.overwrite=true"), clear=True)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path):
    """`check_finite` (collective; here a world of one) refuses before anything is written."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from hybridflow_mg.trainer.checkpoint import check_finite

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(2, 2)
        run = SimpleNamespace(grid=SimpleNamespace(rank=0, device=torch.device("cpu")), critic=None,
                              actor=SimpleNamespace(modules=[layer]))
        check_finite(run, tmp_path / "step_1")  # finite: passes
        with torch.no_grad():
            layer.bias[1] = float("nan")
        with pytest.raises(RuntimeError, match=r"not saving .*step_1: a weight is not finite \(actor bias on rank 0\)"):
            check_finite(run, tmp_path / "step_1")
        assert not (tmp_path / "step_1").exists() and not training.partial_dir(tmp_path / "step_1").exists()
    finally:
        if own:
            dist.destroy_process_group()


def test_the_actor_checkpoint_carries_the_tokenizer_the_run_used(tmp_path, monkeypatch):
    """checkpoint/tokenizer/ (what `export` writes next to the weights) holds data.tokenizer's files, not
    those model.path happens to hold; generation_config.json, a model file, still comes from model.path."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from hybridflow_mg.models.hf_spec import spec_from_hf
    from hybridflow_mg.trainer import checkpoint
    from tests.tiny import llama_config

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(llama_config()))
    for name, text in (("tokenizer.json", "model's"), ("vocab.json", "model's"), ("generation_config.json", "{}")):
        (model / name).write_text(text)
    hf_tok = tmp_path / "hf_tok"
    hf_tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_tok / name).write_text("the run's")
    sp_tok = tmp_path / "sp.model"
    sp_tok.write_bytes(b"the run's sentencepiece")
    # the weights are not the point: a rank that writes no shard (data-parallel index 1), one tensor for the meta
    monkeypatch.setattr(checkpoint, "model_params", lambda *a, **k: [(None, None, None, torch.zeros(1))])
    grid = SimpleNamespace(layout=SimpleNamespace(tp=1, pp=1, vpp=1), train=SimpleNamespace(tp=0, pp=0, dp=1))
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for tokenizer, expected in ((hf_tok, {"tokenizer.json": b"the run's", "tokenizer_config.json": b"the run's"}),
                                    (sp_tok, {"tokenizer.model": b"the run's sentencepiece"})):
            out = tmp_path / f"ckpt_{tokenizer.stem}"
            out.mkdir()
            run = SimpleNamespace(grid=grid, naming=None, tokenizer=SimpleNamespace(path=tokenizer))
            checkpoint.save_weights(run, SimpleNamespace(modules=[]), spec_from_hf(llama_config()), out, role="actor",
                                    source=str(model))
            held = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
            assert held == {**expected, "generation_config.json": b"{}"}, held
    finally:
        if own:
            dist.destroy_process_group()
