"""Runs that survive (issue 10), through the real CLI and launcher on CPU gloo ranks:

- kill -9 of every process during step 4 (after step 3's checkpoint, which ends an epoch), then the same
  command: steps 4–6, the final weights and the optimizer state are bit-identical to a straight run,
  with an adaptive KL coefficient that carries on;
- a TP2·DP2 checkpoint resumed at TP1·PP2·DP2: the next step's loss equals the straight run's;
- a kill during a save leaves the previous checkpoint, which resumes, and the partial one is removed.
"""
import shutil
import time

import pytest
import torch

from tests import trainrun
from tests.trainrun import comparable, rows

ADAPTIVE_KL = ["algo.kl.use_in_loss=true", "algo.kl.controller=adaptive", "algo.kl.horizon=50",
               "trainer.total_steps=6", "trainer.save_every=3", "trainer.keep_last=0"]


def _same_files(a, b, pattern: str) -> bool:
    files = sorted(p.relative_to(a) for p in a.glob(pattern))
    return bool(files) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    proc = trainrun.run(out, "straight", *ADAPTIVE_KL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def test_kill9_during_step_4_then_resume_is_bit_identical(straight):
    out, run_dir = straight, straight / "killed"
    proc = trainrun.start(out, "killed", *ADAPTIVE_KL)
    trainrun.wait_for(run_dir / "checkpoints" / "step_3" / "COMPLETE", proc)
    time.sleep(1.0)  # into step 4 (a row it may log is dropped on resume)
    trainrun.kill_all(proc)  # kill -9, every process
    assert not (run_dir / "checkpoints" / "step_6").exists() and not (run_dir / "checkpoints" / "final").exists()
    state = torch.load(run_dir / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=False)
    assert state["data"]["epoch"] == 0 and state["data"]["step_in_epoch"] == 3  # the epoch's last batch

    again = trainrun.run(out, "killed", *ADAPTIVE_KL)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_3'} at step 3" in again.stdout
    want, got = rows(out / "straight"), rows(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # no step lost, none twice
    assert [comparable(r) for r in got] == [comparable(r) for r in want]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2, 3, 4, 5, 6]  # purged after step 3, no repeats
    coefs = [r["kl_coef"] for r in got]
    assert len(set(coefs)) == 6, coefs  # the adaptive coefficient moved every step, across the resume too
    final, straight_final = run_dir / "checkpoints" / "final", out / "straight" / "checkpoints" / "final"
    assert _same_files(final, straight_final, "model/*.safetensors")
    # the warm-started reference (KL is in the loss) was saved and resumed, not rebuilt from model.path
    assert _same_files(final, run_dir / "checkpoints" / "step_3", "reference/model/*.safetensors")
    mine = trainrun.optimizer_tensors(final / "optim" / "actor")
    theirs = trainrun.optimizer_tensors(straight_final / "optim" / "actor")
    assert mine.keys() == theirs.keys() and len(mine) > 10
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    done = trainrun.run(out, "killed", *ADAPTIVE_KL)  # once more: nothing is left to do, and nothing is started
    assert done.returncode == 0 and done.stdout.startswith(f"run {run_dir} already finished at step 6 ({final})")


def test_resume_at_another_layout(straight):
    """TP2·DP2 → TP1·PP2·DP2: weights, Adam moments and the rest of the state are layout-portable."""
    ckpt = straight / "straight" / "checkpoints" / "step_3"
    # warm_start.steps=0: the reference still comes from the checkpoint (and goes into the next one)
    proc = trainrun.run(straight, "other_layout", *ADAPTIVE_KL, "parallel.train.tp=1", "parallel.train.pp=2",
                        "trainer.total_steps=4", f"trainer.resume={ckpt}", "actor.warm_start.steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step4 = rows(straight / "other_layout")[0]
    want = rows(straight / "straight")[3]
    assert step4["step"] == 4 and step4["reward_mean"] == want["reward_mean"]  # the same samples
    diff = abs(step4["loss"] - want["loss"])
    print(f"step 4 loss at TP1·PP2·DP2 {step4['loss']!r} vs TP2·DP2 {want['loss']!r}: |diff| = {diff:.3g}")
    assert diff <= 1e-6
    assert step4["kl_coef"] == want["kl_coef"]
    assert abs(step4["rollout_kl"] - want["rollout_kl"]) <= 1e-6  # the same (warm-started) reference
    assert (straight / "other_layout" / "checkpoints" / "final" / "reference" / "hybridflow.json").is_file()


def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    args = ("trainer.total_steps=4", "trainer.save_every=2", "parallel.train.tp=1")
    proc = trainrun.run(tmp_path, "save_kill", *args, nproc=2, fault="sigkill:save:4:0")
    assert proc.returncode == 1
    assert trainrun.error_lines(proc) == ["hybridflow-mg: error: rank 0 was killed by SIGKILL; the other ranks "
                                          "were stopped"]
    ckpts = tmp_path / "save_kill" / "checkpoints"
    assert (ckpts / "step_2" / "COMPLETE").is_file() and (ckpts / "step_4.partial").is_dir()
    assert not (ckpts / "step_4").exists()
    again = trainrun.run(tmp_path, "save_kill", *args, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_2'} at step 2" in again.stdout
    assert not (ckpts / "step_4.partial").exists() and (ckpts / "step_4" / "COMPLETE").is_file()
    assert [r["step"] for r in rows(tmp_path / "save_kill")] == [1, 2, 3, 4]
    shutil.rmtree(tmp_path / "save_kill")
