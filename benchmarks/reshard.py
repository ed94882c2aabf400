"""Reshard benchmark (issue 4): our resharder against the per-tensor baseline, same layout, same model, one run.

Every rank loads its Megatron training shards of a random Llama-shaped HF model (rank 0 writes it to
a shared temp dir; fp32, at least --model-mb MB), then both methods fill separate vLLM per-rank
destinations: `reshard.execute.Resharder` (micro-DP all-gather buckets, one collective per bucket)
and `reshard.baseline.PerTensorBaseline` (all-gather over TP + broadcast over PP, per tensor). Plans,
copy programs and row maps are built once, as in production; only the `run()` calls are timed, after
one warm-up each, alternating ours/baseline for --repeats rounds. A round's time is the slowest
rank's; CPU seconds (all ranks, all threads) and page faults are recorded too, because on a shared
machine they say more than wall time. Destinations of the two must be bitwise equal (and those of
ours with the other gather collective), bytes must equal their formulas (ours: the plan; baseline:
the whole model less what the rank holds). Prints a table, writes JSON.

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

from hybridflow_mg.commands._args import parse_sizes  # noqa: E402
from hybridflow_mg.commands.bench import add_reshard_arguments  # noqa: E402
from hybridflow_mg.parallel.layout import ParallelLayout  # noqa: E402
from hybridflow_mg.models.hf_spec import spec_from_hf  # noqa: E402
from hybridflow_mg.models.layouts import canonical_shape, hf_names, hf_shapes, rules_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MB = 10**6


# --- the model ------------------------------------------------------------------------------------
def llama_config(width: int) -> dict:
    """Llama proportions at hidden = 64·width: 8 layers, 8 heads = 8 KV heads, ffn 2.75·hidden, vocab
    16·hidden (a multiple of 128·8: no Megatron vocab padding for tp ≤ 8, so t and t_g up to 8 divide)."""
    hidden = 64 * width
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                intermediate_size=176 * width, num_attention_heads=8, num_key_value_heads=8,
                num_hidden_layers=8, vocab_size=16 * hidden, max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, torch_dtype="float32")


def model_bytes(dims, element_size: int = 4) -> int:
    per_rule = (torch.Size(canonical_shape(rule, dims)).numel() * (dims.num_layers if rule.per_layer else 1)
                for rule in rules_for(dims))
    return element_size * sum(per_rule)


def sized_config(model_mb: float) -> dict:
    """The narrowest config of `llama_config` whose fp32 weights are at least `model_mb` MB (10^6 bytes)."""
    width = 1
    while model_bytes(spec_from_hf(llama_config(width)).dims) < model_mb * MB:
        width += 1
    return llama_config(width)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1 or args.model_mb <= 0 or args.bucket_mb <= 0:
        raise ValueError("--repeats must be >= 1, --model-mb and --bucket-mb positive")
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed
    from hybridflow_mg.models.hf_io import HFSource
    from hybridflow_mg.reshard.baseline import PerTensorBaseline
    from hybridflow_mg.reshard.execute import Resharder
    from hybridflow_mg.reshard.plan import plan_reshard

    load_before = os.getloadavg()
    info, device = init_distributed(timeout_minutes=10)  # a rank that fails must not hang the others for long
    layout = layout_of(args, dist.get_world_size())
    grid = Grid.create(layout, device)
    rank = grid.rank
    root = _shared_dir()
    try:
        config = sized_config(args.model_mb)
        dims = spec_from_hf(config).dims
        if rank == 0:
            write_random_hf(config, root / "hf", args.seed)
        dist.barrier()

        # built once per run, like production: plan, copy programs, row maps, destinations
        plan = plan_reshard(dims, layout, rank, element_size=4, bucket_bytes=int(args.bucket_mb * MB))
        source = HFSource(root / "hf", dims)
        sources = [source.rows(t.rule, t.layer, t.index).to(device) for t in plan.train]
        blank = lambda: [torch.full(d.shape, float("nan"), device=device) for d in plan.dests]  # noqa: E731
        ours_dests, base_dests, other_dests = blank(), blank(), blank()
        ours = Resharder(plan, sources, ours_dests, micro_group=grid.micro_dp_group,
                         replica_group=grid.model_parallel_group, device=device)
        base = PerTensorBaseline(dims, layout, rank, {t.key: s for t, s in zip(plan.train, sources)},
                                 {d.key: x for d, x in zip(plan.dests, base_dests)},
                                 tp_group=grid.tp_group, pp_group=grid.pp_group)

        ours_stats, base_stats = ours.run(), base.run()  # warm-up
        timings = {"ours": [], "base": []}  # per repeat: (slowest rank's seconds, my CPU seconds, my faults)
        for _ in range(args.repeats):  # alternate, so load drift on a shared machine hits both alike
            ours_stats, *t = _timed(ours)
            timings["ours"].append(t)
            base_stats, *t = _timed(base)
            timings["base"].append(t)

        # ours once more with the other gather collective (untimed): both paths must write the same bits
        Resharder(plan, sources, other_dests, micro_group=grid.micro_dp_group, replica_group=grid.model_parallel_group,
                  device=device, gather_by_alltoall=not ours.gather_by_alltoall).run()
        equal = all(torch.equal(a, b) for a, b in zip(ours_dests, base_dests))
        other_equal = all(torch.equal(a, b) for a, b in zip(ours_dests, other_dests))
        del other_dests
        held = sum(t.numel for t in plan.train) * 4
        mine = dict(rank=rank, equal=equal, other_equal=other_equal, held=held, plan_recv=plan.recv_bytes,
                    plan_calls=plan.num_collectives, plan_peak=plan.peak_buffer_bytes, ours=vars(ours_stats),
                    base=vars(base_stats), timings=timings)
        everyone = [None] * layout.world
        dist.all_gather_object(everyone, mine)
        ours_setup = {"keep_workspace": ours.keep_workspace,
                      "gather_collective": "all_to_all_single" if ours.gather_by_alltoall else "all_gather_into_tensor"}
        report = _report(args, layout, config, dims, everyone, device, load_before, info.launcher, ours_setup)
        ok = report["checks"]["all_pass"]
        if rank == 0:
            out = Path(args.out) if args.out else RESULTS / _default_name(layout, device, report["date"][:10])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(_table(report))
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
    return _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _default_name(layout: ParallelLayout, device: torch.device, date: str) -> str:
    kind = "cpu" if device.type == "cpu" else "".join(c for c in _device_name(device).lower() if c.isalnum())
    vpp = f"v{layout.vpp}" if layout.vpp > 1 else ""
    return f"reshard_{kind}_w{layout.world}-t{layout.tp}p{layout.pp}{vpp}-tg{layout.gen_tp}_{date}.json"


def _side(ranks: list[dict], key: str) -> dict:
    seconds = [t[0] for t in ranks[0]["timings"][key]]  # the same on every rank (all-reduced)
    cpu = [sum(r["timings"][key][i][1] for r in ranks) for i in range(len(seconds))]
    return {
        "recv_bytes_per_rank": [r[key]["recv_bytes"] for r in ranks],
        "collectives_per_rank": [r[key]["collectives"] for r in ranks],
        "peak_extra_bytes_per_rank": [r[key]["peak_buffer_bytes"] for r in ranks],
        "seconds_per_repeat": seconds,
        "seconds": statistics.median(seconds),
        "cpu_seconds_all_ranks_per_repeat": cpu,
        "cpu_seconds_all_ranks": statistics.median(cpu),
        "minor_faults_per_rank_median": [statistics.median(t[2] for t in r["timings"][key]) for r in ranks],
    }


def _report(args, layout, config, dims, ranks, device, load_before, launcher, setup) -> dict:
    M = model_bytes(dims)
    formula = layout.formula_recv_fraction() if layout.formula_applies else None
    ours, base = _side(ranks, "ours"), _side(ranks, "base")
    checks = {
        "destinations_bit_equal": all(r["equal"] for r in ranks),
        "ours_other_gather_collective_bit_equal": all(r["other_equal"] for r in ranks),
        "ours_recv_equals_plan": all(r["ours"]["recv_bytes"] == r["plan_recv"] for r in ranks),
        "ours_calls_equal_plan": all(r["ours"]["collectives"] == r["plan_calls"] for r in ranks),
        "baseline_recv_equals_whole_model_minus_held": all(r["base"]["recv_bytes"] == M - r["held"] for r in ranks),
    }
    checks["all_pass"] = all(checks.values())
    speedup = base["seconds"] / ours["seconds"] if ours["seconds"] > 0 else None
    most = max(ours["recv_bytes_per_rank"])  # 0 when generation shards are training shards (d_g = 1, t_g = t)
    bytes_ratio = max(base["recv_bytes_per_rank"]) / most if most else None
    return {
        "benchmark": "reshard",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": _device_name(device), "cpu": _cpu_name(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "num_cpus": os.cpu_count(), "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                    "backend": dist.get_backend(), "launcher": launcher, "python": platform.python_version()},
        "world": layout.world,
        "layout": {"train": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vpp": layout.vpp},
                   "gen": {"tp": layout.gen_tp, "pp": layout.gen_pp}, "micro_dp": layout.micro_dp,
                   "describe": layout.describe()},
        "model": {"hf_config": config, "dtype": "float32", "bytes": M,
                  "num_tensors": sum(dims.num_layers if r.per_layer else 1 for r in rules_for(dims))},
        "settings": {"repeats": args.repeats, "warmup": 1, "bucket_bytes": int(args.bucket_mb * MB), "seed": args.seed,
                     "timed": "Resharder.run() / PerTensorBaseline.run() only; a repeat's time is the slowest rank's",
                     **setup},
        "ours": ours,
        "baseline": base,
        "predicted": {
            "plan_recv_bytes_per_rank": [r["plan_recv"] for r in ranks],
            "plan_collectives_per_rank": [r["plan_calls"] for r in ranks],
            "plan_peak_buffer_bytes_per_rank": [r["plan_peak"] for r in ranks],
            "formula": "(d_g-1)/(t*p)*M",
            "formula_fraction": str(formula) if formula is not None else None,
            "formula_bytes": float(formula * M) if formula is not None else None,
            "baseline_formula": "M - held (every rank ends with the whole model)",
            "baseline_formula_bytes_per_rank": [M - r["held"] for r in ranks],
        },
        "speedup": speedup,
        "bytes_ratio": bytes_ratio,
        "targets": {"speedup_at_least_3x": speedup is not None and speedup >= 3,
                    "bytes_at_least_2x_fewer": bytes_ratio is None or bytes_ratio >= 2},
        "checks": checks,
    }


def _table(r: dict) -> str:
    o, b, p = r["ours"], r["baseline"], r["predicted"]
    rows = [
        ("recv MB / rank (max)", max(o["recv_bytes_per_rank"]) / MB, max(b["recv_bytes_per_rank"]) / MB,
         r["bytes_ratio"]),
        ("collectives / rank (max)", max(o["collectives_per_rank"]), max(b["collectives_per_rank"]), None),
        ("peak extra MB / rank (max)", max(o["peak_extra_bytes_per_rank"]) / MB,
         max(b["peak_extra_bytes_per_rank"]) / MB, None),
        (f"seconds (median of {r['settings']['repeats']})", o["seconds"], b["seconds"], r["speedup"]),
        ("CPU s, all ranks (median)", o["cpu_seconds_all_ranks"], b["cpu_seconds_all_ranks"],
         b["cpu_seconds_all_ranks"] / max(o["cpu_seconds_all_ranks"], 1e-9)),
        ("page faults / rank (max)", max(o["minor_faults_per_rank_median"]), max(b["minor_faults_per_rank_median"]),
         None),
    ]
    fmt = lambda v: f"{v:>12.4f}" if isinstance(v, float) else f"{v:>12}"  # noqa: E731
    lines = [f"reshard benchmark: {r['layout']['describe']}",
             f"model {r['model']['bytes'] / MB:.1f} MB fp32 ({r['model']['num_tensors']} tensors); "
             f"{r['machine']['device']}, {r['machine']['backend']}, load {r['machine']['load_avg_1_5_15_before'][0]}",
             f"{'':<28}{'ours':>12}{'baseline':>12}{'baseline/ours':>15}",
             *(f"{name:<28}{fmt(x)}{fmt(y)}{(f'{z:.2f}x' if z is not None else ''):>15}" for name, x, y, z in rows)]
    if p["formula_bytes"] is not None:
        lines.append(f"plan predicts {max(p['plan_recv_bytes_per_rank']) / MB:.4f} MB/rank; "
                     f"(d_g-1)/(t*p)*M = {p['formula_fraction']}*M = {p['formula_bytes'] / MB:.4f} MB; "
                     f"baseline M - held = {max(p['baseline_formula_bytes_per_rank']) / MB:.4f} MB")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in r["checks"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
