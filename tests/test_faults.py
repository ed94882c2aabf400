"""What a long run meets (issue 10), on 2 CPU ranks through the real CLI and launcher: a rank that raises
or is SIGKILLed mid-step, preemption by SIGTERM, a NaN loss, and checkpoints that cannot be resumed.
Every launch runs under a timeout, so a hang fails the test instead of stalling it."""
import contextlib
import io
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests import trainrun
from tests.trainrun import rows

TWO = ("parallel.train.tp=1",)


@pytest.mark.parametrize("fault,line", [
    ("raise:step:1:1", "hybridflow-mg: error: rank 1: RuntimeError: injected fault (HYBRIDFLOW_FAULT) at 'step' in "
                       "step 1 (HYBRIDFLOW_DEBUG=1 shows the traceback)"),
    ("sigkill:step:1:1", "hybridflow-mg: error: rank 1 was killed by SIGKILL; the other ranks were stopped"),
])
def test_a_crashed_rank_ends_the_job_naming_it(tmp_path, fault, line):
    proc = trainrun.run(tmp_path, "crash", *TWO, "trainer.total_steps=3", nproc=2, fault=fault, timeout=240)
    assert proc.returncode == 1
    assert trainrun.error_lines(proc) == [line]


def _wait_rows(run_dir, n: int, proc, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= n):
        assert proc.poll() is None and time.monotonic() < end, "the run ended or stalled before step 2"
        time.sleep(0.2)


def test_sigterm_saves_exits_resumable_and_the_next_run_resumes(tmp_path):
    import psutil

    args = (*TWO, "trainer.total_steps=40")
    proc = trainrun.start(tmp_path, "preempt", *args, nproc=2)
    _wait_rows(tmp_path / "preempt", 2, proc)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)  # what SLURM's scancel / time limit sends the job step
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        trainrun.kill_all(proc)
        raise
    stdout = proc.stdout.read()
    assert proc.returncode == 75, stdout[-2000:] + proc.stderr.read()[-2000:]
    done = rows(tmp_path / "preempt")[-1]["step"]
    ckpt = tmp_path / "preempt" / "checkpoints" / f"step_{done}"
    assert (ckpt / "COMPLETE").is_file() and f"stopped by SIGTERM after step {done}: saved {ckpt}" in stdout
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left running 10 s after the job ended: {alive}"
    again = trainrun.run(tmp_path, "preempt", *TWO, f"trainer.total_steps={done + 1}", nproc=2)
    assert again.returncode == 0 and f"resumed from {ckpt} at step {done}" in again.stdout, again.stderr[-2000:]
    assert [r["step"] for r in rows(tmp_path / "preempt")] == list(range(1, done + 2))


def test_the_deadline_stops_a_run_resumable(tmp_path):
    """`trainer.save_before_deadline`: with an hour left and two asked for, the run saves after step 1."""
    proc = trainrun.run(tmp_path, "deadline", *TWO, "trainer.total_steps=40", "trainer.save_before_deadline=7200",
                        nproc=2, env={"HYBRIDFLOW_DEADLINE": str(time.time() + 3600)})
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "stopped by deadline after step 1" in proc.stdout
    assert (tmp_path / "deadline" / "checkpoints" / "step_1" / "COMPLETE").is_file()


def test_a_nan_loss_skips_the_update_and_the_run_goes_on(tmp_path):
    proc = trainrun.run(tmp_path, "nan", *TWO, "trainer.total_steps=3", "trainer.save_every=1", "trainer.keep_last=0",
                        "actor.warm_start.steps=30", nproc=2, fault="nan:loss:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = rows(tmp_path / "nan")
    assert [x["update_skipped"] for x in r] == [0.0, 1.0, 0.0] and [x["bad_steps"] for x in r] == [0, 1, 0]
    ckpts = tmp_path / "nan" / "checkpoints"
    shards = sorted(p.relative_to(ckpts / "step_2") for p in (ckpts / "step_2").glob("model/*.safetensors"))
    assert shards  # step 2 changed neither the weights nor the Adam state
    assert all((ckpts / "step_1" / f).read_bytes() == (ckpts / "step_2" / f).read_bytes() for f in shards)
    adam = [trainrun.optimizer_tensors(ckpts / f"step_{s}" / "optim" / "actor") for s in (1, 2, 3)]
    assert adam[0].keys() == adam[1].keys() and len(adam[0]) > 10
    assert all(torch.equal(adam[0][k], adam[1][k]) for k in adam[0])
    assert not all(torch.equal(adam[1][k], adam[2][k]) for k in adam[1])  # and step 3 trained again
    assert any((ckpts / "step_3" / f).read_bytes() != (ckpts / "step_2" / f).read_bytes() for f in shards)


def test_too_many_bad_steps_abort_with_one_line(tmp_path):
    proc = trainrun.run(tmp_path, "nan_abort", *TWO, "trainer.total_steps=3", "trainer.max_bad_steps=1", nproc=2,
                        fault="nan:loss:2")
    assert proc.returncode == 1
    (line,) = trainrun.error_lines(proc)
    assert "1 consecutive steps (to step 2) had a non-finite loss or gradient" in line and "max_bad_steps" in line


# --- checkpoints that cannot be resumed ------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A complete step_2 checkpoint of a 2-rank GRPO run."""
    out = tmp_path_factory.mktemp("bad")
    proc = trainrun.run(out, "source", *TWO, "trainer.total_steps=2", "trainer.save_every=2", "trainer.save_final=false",
                        nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "source" / "checkpoints" / "step_2"


def _cli_line(*overrides: str) -> tuple[int, list[str]]:
    """`train` in this process (what is checked before any launch): exit status and stderr lines."""
    from hybridflow_mg.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", str(trainrun.ROOT / "configs" / "quickstart.yaml"), "--nproc", "2", *TWO, *overrides])
    return code, err.getvalue().strip().splitlines()


def _damaged(checkpoint, tmp_path, damage) -> str:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return str(copy)


@pytest.mark.parametrize("damage,message", [
    (None, "trainer.resume = '{path}' does not exist; give a checkpoint directory"),
    (lambda d: (d / "COMPLETE").write_text("{not json"), "COMPLETE' is corrupt"),
    (lambda d: (d / "COMPLETE").unlink(), "is not a complete training checkpoint (no COMPLETE)"),
    (lambda d: (d / "model" / "mp_rank_00_000.safetensors").unlink(), "is missing model/mp_rank_00_000.safetensors"),
    (lambda d: (d / "optim" / "actor" / "__0_0.distcp").write_bytes(b"cut"), "(truncated?); resume from an earlier"),
])
def test_a_bad_checkpoint_is_one_line_before_launch(checkpoint, tmp_path, damage, message):
    path = str(tmp_path / "nowhere") if damage is None else _damaged(checkpoint, tmp_path, damage)
    code, lines = _cli_line(f"run.output_dir={tmp_path}", f"trainer.resume={path}")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:"), lines
    assert message.format(path=path) in lines[0]


@pytest.mark.parametrize("overrides,message", [
    (("model.synthetic.hidden_size=128", "model.synthetic.num_heads=2"), "was saved from a different model"),
    (("algo.advantage.estimator=gae",), "holds no critic weights, but this run trains a critic"),
])
def test_a_checkpoint_this_run_cannot_load_is_one_line(checkpoint, tmp_path, overrides, message):
    proc = trainrun.run(tmp_path, "mismatch", *TWO, "trainer.total_steps=3", f"trainer.resume={checkpoint}", *overrides,
                        nproc=2, timeout=240)
    assert proc.returncode == 2
    (line,) = trainrun.error_lines(proc)
    assert message in line and str(checkpoint) in line
