"""`hybridflow-mg bench reshard` end to end on 4 CPU ranks with a tiny model (one launch, no timing asserts):
valid JSON, the serial and overlapped resharders and the per-tensor baseline bit-identical, bytes and calls
equal to their formulas, at two depths and two bucket sizes."""
import json
import subprocess
import sys

import pytest

from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.hf_spec import spec_from_hf
from hybridflow_mg.reshard.baseline import model_units
from hybridflow_mg.reshard.plan import plan_reshard, training_tensors
from tests.multirank import ROOT, worker_env

LAYOUT = ParallelLayout(world=4, tp=2, pp=2, gen_tp=1)  # d_g = 4: every gather bucket has 4 members
ARGS = ("--nproc", "4", "--train", "tp=2,pp=2", "--gen", "tp=1", "--model-mb", "1", "--repeats", "1",
        "--bucket-mb", "0.5,0.1", "--layers", "4,8")  # small buckets: several gather and exchange buckets
BUCKETS, DEPTHS = (500_000, 100_000), (4, 8)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", *args], cwd=ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "reshard.json"
    proc = cli("bench", "reshard", *ARGS, "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_json_has_the_expected_keys(run):
    report, _ = run
    assert {"date", "machine", "world", "layout", "model", "settings", "ours", "baseline", "predicted", "speedup",
            "bytes_ratio", "targets", "checks"} <= set(report)
    assert {"cpu", "gpu", "num_cpus", "load_avg_1_5_15_before", "backend"} <= set(report["machine"])
    for side in ("ours", "baseline"):
        assert {"recv_bytes_per_rank", "collectives_per_rank", "peak_extra_bytes_per_rank", "seconds",
                "seconds_per_repeat", "cpu_seconds_all_ranks"} <= set(report[side])
        assert len(report[side]["recv_bytes_per_rank"]) == 4 and len(report[side]["seconds_per_repeat"]) == 1
        assert report[side]["seconds"] > 0
    assert report["world"] == 4 and report["layout"]["train"] == {"tp": 2, "pp": 2, "dp": 1, "vpp": 1}
    assert report["settings"]["gather_collective"] == "all_to_all_single"  # gloo
    assert {"formula", "formula_bytes", "plan_recv_bytes_per_rank"} <= set(report["predicted"])
    # the overlapped executor and the sweep: one run per (depth, bucket size), the first one also at the top
    assert {"overlapped", "speedup_overlapped", "speedup_overlapped_vs_serial", "runs"} <= set(report)
    assert report["settings"]["layers"] == list(DEPTHS) and report["settings"]["bucket_bytes_swept"] == list(BUCKETS)
    assert report["settings"]["default_executor"] == "serial"  # CPU
    assert [(run["layers"], run["bucket_bytes"]) for run in report["runs"]] == [(d, b) for d in DEPTHS for b in BUCKETS]
    first = report["runs"][0]
    assert report["ours"] == first["serial"] and report["overlapped"] == first["overlapped"]
    assert report["baseline"] == first["baseline"] and report["speedup"] == first["speedup_serial_vs_baseline"]
    for run in report["runs"]:
        assert {"model", "baseline", "serial", "overlapped", "speedup_serial_vs_baseline",
                "speedup_overlapped_vs_baseline", "speedup_overlapped_vs_serial", "predicted", "checks"} <= set(run)
        assert run["model"]["hf_config"]["num_hidden_layers"] == run["layers"]
        assert len(run["overlapped"]["overlapped_per_rank"]) == 4 and run["overlapped"]["seconds"] > 0


def test_destinations_bit_identical_and_all_checks_pass(run):
    report, stdout = run
    assert report["checks"]["destinations_bit_equal"] is True
    assert report["checks"]["ours_other_gather_collective_bit_equal"] is True  # all_gather_into_tensor path too
    assert report["checks"]["all_pass"] is True
    assert report["checks"]["overlapped_bit_equal"] is True
    assert all(run["checks"]["overlapped_bit_equal"] and run["checks"]["destinations_bit_equal"]
               for run in report["runs"])
    assert "baseline/serial" in stdout and "sweep" in stdout and "wrote " in stdout


def test_bytes_and_calls_equal_their_formulas(run):
    report, _ = run
    dims = spec_from_hf(report["model"]["hf_config"]).dims
    M = report["model"]["bytes"]
    # M: every TP shard of the replica once, replicated tensors once (no Megatron vocab padding at these dims)
    assert M == 4 * sum(t.numel for r in range(LAYOUT.tp * LAYOUT.pp) for t in training_tensors(dims, LAYOUT, r)
                        if t.rule.dim is not None or LAYOUT.train_coord(r).tp == 0)
    assert report["model"]["num_tensors"] == len(model_units(dims))
    for rank in range(4):
        plan = plan_reshard(dims, LAYOUT, rank, element_size=4, bucket_bytes=500_000)
        held = 4 * sum(t.numel for t in plan.train)
        # ours: exactly the plan
        assert report["ours"]["recv_bytes_per_rank"][rank] == plan.recv_bytes
        assert report["ours"]["collectives_per_rank"][rank] == plan.num_collectives
        # baseline: every rank ends with the whole model; one all-gather per own TP-split tensor, one
        # broadcast per tensor
        assert report["baseline"]["recv_bytes_per_rank"][rank] == M - held
        split_own = sum(t.rule.dim is not None for t in plan.train)
        assert report["baseline"]["collectives_per_rank"][rank] == split_own + report["model"]["num_tensors"]
    assert report["predicted"]["formula_fraction"] == "3/4"  # (d_g − 1)/(t·p) with d_g = 4


def test_every_run_counts_the_plan_and_the_overlapped_workspace_is_two_slots(run):
    report, _ = run
    for entry in report["runs"]:
        dims = spec_from_hf(entry["model"]["hf_config"]).dims
        serial, over = entry["serial"], entry["overlapped"]
        for rank in range(4):
            plan = plan_reshard(dims, LAYOUT, rank, element_size=4, bucket_bytes=entry["bucket_bytes"])
            for side in (serial, over):  # overlap changes when, not what
                assert side["recv_bytes_per_rank"][rank] == plan.recv_bytes
                assert side["collectives_per_rank"][rank] == plan.num_collectives
            # one slot ≥ the plan's largest bucket (gloo: + the gather's send copies); two when overlapped
            slot = serial["peak_extra_bytes_per_rank"][rank]
            assert slot >= plan.peak_buffer_bytes
            if over["overlapped_per_rank"][rank]:
                assert over["peak_extra_bytes_per_rank"][rank] == -(-slot // 256) * 256 + slot
            else:
                assert plan.num_collectives == 1 and over["peak_extra_bytes_per_rank"][rank] == slot
        assert entry["checks"]["overlapped_recv_equals_plan"] and entry["checks"]["overlapped_calls_equal_plan"]
    assert any(all(e["overlapped"]["overlapped_per_rank"]) for e in report["runs"])  # small buckets: many steps


@pytest.mark.parametrize("args,message", [
    (("--nproc", "4", "--train", "tp=3,pp=1", "--gen", "tp=1"), "does not divide the world of 4"),
    (("--nproc", "6", "--train", "tp=3,pp=1", "--gen", "tp=1"), "must divide 8"),
    (("--train", "tp=2,pp=2", "--gen", "tp=1"), "give --nproc N"),
    (("--nproc", "4", "--train", "tp=2,pp=2", "--gen", "tp=1", "--repeats", "0"), "--repeats must be at least 1"),
    (("--nproc", "4", "--train", "tp=2,pp=2", "--gen", "tp=1", "--layers", "8,3"),
     "--train pp·vpp=2 must divide every depth of --layers, not 3"),
    (("--nproc", "4", "--train", "tp=2,pp=2", "--gen", "tp=1", "--bucket-mb", "4,0"),
     "--bucket-mb must be a comma list of positive numbers"),
])
def test_bad_input_exits_2_with_one_line_before_launching(args, message):
    proc = cli("bench", "reshard", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error: ") and message in lines[0], proc.stderr


def test_baseline_on_one_rank_merges_qkv_interleave_and_drops_vocab_padding():
    """tp = pp = 1 needs no collective, yet Megatron's qkv is interleaved per KV group and its vocab padded
    (250 → 256 rows): the baseline must still merge by the row maps into vLLM's layout, bit for bit."""
    import torch

    from hybridflow_mg.models.layouts import canonical_shape
    from hybridflow_mg.models.rowmaps import shard_index, take_shard
    from hybridflow_mg.reshard.baseline import PerTensorBaseline
    from tests.tiny import llama_config

    dims = spec_from_hf(llama_config()).dims  # GQA 4 heads / 2 KV heads, vocab 250
    layout = ParallelLayout(world=1, tp=1, pp=1, gen_tp=1)
    gen = torch.Generator().manual_seed(0)
    canonical, sources, dests = {}, {}, {}
    for rule, layer in model_units(dims):
        key = (rule.key, layer)
        canonical[key] = torch.randn(canonical_shape(rule, dims), generator=gen)
        sources[key] = take_shard(canonical[key], shard_index(rule, "mcore", dims, 1, 0), rule.index_dim)
        vllm = shard_index(rule, "vllm", dims, 1, 0)
        dests[key] = torch.full_like(take_shard(canonical[key], vllm, rule.index_dim), float("nan"))
    assert sources[("embedding", None)].shape[0] == 256 and dests[("embedding", None)].shape[0] == 256
    stats = PerTensorBaseline(dims, layout, 0, sources, dests, tp_group=None, pp_group=None).run()
    assert stats.recv_bytes == 0 and stats.collectives == 0 and stats.peak_buffer_bytes > 0
    for rule, layer in model_units(dims):
        key = (rule.key, layer)
        want = take_shard(canonical[key], shard_index(rule, "vllm", dims, 1, 0), rule.index_dim)
        assert torch.equal(dests[key], want), key
