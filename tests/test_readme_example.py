"""The README's Python example, exactly as printed there, in one process (no launcher) and on 2 ranks
under torchrun: it trains, and its evaluator's metric lands in metrics.jsonl and in TensorBoard."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.multirank import ROOT, torchrun_command, worker_env


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15, "the README promises an example of at most 15 lines"
    return code


def _tensorboard_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_readme_example_trains_and_logs_its_evaluator(tmp_path, nproc):
    (tmp_path / "example.py").write_text(readme_example())
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the example names configs/quickstart.yaml
    cmd = [sys.executable, "example.py"] if nproc == 1 else torchrun_command(nproc, "example.py")
    env = worker_env()
    if nproc == 1:  # a plain process, as in a notebook: no launcher variables at all
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "python_example"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    evaluated = [r["step"] for r in rows if "small_sums" in r]
    assert evaluated == [1, 2, 4] and all(0.0 <= r["small_sums"] <= 1.0 for r in rows if "small_sums" in r)
    assert all("val_reward" in r for r in rows if r["step"] in evaluated)  # the built-in validation too
    assert {"small_sums", "val_reward", "reward_mean"} <= _tensorboard_tags(run)
    assert (run / "checkpoints" / "final" / "hybridflow.json").is_file()
    assert "mean reward per step" in proc.stdout
    assert os.path.isfile(run / "config.yaml")
