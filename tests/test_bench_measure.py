"""bench.measure by hand: the matmul weights and model FLOPs of a small Llama, the GEMM list against 6·N, the
per-stage peak RSS, and bench.step.figures' rates. No timing is asserted."""
import torch

from hybridflow_mg.bench.measure import StageProbe, matmul_params, rank_gemms, train_flops_per_seq
from hybridflow_mg.bench.step import STAGES, figures
from hybridflow_mg.models.layouts import ModelDims

DIMS = ModelDims(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=128,
                 vocab_size=100, tie_embeddings=True)


def test_matmul_params_and_flops_by_hand():
    # per layer: qkv 64·(64 + 2·32) = 8192, o 64·64 = 4096, gate+up 64·256 = 16384, down 128·64 = 8192 → 36864
    # two layers 73728, output layer 64·100 = 6400 (tied, still a matmul): 80128; the embedding lookup is not counted
    assert matmul_params(DIMS) == 80128
    # s = 10: 6·80128·10 = 4,807,680; attention 12·2·(4·16)·10² = 153,600
    assert train_flops_per_seq(DIMS, 10) == 4_807_680 + 153_600


def test_rank_gemms_are_six_n_per_token_over_tp():
    tokens = 24
    for tp in (1, 2):
        flops = sum(count * 2 * m * k * n for _, count, m, k, n in rank_gemms(DIMS, tokens, tp, padded_vocab=128 * tp))
        # 3 GEMMs per weight (forward, input and weight gradient), each 2 FLOPs per weight per token, 1/tp each
        padded = matmul_params(DIMS) + DIMS.hidden_size * (128 * tp - DIMS.vocab_size)
        assert flops * tp == 6 * padded * tokens


def test_stage_probe_sees_a_stage_peak():
    probe = StageProbe(torch.device("cpu"))
    probe.start_step()
    probe.enter("generate")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    probe.exit("generate")
    probe.enter("reward")
    probe.exit("reward")
    peaks = probe.finish_step()
    assert peaks["kind"] == "rss"
    assert peaks["stages"]["generate"] >= peaks["stages"]["reward"] + 48 * 2**20  # reset between stages
    assert peaks["step"] == max(peaks["stages"]["generate"], *peaks["gaps"].values())
    assert set(peaks["gaps"]) == {"generate", "reward", "end"}


def test_figures_rates_are_amounts_over_seconds():
    stage_seconds = {"reshard": 1.0, "generate": 2.0, "actor_update": 4.0}
    f = figures(seconds=8.0, stage_seconds=stage_seconds, prompt_tokens=300.0, response_tokens=100.0,
                actor_flops=8e9, world=2, gemm_flops_per_s=2e9, datasheet_flops_per_s=None, idle=("ref",))
    assert list(f["stage_seconds"])[:len(STAGES)] == list(STAGES)
    assert f["other_seconds"] == 1.0 and f["stage_share"]["actor_update"] == 0.5
    assert f["tokens_per_s"]["step"] == 400 / 2 / 8 and f["tokens_per_s"]["generated"] == 100 / 2 / 2
    assert f["tokens_per_s"]["stages"]["reshard"] == 200 and f["tokens_per_s"]["stages"]["ref"] is None
    assert f["actor_update"] == {"flops": 8e9, "flops_per_token": 2e7, "flops_per_s": 1e9}
    assert f["mfu"] == {"vs_gemm_peak": 0.5, "vs_datasheet": None}
