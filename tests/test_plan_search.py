"""`hybridflow-mg plan --search`: a ranking checked against hand-computed terms, exclusions with their reasons,
the one-line refusals, and the Llama-3-70B table on 64 × 80 GB."""
import json
from pathlib import Path

import pytest

from tests.clirun import cli
from tests.tiny import llama_config

ROOT = Path(__file__).resolve().parents[1]
LLAMA70B = ROOT / "configs" / "models" / "llama3-70b.json"
GIB = 2**30


def search_json(*args):
    proc = cli("plan", "--search", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- a tiny Llama on 4 GPUs, 2 per node: the top five by hand ------------------------------------------
def test_ranking_by_hand(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    # hidden 64, 4 heads / 2 KV heads × 16, ffn 96, 2 layers, vocab 250, untied. Rounder constants than a GPU's:
    # 1e6 FLOP/s at MFU 1, 1e6 B/s of HBM, 1e7 B/s NVLink, 1e6 B/s IB.
    result = search_json(
        "--hf-config", tmp_path, "--gpus", 4, "--gpus-per-node", 2, "--gpu-memory", 80, "--seq-len", 8,
        "--response-len", 4, "--batch", 8, "--samples", 2, "--mini-batches", 1, "--peak-tflops", 1e-6, "--mfu", 1,
        "--hbm-gbps", 1e-3, "--nvlink-gbps", 1e-2, "--ib-gbps", 1e-3, "--top", 10)

    # parameters: per layer q,k,v (4+2+2)·16·64, o 64·64, gate+up 2·96·64, down 64·96, two norms
    layer = 8 * 16 * 64 + 64 * 64 + 2 * 96 * 64 + 64 * 96 + 2 * 64
    params = 2 * 250 * 64 + 2 * layer + 64  # embedding, output layer, final norm
    assert (layer, params) == (30848, 93760)
    # training FLOPs per token (s = 8): forward-backward 6·W + 12·L·q·s, old-log-prob forward 2·W + 4·L·q·s,
    # W = the parameters that multiply (all but the input embedding), q = 4 heads · 16
    w, lqs = params - 250 * 64, 2 * 64 * 8
    per_token = (6 * w + 12 * lqs) + (2 * w + 4 * lqs)
    compute_s = 8 * 8 * per_token / (4 * 1e6)  # 8 sequences × 8 tokens over 4 GPUs of 1e6 FLOP/s
    assert compute_s == pytest.approx(10.215424)
    # decode: 4 tokens per sequence; per step a GPU reads its vLLM shard (bf16) and the KV of the running
    # sequences at the mean context 4 + 4/2 = 6 tokens; KV per token per rank 2·2 layers·(2/t_g) heads·16·2 B
    vllm_layer = {1: layer, 2: (2 + 2 * 1) * 16 * 64 + 32 * 64 + 2 * 48 * 64 + 64 * 48 + 2 * 64}
    gen_bytes = {tg: 2 * (2 * vllm_layer[tg] + 2 * 256 // tg * 64 + 64) for tg in (1, 2)}  # vocab padded to 256
    assert gen_bytes == {1: 189056, 2: 94848}

    def decode_s(tg, pg=1):
        running = 8 // (4 // (tg * pg))  # the batch over 4/(t_g·p_g) replicas, all at once (one wave)
        # a step reads every stage's shard (untied: the stages' shards add up to the p_g = 1 shard) and every
        # stage's KV, each of its 2/p_g layers
        kv = pg * running * 6 * (2 * (2 // pg) * (2 // tg) * 16 * 2)
        return 4 * (gen_bytes[tg] + kv) / 1e6

    assert decode_s(2, 2) == pytest.approx(4 * (94848 + 2 * 8 * 6 * 64) / 1e6)  # 0.404 s against 0.392 s at p_g = 1
    model_bytes = 2 * params
    want = [  # (train tp, pp, dp, gen tp, gen pp), reshard, training, decode
        # a TP2 replica over two TP1 training replicas: each rank holds its half already; p = 1: no bubble
        ((1, 1, 4, 2, 1), 0.0, compute_s, decode_s(2)),
        ((2, 1, 2, 2, 1), 0.0, compute_s, decode_s(2)),  # t_g = t: d_g = 1, nothing moves (a tie: smaller tp first)
        # one TP2·PP2 replica over all 4 GPUs: each rank's generation shard (half the columns of one layer) lies
        # inside its training shard, so nothing moves; the same step time per token as TP2, twice the sequences
        # per replica: p_g buys KV room, not speed
        ((1, 1, 4, 2, 2), 0.0, compute_s, decode_s(2, 2)),
        ((2, 1, 2, 2, 2), 0.0, compute_s, decode_s(2, 2)),
        ((1, 1, 4, 1, 1), 0.0, compute_s, decode_s(1)),
        # d_g = 2: each rank gathers (2−1)/(2·1)·M from its TP partner, inside its node → NVLink
        ((2, 1, 2, 1, 1), model_bytes / 2 / 1e7, compute_s, decode_s(1)),
        ((1, 1, 4, 1, 2), 0.0, compute_s, decode_s(1, 2)),  # TP1·PP2 over two TP1 replicas: one layer, held
        # TP2 → TP1·PP2: a rank generates one whole layer (1/2 of M) and trains half of each (1/4 of it held):
        # it receives 1/4·M from its TP partner over NVLink
        ((2, 1, 2, 1, 2), model_bytes / 4 / 1e7, compute_s, decode_s(1, 2)),
        # bubble (p−1)/m = 1/8, m = 8 sequences per DP rank per mini-batch at micro-batch 1; t_g·p_g = t·p: d_g = 1
        ((2, 2, 1, 2, 2), 0.0, compute_s * (1 + 1 / 8), decode_s(2, 2)),
        # d_g = 2: (2−1)/(2·2)·M from the other stage (ranks 0 and 2: two nodes → IB)
        ((2, 2, 1, 2, 1), model_bytes / 4 / 1e6, compute_s * (1 + 1 / 8), decode_s(2)),
    ]
    rows = result["ranked"][:10]
    for row, (layout, reshard, training, decode) in zip(rows, want, strict=True):
        t, g = row["train"], row["gen"]
        assert (t["tp"], t["pp"], t["dp"], g["tp"], g["pp"]) == layout and t["vpp"] == 1
        assert row["decode"]["stages"] == g["pp"]
        assert row["reshard"]["time_s"] == pytest.approx(reshard)
        assert row["training"]["time_s"] == pytest.approx(training)
        assert row["decode"]["time_s"] == pytest.approx(decode) and row["decode"]["waves"] == 1
        assert row["total_s"] == pytest.approx(reshard + training + decode)
    assert [r["total_s"] for r in result["ranked"]] == sorted(r["total_s"] for r in result["ranked"])

    # excluded, with their reasons: Megatron cannot split 2 KV heads over tp=4; vLLM tp=4 spans two nodes of 2
    excluded = {e["layout"]: e for e in result["excluded"]}
    assert "num_kv_heads=2 is not divisible by megatron tp=4" in excluded["tp=4,pp=1,dp=1 → gen tp=4"]["detail"]
    assert excluded["tp=2,pp=2,dp=1 → gen tp=4"]["reason"] == "node"
    assert excluded["tp=1,pp=1,dp=4 → gen tp=1,pp=4"]["detail"] == (
        "generation pp=4 does not divide the 2 layers of the model (--gen pp=, parallel.gen.pp) (vLLM would split "
        "them unevenly); pick one of 1, 2")
    assert "gen_pp" not in result["excluded_counts"]


# --- Llama-3-70B on 64 × 80 GB ------------------------------------------------------------------------
def test_llama70b_prints_a_ranked_top_5_with_each_term():
    proc = cli("plan", "--search", "--hf-config", LLAMA70B, "--gpus", 64, "--gpu-memory", "80GB")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#"))
    assert all(word in lines[header] for word in ("reshard", "training", "decode", "total"))
    rows = lines[header + 1:header + 6]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4", "5"] and not lines[header + 6].strip()
    for row in rows:
        assert "·M" in row and "bubble" in row and "wave" in row and row.rstrip().endswith(" s")
    assert "excluded:" in proc.stdout and "generation pp > 1" not in proc.stdout


def test_a_layout_that_does_not_fit_is_excluded_with_its_reason():
    result = search_json("--hf-config", LLAMA70B, "--gpus", 64, "--gpu-memory", "80GB")
    excluded = {e["layout"]: e for e in result["excluded"]}
    tp8 = excluded["tp=8,pp=1,dp=8 → gen tp=8"]  # all 80 layers on one TP8 group
    assert tp8["reason"] == "memory"
    # the same layout through plain `plan`: the peak it names is the one plan reports
    plan = json.loads(cli("plan", "--hf-config", LLAMA70B, "--train", "tp=8,pp=1,dp=8", "--gen", "tp=8",
                          "--sleep-mode", "--offload", "--json").stdout)
    assert not plan["fits"] and plan["peaks"]["training"] > 80 * GIB
    assert tp8["detail"] == f"training peak {plan['peaks']['training'] / GIB:.1f} GiB above 80 GiB"
    assert tp8["lacks_bytes"] == plan["peaks"]["training"] - 80 * GIB
    assert "tp=1,pp=1,dp=64 → gen tp=1" in excluded and excluded["tp=1,pp=1,dp=64 → gen tp=1"]["reason"] == "batch"


def test_llama70b_generation_pp_2_is_ranked_with_its_terms():
    """TP8·PP2·DP4 → vLLM TP8·PP2: t_g·p_g = t·p, so every rank's generation shard is its training shard (nothing
    moves); the decode term reads both stages one after another."""
    H, HEADS, KV, HD, FFN, VOCAB = 8192, 64, 8, 128, 28672, 128256
    layer = ((HEADS + 2 * KV) * HD * H + H * H + 3 * FFN * H) // 8 + 2 * H  # vLLM TP8: one KV head per rank
    stages = [40 * layer + VOCAB // 8 * H, 40 * layer + VOCAB // 8 * H + H]  # embedding; final norm, LM head
    result = search_json("--hf-config", LLAMA70B, "--gpus", 64, "--gpu-memory", "80GB")
    row = next(r for r in result["ranked"] if r["layout"] == "tp=8,pp=2,dp=4 → gen tp=8,pp=2")
    assert row["gen"] == {"tp": 8, "pp": 2, "micro_dp": 1, "replicas": 4}
    assert row["reshard"]["recv_bytes"] == 0 and row["reshard"]["time_s"] == 0
    # 4 replicas of 16 GPUs take 256 sequences each, all at once (max_num_seqs 256); per step, for each stage:
    # its bf16 shard and the KV of 256 sequences at the mean context 2048 + 2048/2 = 3072 tokens,
    # 2·40 layers·1 KV head·128·2 B = 20,480 B per token per rank
    kv = 2 * 256 * 3072 * 20480
    step_s = (2 * sum(stages) + kv) / 3350e9  # ≈ (17.64 GB + 32.21 GB) / 3.35 TB/s ≈ 14.9 ms
    decode = row["decode"]
    assert (decode["concurrent"], decode["waves"], decode["stages"]) == (256, 1, 2)
    assert decode["weight_bytes"] == 2 * sum(stages) and decode["kv_bytes"] == pytest.approx(kv)
    assert decode["time_s"] == pytest.approx(2048 * step_s)  # ≈ 30.5 s: slower than TP8·PP1's 20.6 s
    assert row["total_s"] == pytest.approx(row["training"]["time_s"] + decode["time_s"])
    best_pp1 = next(r for r in result["ranked"] if r["gen"]["pp"] == 1)
    assert row["total_s"] > best_pp1["total_s"] and row["decode"]["time_s"] > best_pp1["decode"]["time_s"]
    # the row's command replays through plain plan
    plan = json.loads(cli("plan", "--hf-config", LLAMA70B, *row["check"].split()[1:], "--json").stdout)
    assert "--gen tp=8,pp=2" in row["check"] and plan["fits"] and plan["peaks"] == row["peaks"]
    assert plan["kv"]["bytes_per_token_per_rank"] == 20480


def test_the_top_row_is_what_plan_says_for_its_layout():
    best = search_json("--hf-config", LLAMA70B, "--gpus", 64)["ranked"][0]
    args = best["check"].split()[1:]  # "plan --train … --gen … --seq-len … --sleep-mode --offload"
    plan = json.loads(cli("plan", "--hf-config", LLAMA70B, *args, "--json").stdout)
    assert plan["fits"] and plan["peaks"] == best["peaks"]
    assert plan["kv"]["tokens_per_replica"] == best["kv_tokens_per_replica"]
    assert plan["reshard"]["time_s"] == best["reshard"]["time_s"]


# --- bad input: one line (what, where, how to fix) and exit 2 --------------------------------------------
def test_no_fitting_layout_is_one_line():
    proc = cli("plan", "--search", "--hf-config", LLAMA70B, "--gpus", 8, "--gpu-memory", "80GB")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error: no layout of llama fits 8 GPUs of 80 GiB")
    assert "the nearest, tp=8,pp=1,dp=1 → gen tp=8, lacks" in lines[0] and "use more or larger GPUs" in lines[0]


def test_gpu_memory_below_the_weights_is_one_line():
    proc = cli("plan", "--search", "--hf-config", LLAMA70B, "--gpus", 64, "--gpu-memory", "1GB")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        "hybridflow-mg: error: --gpu-memory 1 GiB is below the weights alone: llama's 131.4 GiB in bf16 are "
        "2.05 GiB per GPU even split over all 64 GPUs; give more --gpus or a larger --gpu-memory")


@pytest.mark.parametrize("args,message", [
    (("--hf-config", LLAMA70B), "plan --search needs --hf-config FILE and --gpus N"),
    (("--hf-config", LLAMA70B, "--gpus", 64, "--train", "tp=8,pp=2,dp=4"), "not a training config or --train"),
    (("--hf-config", LLAMA70B, "--gpus", 64, "--batch", 1001), "batch=1001 sequences is not a whole number"),
    (("--hf-config", LLAMA70B, "--gpus", 64, "--response-len", 4096), "response_len=4096 must be between 0"),
    (("--hf-config", LLAMA70B, "--gpus", 64, "--mfu", 1.5), "mfu=1.5 must be in (0, 1]"),
])
def test_bad_search_input_gives_one_line(args, message):
    proc = cli("plan", "--search", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
