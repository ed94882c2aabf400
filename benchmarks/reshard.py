"""Reshard benchmark (issues 4, 12, 15): the per-tensor baseline, our serial and our overlapped executor, one run.

Every rank loads its Megatron training shards of a random Llama-shaped HF model (rank 0 writes it to
a shared temp dir; fp32; the first depth of --layers at least --model-mb MB, deeper ones at its width),
then every method fills its own vLLM per-rank destinations: `reshard.baseline.PerTensorBaseline`
(all-gather over TP + broadcast over PP, per tensor) and `reshard.execute.Resharder` (micro-DP
all-gather buckets, one collective per bucket) for every bucket size of --bucket-mb, once serial
(one workspace slot: pack, collective, scatter) and once overlapped (two slots, async collectives:
pack k + 1 and scatter k − 1 while k's collective is in flight). Plans, copy programs and row maps are
built once, as in production; only the `run()` calls are timed, after one warm-up each, every method
once per round for --repeats rounds (the order rotated each round, so load drift on a shared machine
hits all alike). A round's time is the slowest rank's; CPU seconds (all ranks, all threads) and page
faults are recorded too, because on a shared machine they say more than wall time. All destinations
must be bitwise equal to the baseline's (and the serial executor's with the other gather collective),
bytes must equal their formulas (ours: the plan; baseline: the whole model less what the rank holds).
Prints a table of the first depth and bucket size, then the sweep (speed against peak extra memory);
writes JSON. Its top-level `ours` is the serial executor at the first depth and bucket size,
`overlapped` the overlapped one, `runs` every (depth, bucket size).

Page faults. On the CPU test VM a freshly faulted page costs several microseconds, so temporaries
that glibc hands back to the OS and that are touched again every reshard can cost more than the
copies themselves. Ours keeps its bucket workspace on CPU (`Resharder.keep_workspace`); the baseline
allocates its per-tensor temporaries as peers do. Faults per rank are recorded for both.

    torchrun --standalone --nproc-per-node 8 benchmarks/reshard.py --train tp=2,pp=2 --gen tp=2
    hybridflow-mg bench reshard --nproc 8 --train tp=2,pp=2 --gen tp=2      # the same, launched for you

Exit status 1 when destinations differ or a byte count misses its formula.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hybridflow_mg.bench.measure import cpu_name  # noqa: E402
from hybridflow_mg.commands._args import parse_sizes  # noqa: E402
from hybridflow_mg.commands.bench import add_reshard_arguments, number_list  # noqa: E402
from hybridflow_mg.parallel.layout import ParallelLayout  # noqa: E402
from hybridflow_mg.models.hf_spec import spec_from_hf  # noqa: E402
from hybridflow_mg.models.layouts import canonical_shape, hf_names, hf_shapes, rules_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MB = 10**6


# --- the model ------------------------------------------------------------------------------------
def llama_config(width: int, layers: int = 8) -> dict:
    """Llama proportions at hidden = 64·width: 8 heads = 8 KV heads, ffn 2.75·hidden, vocab 16·hidden (a
    multiple of 128·8: no Megatron vocab padding for tp ≤ 8, so t and t_g up to 8 divide)."""
    hidden = 64 * width
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                intermediate_size=176 * width, num_attention_heads=8, num_key_value_heads=8,
                num_hidden_layers=layers, vocab_size=16 * hidden, max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, torch_dtype="float32")


def model_bytes(dims, element_size: int = 4) -> int:
    per_rule = (torch.Size(canonical_shape(rule, dims)).numel() * (dims.num_layers if rule.per_layer else 1)
                for rule in rules_for(dims))
    return element_size * sum(per_rule)


def sized_width(model_mb: float, layers: int = 8) -> int:
    """The narrowest width of `llama_config` whose fp32 weights at `layers` layers are at least `model_mb` MB."""
    width = 1
    while model_bytes(spec_from_hf(llama_config(width, layers)).dims) < model_mb * MB:
        width += 1
    return width


def write_random_hf(config: dict, out_dir: Path, seed: int) -> None:
    """config.json + model.safetensors of random N(0, 0.02) fp32 weights (no transformers needed)."""
    from safetensors.torch import save_file

    dims = spec_from_hf(config).dims
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for rule in rules_for(dims):
        for layer in range(dims.num_layers) if rule.per_layer else [None]:
            for name, shape in zip(hf_names(rule, layer), hf_shapes(rule, dims)):
                tensors[name] = torch.randn(shape, generator=gen) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))


# --- arguments ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reshard_arguments(p)  # the same options as `hybridflow-mg bench reshard`, less --nproc
    return p.parse_args(argv)


def layout_of(args, world: int) -> ParallelLayout:
    t = parse_sizes(args.train, ("tp", "pp", "vpp"), "--train")
    g = parse_sizes(args.gen, ("tp",), "--gen")
    return ParallelLayout.create(world=world, tp=t.get("tp", 1), pp=t.get("pp", 1), vpp=t.get("vpp", 1),
                                 gen_tp=g.get("tp"))


# --- the run ----------------------------------------------------------------------------------------
def _shared_dir() -> Path:
    path = [tempfile.mkdtemp(prefix="hfmg_bench_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def _usage() -> tuple[float, int]:
    """(CPU seconds, minor page faults) of this process so far: user + system, all threads (gloo's too)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def _timed(method) -> tuple:
    """Run `method.run()` once after a barrier: (stats, wall seconds of the slowest rank, this rank's CPU
    seconds, this rank's minor page faults)."""
    dist.barrier()
    cpu, faults = _usage()
    stats = method.run()
    cpu2, faults2 = _usage()
    slowest = torch.tensor([stats.seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return stats, float(slowest), cpu2 - cpu, faults2 - faults


def _measure_depth(args, layout, grid, device, hf_dir: Path, dims, buckets: list[int]) -> dict:
    """This rank's record of one model depth: the baseline, then per bucket size serial and overlapped."""
    from hybridflow_mg.models.hf_io import HFSource
    from hybridflow_mg.reshard.baseline import PerTensorBaseline
    from hybridflow_mg.reshard.execute import Resharder
    from hybridflow_mg.reshard.plan import plan_reshard

    # built once per run, like production: plans, copy programs, row maps, destinations
    rank = grid.rank
    plans = [plan_reshard(dims, layout, rank, element_size=4, bucket_bytes=b) for b in buckets]
    source = HFSource(hf_dir, dims)
    sources = [source.rows(t.rule, t.layer, t.index).to(device) for t in plans[0].train]
    blank = lambda: [torch.full(d.shape, float("nan"), device=device) for d in plans[0].dests]  # noqa: E731
    groups = dict(micro_group=grid.micro_dp_group, replica_group=grid.model_parallel_group, device=device)
    base_dests = blank()
    methods = {"baseline": PerTensorBaseline(dims, layout, rank, {t.key: s for t, s in zip(plans[0].train, sources)},
                                             {d.key: x for d, x in zip(plans[0].dests, base_dests)},
                                             tp_group=grid.tp_group, pp_group=grid.pp_group)}
    dests = {}
    for b, plan in zip(buckets, plans):
        for mode in ("serial", "overlapped"):
            dests[mode, b] = blank()
            methods[mode, b] = Resharder(plan, sources, dests[mode, b], overlap=mode == "overlapped", **groups)

    names = list(methods)
    stats = {name: methods[name].run() for name in names}  # warm-up
    timings = {name: [] for name in names}  # per repeat: (slowest rank's seconds, my CPU seconds, my faults)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            stats[name], *t = _timed(methods[name])
            timings[name].append(t)

    runs = []
    for b, plan in zip(buckets, plans):
        serial = methods["serial", b]
        # serial once more with the other gather collective (untimed): both paths must write the same bits
        other = blank()
        Resharder(plan, sources, other, gather_by_alltoall=not serial.gather_by_alltoall, **groups).run()
        equal = lambda xs: all(torch.equal(a, c) for a, c in zip(xs, base_dests))  # noqa: E731
        runs.append(dict(bucket_bytes=b, plan_recv=plan.recv_bytes, plan_calls=plan.num_collectives,
                         plan_peak=plan.peak_buffer_bytes, serial_equal=equal(dests["serial", b]),
                         overlapped_equal=equal(dests["overlapped", b]),
                         other_equal=all(torch.equal(a, c) for a, c in zip(dests["serial", b], other)),
                         serial=vars(stats["serial", b]), overlapped=vars(stats["overlapped", b]),
                         timings={"serial": timings["serial", b], "overlapped": timings["overlapped", b]},
                         keep_workspace=serial.keep_workspace, gather_by_alltoall=serial.gather_by_alltoall))
        del other
    return dict(rank=rank, held=sum(t.numel for t in plans[0].train) * 4, base=vars(stats["baseline"]),
                base_timings=timings["baseline"], runs=runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    depths = number_list(args.layers, "--layers", int)
    buckets = [int(mb * MB) for mb in number_list(args.bucket_mb, "--bucket-mb")]
    if args.repeats < 1 or args.model_mb <= 0:
        raise ValueError("--repeats must be >= 1, --model-mb positive")
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed

    load_before = os.getloadavg()
    info, device = init_distributed(timeout_minutes=10)  # a rank that fails must not hang the others for long
    layout = layout_of(args, dist.get_world_size())
    grid = Grid.create(layout, device)
    rank = grid.rank
    root = _shared_dir()
    try:
        width = sized_width(args.model_mb, depths[0])
        depth_reports = []
        for layers in depths:
            config = llama_config(width, layers)
            dims = spec_from_hf(config).dims
            hf_dir = root / f"hf_{layers}"
            if rank == 0:
                write_random_hf(config, hf_dir, args.seed)
            dist.barrier()
            mine = _measure_depth(args, layout, grid, device, hf_dir, dims, buckets)
            everyone = [None] * layout.world
            dist.all_gather_object(everyone, mine)
            depth_reports.append((config, dims, everyone))
            if rank == 0:
                shutil.rmtree(hf_dir, ignore_errors=True)
        default = "overlapped" if device.type == "cuda" else "serial"  # Resharder(overlap=None)
        report = _report(args, layout, depth_reports, device, load_before, info.launcher, default)
        ok = report["checks"]["all_pass"]
        if rank == 0:
            out = Path(args.out) if args.out else RESULTS / _default_name(layout, device, report["date"][:10])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(_table(report))
            print(_sweep_table(report))
            print(f"wrote {out}")
        return 0 if ok else 1
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        grid.destroy()
        dist.destroy_process_group()


# --- reporting ---------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _default_name(layout: ParallelLayout, device: torch.device, date: str) -> str:
    kind = "cpu" if device.type == "cpu" else "".join(c for c in _device_name(device).lower() if c.isalnum())
    vpp = f"v{layout.vpp}" if layout.vpp > 1 else ""
    return f"reshard_{kind}_w{layout.world}-t{layout.tp}p{layout.pp}{vpp}-tg{layout.gen_tp}_{date}.json"


def _side(records: list[dict], timings: list[list]) -> dict:
    """One method across ranks: `records[r]` its stats on rank r, `timings[r]` its (seconds, CPU seconds,
    faults) per repeat."""
    seconds = [t[0] for t in timings[0]]  # the same on every rank (all-reduced)
    cpu = [sum(per_rank[i][1] for per_rank in timings) for i in range(len(seconds))]
    return {
        "recv_bytes_per_rank": [r["recv_bytes"] for r in records],
        "collectives_per_rank": [r["collectives"] for r in records],
        "peak_extra_bytes_per_rank": [r["peak_buffer_bytes"] for r in records],
        "seconds_per_repeat": seconds,
        "seconds": statistics.median(seconds),
        "cpu_seconds_all_ranks_per_repeat": cpu,
        "cpu_seconds_all_ranks": statistics.median(cpu),
        "minor_faults_per_rank_median": [statistics.median(t[2] for t in per_rank) for per_rank in timings],
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _run_report(layout, config, dims, ranks: list[dict], i: int) -> dict:
    """Bucket size `i` of one depth: the baseline, serial and overlapped sides, predictions and checks."""
    M = model_bytes(dims)
    runs = [r["runs"][i] for r in ranks]
    base = _side([r["base"] for r in ranks], [r["base_timings"] for r in ranks])
    serial = _side([x["serial"] for x in runs], [x["timings"]["serial"] for x in runs])
    overlapped = _side([x["overlapped"] for x in runs], [x["timings"]["overlapped"] for x in runs])
    overlapped["overlapped_per_rank"] = [x["overlapped"]["overlapped"] for x in runs]  # False: one bucket, serial
    formula = layout.formula_recv_fraction() if layout.formula_applies else None
    checks = {
        "destinations_bit_equal": all(x["serial_equal"] for x in runs),
        "ours_other_gather_collective_bit_equal": all(x["other_equal"] for x in runs),
        "ours_recv_equals_plan": all(x["serial"]["recv_bytes"] == x["plan_recv"] for x in runs),
        "ours_calls_equal_plan": all(x["serial"]["collectives"] == x["plan_calls"] for x in runs),
        "overlapped_bit_equal": all(x["overlapped_equal"] for x in runs),
        "overlapped_recv_equals_plan": all(x["overlapped"]["recv_bytes"] == x["plan_recv"] for x in runs),
        "overlapped_calls_equal_plan": all(x["overlapped"]["collectives"] == x["plan_calls"] for x in runs),
        "baseline_recv_equals_whole_model_minus_held": all(r["base"]["recv_bytes"] == M - r["held"] for r in ranks),
    }
    most = max(serial["recv_bytes_per_rank"])  # 0 when generation shards are training shards (d_g = 1, t_g = t)
    return {
        "layers": dims.num_layers,
        "bucket_bytes": runs[0]["bucket_bytes"],
        "model": {"hf_config": config, "dtype": "float32", "bytes": M,
                  "num_tensors": sum(dims.num_layers if r.per_layer else 1 for r in rules_for(dims))},
        "baseline": base,
        "serial": serial,
        "overlapped": overlapped,
        "speedup_serial_vs_baseline": _ratio(base["seconds"], serial["seconds"]),
        "speedup_overlapped_vs_baseline": _ratio(base["seconds"], overlapped["seconds"]),
        "speedup_overlapped_vs_serial": _ratio(serial["seconds"], overlapped["seconds"]),
        "bytes_ratio": max(base["recv_bytes_per_rank"]) / most if most else None,
        "predicted": {
            "plan_recv_bytes_per_rank": [x["plan_recv"] for x in runs],
            "plan_collectives_per_rank": [x["plan_calls"] for x in runs],
            "plan_peak_buffer_bytes_per_rank": [x["plan_peak"] for x in runs],
            "formula": "(d_g-1)/(t*p)*M",
            "formula_fraction": str(formula) if formula is not None else None,
            "formula_bytes": float(formula * M) if formula is not None else None,
            "baseline_formula": "M - held (every rank ends with the whole model)",
            "baseline_formula_bytes_per_rank": [M - r["held"] for r in ranks],
        },
        "checks": checks,
    }


def _report(args, layout, depths, device, load_before, launcher, default_executor: str) -> dict:
    """The JSON: every (depth, bucket size) under `runs`; the first one also at the top level, under the
    keys of the serial-only benchmark (`ours` = the serial executor) plus `overlapped`."""
    runs = [_run_report(layout, config, dims, ranks, i)
            for config, dims, ranks in depths for i in range(len(ranks[0]["runs"]))]
    first, ranks = runs[0], depths[0][2]
    checks = {key: all(run["checks"][key] for run in runs) for key in first["checks"]}
    checks["all_pass"] = all(checks.values())
    speedup = first["speedup_serial_vs_baseline"]
    return {
        "benchmark": "reshard",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": _device_name(device), "cpu": cpu_name(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "num_cpus": os.cpu_count(), "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                    "backend": dist.get_backend(), "launcher": launcher, "python": platform.python_version()},
        "world": layout.world,
        "layout": {"train": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vpp": layout.vpp},
                   "gen": {"tp": layout.gen_tp, "pp": layout.gen_pp}, "micro_dp": layout.micro_dp,
                   "describe": layout.describe()},
        "model": first["model"],
        "settings": {"repeats": args.repeats, "warmup": 1, "bucket_bytes": first["bucket_bytes"],
                     "bucket_bytes_swept": list(dict.fromkeys(run["bucket_bytes"] for run in runs)),
                     "layers": [dims.num_layers for _, dims, _ in depths], "seed": args.seed,
                     "timed": "Resharder.run() (serial, overlapped) / PerTensorBaseline.run() only; a repeat's "
                              "time is the slowest rank's; every method once per repeat, order rotated",
                     "keep_workspace": ranks[0]["runs"][0]["keep_workspace"],
                     "gather_collective": ("all_to_all_single" if ranks[0]["runs"][0]["gather_by_alltoall"]
                                           else "all_gather_into_tensor"),
                     "default_executor": default_executor},
        "ours": first["serial"],
        "overlapped": first["overlapped"],
        "baseline": first["baseline"],
        "predicted": first["predicted"],
        "speedup": speedup,
        "speedup_overlapped": first["speedup_overlapped_vs_baseline"],
        "speedup_overlapped_vs_serial": first["speedup_overlapped_vs_serial"],
        "bytes_ratio": first["bytes_ratio"],
        "targets": {"speedup_at_least_3x": speedup is not None and speedup >= 3,
                    "bytes_at_least_2x_fewer": first["bytes_ratio"] is None or first["bytes_ratio"] >= 2},
        "checks": checks,
        "runs": runs,
    }


def _table(r: dict) -> str:
    """The first depth and bucket size: every figure of the three methods."""
    o, v, b, p = r["ours"], r["overlapped"], r["baseline"], r["predicted"]
    per = lambda key, scale=None: [max(x[key]) / scale if scale else max(x[key]) for x in (o, v, b)]  # noqa: E731
    cpu = [x["cpu_seconds_all_ranks"] for x in (o, v, b)]
    rows = [
        ("recv MB / rank (max)", per("recv_bytes_per_rank", scale=MB), r["bytes_ratio"]),
        ("collectives / rank (max)", per("collectives_per_rank"), None),
        ("peak extra MB / rank (max)", per("peak_extra_bytes_per_rank", scale=MB), None),
        (f"seconds (median of {r['settings']['repeats']})", [x["seconds"] for x in (o, v, b)], r["speedup"]),
        ("CPU s, all ranks (median)", cpu, cpu[2] / max(cpu[0], 1e-9)),
        ("page faults / rank (max)", per("minor_faults_per_rank_median"), None),
    ]
    fmt = lambda x: f"{x:>12.4f}" if isinstance(x, float) else f"{x:>12}"  # noqa: E731
    lines = [f"reshard benchmark: {r['layout']['describe']}",
             f"model {r['model']['bytes'] / MB:.1f} MB fp32 ({r['model']['num_tensors']} tensors, "
             f"{r['model']['hf_config']['num_hidden_layers']} layers), "
             f"buckets {r['settings']['bucket_bytes'] / MB:g} MB; "
             f"{r['machine']['device']}, {r['machine']['backend']}, load {r['machine']['load_avg_1_5_15_before'][0]}",
             f"{'':<28}{'serial':>12}{'overlapped':>12}{'baseline':>12}{'baseline/serial':>17}",
             *(f"{name:<28}{''.join(fmt(x) for x in xs)}{(f'{z:.2f}x' if z is not None else ''):>17}"
               for name, xs, z in rows)]
    if p["formula_bytes"] is not None:
        lines.append(f"plan predicts {max(p['plan_recv_bytes_per_rank']) / MB:.4f} MB/rank; "
                     f"(d_g-1)/(t*p)*M = {p['formula_fraction']}*M = {p['formula_bytes'] / MB:.4f} MB; "
                     f"baseline M - held = {max(p['baseline_formula_bytes_per_rank']) / MB:.4f} MB")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in r["checks"].items()))
    return "\n".join(lines)


def _sweep_table(r: dict) -> str:
    """Every depth and bucket size: seconds and speed-ups against peak extra memory (max over ranks)."""
    x = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    lines = [f"sweep (seconds: median of {r['settings']['repeats']}, slowest rank; peak extra MB: max over ranks; "
             f"default executor here: {r['settings']['default_executor']})",
             f"{'layers':>6}{'model MB':>10}{'bucket MB':>10}{'calls':>6}{'baseline s':>11}{'serial s':>10}"
             f"{'overlap s':>10}{'base/ser':>9}{'base/ovl':>9}{'ser/ovl':>8}{'peak base':>10}{'peak ser':>9}"
             f"{'peak ovl':>9}"]
    for run in r["runs"]:
        b, s, o = run["baseline"], run["serial"], run["overlapped"]
        peak = [max(side["peak_extra_bytes_per_rank"]) / MB for side in (b, s, o)]
        lines.append(f"{run['layers']:>6}{run['model']['bytes'] / MB:>10.1f}{run['bucket_bytes'] / MB:>10g}"
                     f"{max(s['collectives_per_rank']):>6}{b['seconds']:>11.4f}{s['seconds']:>10.4f}"
                     f"{o['seconds']:>10.4f}"
                     f"{x(run['speedup_serial_vs_baseline']):>9}{x(run['speedup_overlapped_vs_baseline']):>9}"
                     f"{x(run['speedup_overlapped_vs_serial']):>8}{peak[0]:>10.2f}{peak[1]:>9.2f}{peak[2]:>9.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
