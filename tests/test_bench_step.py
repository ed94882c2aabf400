"""`hybridflow-mg bench step` on 2 CPU ranks, tiny: the JSON's keys and that its numbers agree with each other
(stage seconds sum to the step's within 5%, every tokens/s is tokens / world / seconds, MFU is the achieved
rate over the measured peak). No timing is asserted: only relations between numbers of the same run."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.multirank import ROOT

TINY = ["actor.warm_start.steps=2", "actor.warm_start.batch_size=8", "model.synthetic.num_warm_start=16",
        "model.synthetic.num_train=16", "model.synthetic.num_val=4", "model.synthetic.num_layers=2",
        "data.prompts_per_step=4", "rollout.n=2"]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "bench", "step", "configs/quickstart.yaml",
                           "--nproc", "2", "--steps", "1", "--out", str(out), *TINY], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tokens/s per rank" in proc.stdout
    return json.loads(out.read_text())


def test_keys(report):
    assert report["benchmark"] == "step" and report["schema"] == 1
    for key in ("device", "cpu", "num_cpus", "torch", "vllm", "megatron_core", "load_avg_1_5_15"):
        assert key in report["machine"], key
    assert report["layout"]["world"] == 2 and report["layout"]["train"]["tp"] == 2
    assert report["config"]["overrides"] == TINY and report["config"]["resolved"]["data"]["prompts_per_step"] == 4
    assert report["settings"]["steps"] == 1 and report["settings"]["warmup"] == 1
    # GRPO without a critic; KL out of the loss but monitored (algo.kl.monitor): the reference runs
    assert set(report["settings"]["idle_stages"]) == {"values", "critic_update"}
    assert [r["warmup"] for r in report["rows"]] == [True, False]
    s = report["summary"]
    for stage in ("reshard", "generate", "reward", "ref", "old_logprobs", "values", "actor_update", "critic_update"):
        assert stage in s["stage_seconds"] and stage in s["tokens_per_s"]["stages"], stage
    for stage in ("reshard", "generate", "reward", "ref", "old_logprobs", "actor_update"):
        assert s["memory"]["stages"][stage] > 0, stage
    assert s["memory"]["kind"] == "rss" and s["memory"]["step"] >= s["memory"]["switch"] > 0
    assert s["reshard"]["bytes"] > 0 and s["reshard"]["collectives"] >= 1
    assert s["reshard"]["bytes"] >= s["reshard"]["bytes_max_rank"]
    assert report["peaks"]["gemm_flops_per_s"] > 0 and len(report["peaks"]["gemm_flops_per_s_ranks"]) == 2
    assert report["peaks"]["datasheet_flops_per_s"] is None and s["mfu"]["vs_datasheet"] is None  # CPU
    assert "Narayanan" in report["peaks"]["flops_formula"]


def test_numbers_agree(report):
    world, model = report["layout"]["world"], report["model"]
    for row in [report["summary"], *report["rows"]]:
        stages = row["stage_seconds"]
        assert abs(sum(stages.values()) - row["seconds"]) <= 0.05 * row["seconds"]  # the untimed glue is small
        assert close(row["other_seconds"], row["seconds"] - sum(stages.values()))
        t, tps = row["tokens"], row["tokens_per_s"]
        assert close(t["total"], t["prompt"] + t["response"]) and t["response"] > 0
        assert close(tps["step"], t["total"] / world / row["seconds"])
        assert close(tps["generated"], t["response"] / world / stages["generate"])
        for stage, seconds in stages.items():
            expected = None if stage in report["settings"]["idle_stages"] or seconds == 0 else t["total"] / world / seconds
            assert tps["stages"][stage] == expected or close(tps["stages"][stage], expected), stage
        au = row["actor_update"]
        assert close(au["flops_per_s"], au["flops"] / world / stages["actor_update"])
        assert close(au["flops_per_token"], au["flops"] / t["total"])
        # 6·N per token at least (the attention term adds to it), N the matmul weights
        assert au["flops_per_token"] >= 6 * model["matmul_params"]
        assert close(row["mfu"]["vs_gemm_peak"], au["flops_per_s"] / report["peaks"]["gemm_flops_per_s"])
    measured = [r for r in report["rows"] if not r["warmup"]]
    assert close(report["summary"]["seconds"], sum(r["seconds"] for r in measured))
    assert close(report["summary"]["tokens"]["total"], sum(r["tokens"]["total"] for r in measured))


@pytest.mark.parametrize("bench", ["rollout", "train"])
def test_rollout_and_train_alone(bench, tmp_path):
    out = tmp_path / f"{bench}.json"
    extra = ["--response-len", "4"] if bench == "train" else []
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "bench", bench, "configs/quickstart.yaml",
                           "--nproc", "2", "--steps", "1", "--out", str(out), *extra, *TINY], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == bench and [r["warmup"] for r in report["rows"]] == [True, False]
    world = report["layout"]["world"]
    for row in [report["summary"], *report["rows"]]:
        t = row["tokens"]
        assert close(t["total"], t["prompt"] + t["response"]) and t["response"] > 0
        assert close(row["tokens_per_s"]["step"], t["total"] / world / row["seconds"])
        if bench == "rollout":
            assert close(row["tokens_per_s"]["generated"], t["response"] / world / row["seconds"])
            assert row["samples"] == 4 * 2 * (len(report["rows"]) - 1 if row is report["summary"] else 1)
            assert 1 <= row["lengths"]["response_max"] <= report["settings"]["max_new_tokens"]
        else:  # 4 prompts × 2 samples × (16 + 4) tokens
            assert t["total"] == 4 * 2 * 20 * (1 if "step" in row else report["summary"]["steps"])
            au = row["actor_update"]
            assert close(au["flops_per_s"], au["flops"] / world / row["seconds"])
            assert close(row["mfu"]["vs_gemm_peak"], au["flops_per_s"] / report["peaks"]["gemm_flops_per_s"])
