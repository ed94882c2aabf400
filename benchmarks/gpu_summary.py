"""The summary of one `benchmarks/gpu_check.sh` run: a compact table (printed last) and gpu_check_summary.json.

    python benchmarks/gpu_summary.py --out-dir DIR --attempts TSV [--work DIR] [--started EPOCH_S]
                                     [--budget S] [--have-gpu 0|1]

Reads the attempts file the shell script wrote (check, megatron-core version or "-", exit status, seconds),
each check's final JSON in --out-dir and the JSONs of attempts that were retried (in --work). Exit status:
0 every check passed, 1 something failed or timed out, 2 no GPU (every check skipped).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CHECKS = ("model_gpu", "kernels_gpu", "train_gpu", "offload_gpu", "resume_gpu")
FIGURES = {
    "model_gpu": ("params", "batch", "seq", "seconds_per_step", "tokens_per_second", "model_tflops",
                  "datasheet_bf16_tflops", "mfu_vs_datasheet", "gemm_peak_tflops", "mfu_vs_measured_gemm",
                  "gemm_square_tflops", "peak_memory_gib", "loss_finite", "sdpa_vs_local_rel_l2",
                  "sdpa_backends_usable"),
    "train_gpu": ("params", "distributed_optimizer", "sequences", "real_tokens_per_step", "padding_share",
                  "seconds_per_step", "optimizer_steps_per_second", "tokens_per_second", "model_tflops",
                  "mfu_vs_datasheet", "gemm_peak_tflops", "mfu_vs_measured_gemm", "peak_memory_gib",
                  "grad_norm_finite", "updates_skipped", "loss_decreased"),
    "offload_gpu": ("params", "bytes_moved", "memory_drop_bytes", "memory_drop_matches_moved",
                    "optimizer_params_left_on_gpu_bytes", "offload_seconds", "reload_seconds", "offload_gb_per_s",
                    "reload_gb_per_s", "state_restored_bitwise", "control_step1_bit_identical", "step2_bit_identical"),
    "kernels_gpu": ("kernel_vs_d2d_min", "kernel_vs_d2d_whole_model_bf16"),
    "resume_gpu": ("optimizer", "checkpoint_bytes", "save_seconds", "load_seconds", "metrics_identical",
                   "state_identical"),
}
SKIPPED = {
    "vllm_sleep_wake": "vLLM is not installed on the device machine (no network there); needs vLLM's sleep mode",
    "vllm_gpu_memory_utilization": "vLLM is not installed on the device machine; needs a vLLM engine",
    "vllm_offload_during_rollout": "vLLM is not installed; the offloader itself is checked by offload_gpu",
}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _status(rc: int, record: dict | None) -> str:
    if rc in (124, 137):  # a JSON with a final status was written before the kill (in teardown)
        return record["status"] if record and record.get("status") in ("ok", "failed") else "timeout"
    if rc == 125:
        return "no budget"
    if record and record.get("status"):
        return record["status"]
    return {0: "ok", 2: "skipped", 3: "api_error"}.get(rc, "error")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def headline(name: str, r: dict) -> str:
    """One line of the key figures of a check's JSON."""
    if r.get("status") in ("error", "api_error"):
        return (r.get("error") or "")[:110]
    if r.get("status") == "skipped":
        return r.get("reason", "")
    g = r.get
    if name == "model_gpu":
        return (f"{_num(g('params'), '.3g')} params, {g('batch')}x{g('seq')}: "
                f"{_num(g('tokens_per_second'), '.4g')} tok/s, "
                f"{_num(g('model_tflops'), '.4g')} TFLOP/s, MFU {_pct(g('mfu_vs_datasheet'))} of datasheet / "
                f"{_pct(g('mfu_vs_measured_gemm'))} of GEMM {_num(g('gemm_peak_tflops'), '.4g')}, "
                f"peak {_num(g('peak_memory_gib'), '.3g')} GiB, sdpa~local {_num(g('sdpa_vs_local_rel_l2'), '.2g')}")
    if name == "train_gpu":
        return (f"{g('real_tokens_per_step')} tok/step (pad {_pct(g('padding_share'))}): "
                f"{_num(g('seconds_per_step'), '.3g')} s/step, {_num(g('tokens_per_second'), '.4g')} tok/s, "
                f"{_num(g('model_tflops'), '.4g')} TFLOP/s, "
                f"MFU {_pct(g('mfu_vs_datasheet'))}/{_pct(g('mfu_vs_measured_gemm'))}, "
                f"peak {_num(g('peak_memory_gib'), '.3g')} GiB, gnorm finite {g('grad_norm_finite')}, "
                f"distopt {g('distributed_optimizer')}")
    if name == "offload_gpu":
        left = (g("optimizer_params_left_on_gpu_bytes") or 0) / 1e9
        return (f"moved {_num((g('bytes_moved') or 0) / 1e9, '.3g')} GB "
                f"(drop matches {g('memory_drop_matches_moved')}), "
                f"off {_num(g('offload_seconds'), '.2g')} s / back {_num(g('reload_seconds'), '.2g')} s, restored "
                f"bitwise {g('state_restored_bitwise')}, step2 identical {g('step2_bit_identical')} (control "
                f"{g('control_step1_bit_identical')}), left on GPU {_num(left, '.3g')} GB")
    if name == "resume_gpu":
        return (f"{g('optimizer')}: {_num((g('checkpoint_bytes') or 0) / 1e9, '.3g')} GB saved in "
                f"{_num(g('save_seconds'), '.2g')} s, loaded in {_num(g('load_seconds'), '.2g')} s; step 2 replayed "
                f"identical: metrics {g('metrics_identical')}, state {g('state_identical')}")
    if name == "kernels_gpu":
        rows = r.get("results") or []
        build = r.get("build") or {}
        bitwise = sum(bool(x.get("bitwise_equal") and x.get("bitwise_equal_scalar")) for x in rows)
        return (f"build {_num(build.get('seconds'), '.3g')} s ({build.get('how', '?')}, {build.get('sass')}); "
                f"kernel/d2d whole bf16 {_num(g('kernel_vs_d2d_whole_model_bf16'), '.3g')}, min "
                f"{_num(g('kernel_vs_d2d_min'), '.3g')}; bitwise {bitwise}/{len(rows)}")
    return ""


def environment() -> dict:
    env = {"python": platform.python_version()}
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda,
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception as exc:  # noqa: BLE001
        env["torch"] = f"unavailable ({exc})"
    for key, cmd in (("nvcc", ["nvcc", "--version"]),
                     ("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            env[key] = out[-1] if out else None
        except (OSError, subprocess.SubprocessError):
            env[key] = None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--attempts", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the run started")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--have-gpu", type=int, default=1)
    args = parser.parse_args(argv)

    attempts: dict[str, list[dict]] = {}
    for line in args.attempts.read_text().splitlines() if args.attempts.exists() else []:
        name, ver, rc, secs = line.split("\t")
        attempts.setdefault(name, []).append({"megatron_core_wheel": None if ver == "-" else ver, "exit": int(rc),
                                              "seconds": int(secs)})
    checks, rows = {}, []
    for name in CHECKS:
        tries = attempts.get(name, [])
        final = _read(args.out_dir / f"{name}.json") or {}
        for i, t in enumerate(tries):
            last = i == len(tries) - 1
            record = final if last else (_read(args.work / f"{name}.{t['megatron_core_wheel']}.json")
                                         if args.work else None) or {}
            t["status"] = _status(t["exit"], record if record else None)
            t["megatron_core"] = (record.get("environment") or {}).get("megatron_core", t["megatron_core_wheel"])
            if record.get("error"):
                t["error"] = record["error"]
            if t["exit"] in (124, 137) and t["status"] != "timeout":
                t["note"] = "killed by its timeout after writing its JSON (teardown hung)"
            rows.append((name, t["megatron_core"] or "-", t["status"], t["exit"], t["seconds"],
                         headline(name, {**record, "status": t["status"]}) if record else
                         ("timed out, no JSON" if t["status"] == "timeout" else "no JSON written")))
        status = tries[-1]["status"] if tries else "not run"
        checks[name] = {"status": status, "attempts": tries, "json": f"{name}.json" if final else None,
                        "megatron_core": tries[-1].get("megatron_core") if tries else None,
                        "figures": {k: final.get(k) for k in FIGURES[name] if k in final}}
        if name == "kernels_gpu" and final:
            checks[name]["figures"].update(build=final.get("build"), scenarios=[
                {k: x.get(k) for k in ("scenario", "bytes_per_run", "gb_per_s", "kernel_vs_d2d", "bitwise_equal",
                                       "bitwise_equal_scalar", "covers_all_dst_elements")}
                for x in final.get("results", [])])
        if not tries:
            rows.append((name, "-", "not run", "-", "-", ""))
    for name, why in SKIPPED.items():
        rows.append((name, "-", "skipped", "-", "-", why))

    now = time.time()
    summary = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": round(now - args.started, 1) if args.started else None, "budget_seconds": args.budget,
        "environment": environment(), "checks": checks,
        "skipped": {k: {"status": "skipped", "reason": v} for k, v in SKIPPED.items()},
        "all_ok": all(c["status"] == "ok" for c in checks.values()),
    }
    for c in checks.values():  # megatron-core version per check, from the check's own JSON
        c["environment"] = (_read(args.out_dir / f"{c['json']}") or {}).get("environment") if c["json"] else None
    (args.out_dir / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    env = summary["environment"]
    print(f"GPU checks {summary['date']}  {env.get('device')}  torch {env.get('torch')}  CUDA {env.get('cuda')}  "
          f"python {env.get('python')}  wall {summary['wall_seconds']} s")
    print(f"{'check':<28} {'megatron':<9} {'status':<10} {'rc':>3} {'secs':>5}  figures")
    for name, ver, status, rc, secs, text in rows:
        print(f"{name:<28} {str(ver):<9} {status:<10} {str(rc):>3} {str(secs):>5}  {text}")
    print(f"all checks ok: {summary['all_ok']}   files: {', '.join(sorted(p.name for p in args.out_dir.iterdir()))}")
    if not args.have_gpu:
        return 2
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
