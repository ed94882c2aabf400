"""bench report and bench scale's fit, on small synthetic JSONs of the benchmarks' schemas (one process, no
model, no timing asserted): valid PNGs, the README table holds the inputs' numbers and is regenerated in
place, the exponent of exact power-law points is recovered."""
import json
import math

import pytest

from hybridflow_mg.bench import report as bench_report
from hybridflow_mg.bench.scale import fit_exponent, reshard_sweeps, step_sweeps
from hybridflow_mg.bench.step import STAGES, figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_fit_recovers_the_exponent():
    xs = [1, 2, 4, 8, 16]
    fit = fit_exponent(xs, [3 * x**1.5 for x in xs])
    assert math.isclose(fit["exponent"], 1.5, rel_tol=1e-12)
    assert math.isclose(fit["prefactor"], 3.0, rel_tol=1e-12) and math.isclose(fit["r2"], 1.0)
    assert math.isclose(fit_exponent([2, 8], [5, 5])["exponent"], 0.0, abs_tol=1e-12)
    assert fit_exponent([4], [1.0]) is None and fit_exponent([4, 4], [1.0, 2.0]) is None


def step_json(prompts: int, seconds_per_step: float) -> dict:
    stage = {"reshard": 0.5, "generate": 3.0, "reward": 0.2, "old_logprobs": 1.5, "advantages": 0.1, "actor_update": 4.0}
    scale = seconds_per_step / 10.0
    summary = {"steps": 2, **figures(seconds=2 * seconds_per_step, stage_seconds={k: 2 * v * scale for k, v in stage.items()},
                                     prompt_tokens=2 * prompts * 8 * 15.0, response_tokens=2 * prompts * 8 * 6.0,
                                     actor_flops=1e12, world=4, gemm_flops_per_s=2e10, datasheet_flops_per_s=None,
                                     idle=("ref", "values", "critic_update")),
               "memory": {"kind": "rss", "stages": {}, "switch": 3 * 2**30, "step": 4 * 2**30},
               "reshard": {"bytes": 1e7, "bytes_max_rank": 3e6, "collectives": 2}}
    return {"benchmark": "step", "schema": 1, "date": "2026-12-01T00:00:00+00:00",
            "config": {"path": "configs/quickstart.yaml", "overrides": [], "resolved": {}},
            "machine": {"device": "cpu", "load_avg_1_5_15": [1.5, 1, 1], "load_avg_1_5_15_after": [2.5, 1, 1]},
            "layout": {"world": 4, "train": {"tp": 2, "pp": 1, "vpp": 1, "dp": 2}, "gen": {"tp": 1, "pp": 1}},
            "settings": {"steps": 2, "warmup": 1, "prompts_per_step": prompts, "samples_per_prompt": 8,
                         "max_new_tokens": 6},
            "stages": list(STAGES), "summary": summary, "peaks": {"gemm_flops_per_s": 2e10}}


def reshard_json(world: int, layers: list[int]) -> dict:
    def run(depth, bucket_mb, seconds):
        return {"layers": depth, "bucket_bytes": bucket_mb * 10**6,
                "serial": {"seconds": seconds, "recv_bytes_per_rank": [depth * 1e6] * world,
                           "peak_extra_bytes_per_rank": [bucket_mb * 2e6] * world},
                "baseline": {"seconds": 6 * seconds, "recv_bytes_per_rank": [depth * 3e6] * world,
                             "peak_extra_bytes_per_rank": [13e6] * world},
                "speedup_serial_vs_baseline": 6.0 if bucket_mb == 4 else 4.0}
    runs = [run(d, b, 0.01 * d**1.5 * world) for d in layers for b in (64, 4)]
    return {"benchmark": "reshard", "date": "2026-12-01T00:00:01+00:00", "world": world,
            "layout": {"describe": f"train tp=2 pp={world // 2} → gen tp=1"}, "model": {"bytes": 53.3e6},
            "settings": {"bucket_bytes": 64e6}, "ours": runs[0]["serial"], "baseline": runs[0]["baseline"],
            "speedup": 4.0, "bytes_ratio": 3.0, "runs": runs}


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    step = step_json(32, 10.0)
    (d / "bench_step.json").write_text(json.dumps(step))
    # the points of a scale sweep sit beside the results and must not replace them
    (d / "scale_step_p8.json").write_text(json.dumps(step_json(8, 3.0) | {"date": "2027-01-01"}))
    reshards = {w: reshard_json(w, [4, 8]) for w in (2, 4)}
    (d / "bench_reshard.json").write_text(json.dumps(reshards[4]))
    sweeps = reshard_sweeps({w: r | {"runs": [x for x in r["runs"] if x["bucket_bytes"] == 4e6]}
                             for w, r in reshards.items()})
    sweeps += step_sweeps({p: step_json(p, 0.5 * (p * 8) ** 0.8) for p in (8, 16, 32)})
    (d / "bench_scale.json").write_text(json.dumps({"benchmark": "scale", "date": "2026-12-01", "sweeps": sweeps,
                                                    "runs": [], "machine": {"load_avg_1_5_15": [1.0, 1, 1]}}))
    trl = {"benchmark": "trl_peer", "date": "2026-12-01", "num_processes": 1, "generation_backend": "transformers",
           "summary": {"steps": 2, "seconds": 50.0, "response_len": 5.0,
                       "tokens_per_s": {"job": 200.0, "step": 200.0}}}
    (d / "trl_peer.json").write_text(json.dumps(trl))
    return d, step, sweeps


def test_report_writes_pngs_and_the_table(inputs, tmp_path):
    d, step, sweeps = inputs
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nhand-written text\n")
    files = bench_report.write_report([d], tmp_path / "out", readme)
    names = {f.name for f in files}
    assert {"stage_breakdown.png", "scaling.png", "peer.png", "reshard.png", "table.md", "README.md"} <= names
    import matplotlib.image

    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG_SIGNATURE
            assert matplotlib.image.imread(f).shape[0] > 100
    text = readme.read_text()
    assert text.startswith("# Results\n\nhand-written text\n")
    s = step["summary"]
    assert f"{s['tokens_per_s']['step']:.4g}" in text  # step tokens/s per rank
    assert f"actor_update {100 * s['stage_share']['actor_update']:.1f} %" in text
    assert f"{100 * s['mfu']['vs_gemm_peak']:.1f} %" in text
    assert "4× faster" in text and "3× fewer" in text  # reshard speed-up and bytes vs the baseline
    assert "6.00× (meets 5×)" in text  # the 4 MB bucket: 8 MB peak within the baseline's 13 MB
    ours_job = s["tokens"]["total"] / s["seconds"]
    assert f"ours / TRL {ours_job / 200.0:.2f}×" in text and f"TRL / ours {25.0 / 10.0:.2f}×" in text
    for sw in sweeps:
        assert f"b = {sw['fit']['exponent']:.2f}" in text
    assert any(math.isclose(sw["fit"]["exponent"], 1.5) for sw in sweeps if sw["group"] == "reshard_seconds_vs_layers")
    assert math.isclose(sweeps[-1]["fit"]["exponent"], 0.8)


def test_readme_table_is_regenerated_in_place(inputs, tmp_path):
    d, _, _ = inputs
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nbefore\n")
    bench_report.write_report([d], tmp_path / "out", readme)
    once = readme.read_text()
    readme.write_text(once + "\nafter\n")
    bench_report.write_report([d], tmp_path / "out", readme)
    twice = readme.read_text()
    assert twice == once + "\nafter\n"
    assert twice.count(bench_report.TABLE_BEGIN) == 1 and twice.count(bench_report.TABLE_END) == 1


def test_a_skipped_peer_is_said(inputs, tmp_path):
    d, _, _ = inputs
    (d / "trl_peer.json").unlink()
    (d / "bench_all.json").write_text(json.dumps({"benchmark": "all", "date": "2026-12-01",
                                                  "peer": {"skipped": "TRL's environment is missing"}}))
    files = bench_report.write_report([d], tmp_path / "out", None)
    assert "peer.png" not in {f.name for f in files}
    assert "peer skipped: TRL's environment is missing" in (tmp_path / "out" / "table.md").read_text()
