"""`hybridflow-mg plan`: memory and reshard traffic against hand counts, `grid`, and the §2 formula."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clirun import cli
from tests.tiny import llama_config

ROOT = Path(__file__).resolve().parents[1]
LLAMA70B = ROOT / "configs" / "models" / "llama3-70b.json"
GIB = 2**30


def plan_json(*args):
    proc = cli("plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- Llama-3-70B, TP8·PP2·DP4 → TP8 (world 64) --------------------------------------------------------
H, L, HEADS, KV, HD, FFN, VOCAB = 8192, 80, 64, 8, 128, 28672, 128256
QKV = (HEADS + 2 * KV) * HD * H  # q, k, v projections
O, GATE_UP, DOWN, NORMS = H * H, 2 * FFN * H, H * FFN, 2 * H
PARAMS = 2 * VOCAB * H + L * (QKV + O + GATE_UP + DOWN + NORMS) + H  # untied embedding + lm_head, final norm
M = 2 * PARAMS  # bf16 bytes
LLAMA_ARGS = ("--hf-config", LLAMA70B, "--train", "tp=8,pp=2,dp=4", "--gen", "tp=8")


def test_llama70b_parameter_count():
    assert PARAMS == 70_553_706_496  # ≈ 70.55 B, the published size
    assert plan_json(*LLAMA_ARGS)["model"]["params"] == PARAMS


def test_llama70b_traffic_is_the_formula_and_what_grid_reports():
    plan = plan_json(*LLAMA_ARGS)["reshard"]
    d_g, t, p = 2, 8, 2  # t·p / t_g = 16 / 8
    per_rank = (d_g - 1) / (t * p) * M  # 8.82 GB
    assert plan["model_bytes"] == M
    assert plan["recv_bytes_per_rank"] == [pytest.approx(per_rank, rel=1e-12)] * 64
    assert plan["formula_recv_bytes"] == pytest.approx(per_rank, rel=1e-12) and plan["formula_recv_fraction"] == "1/16"

    grid = cli("grid", "--world", 64, "--train", "tp=8,pp=2", "--gen", "tp=8", "--json")
    assert grid.returncode == 0, grid.stderr
    from_grid = [row["recv_fraction"] * M for row in json.loads(grid.stdout)["ranks"]]
    assert plan["recv_bytes_per_rank"] == pytest.approx(from_grid, rel=1e-12)

    # micro-DP groups pair stage 0 and stage 1 ranks, 32 ranks apart: never in one node of 8 → InfiniBand
    assert plan["sources_of_rank0"] == [0, 32] and plan["link"] == "ib" and plan["ranks_on_ib"] == 64
    assert plan["time_s"] == pytest.approx(per_rank / 50e9)  # ≈ 0.176 s (DESIGN §2 quotes ≈ 0.18 s)
    gather, vanilla, ours = plan["baselines"]
    assert gather["recv_bytes"] == pytest.approx(63 / 64 * M) and vanilla["recv_bytes"] == pytest.approx(15 / 16 * M)
    assert ours["recv_bytes"] == pytest.approx(per_rank) and ours["peak_weight_bytes"] == M // 8

    text = cli("plan", *LLAMA_ARGS).stdout
    assert f"1/16·M = {per_rank / 1e9:.2f} GB" in text and "[0, 32]" in text and "0.176 s" in text


def test_llama70b_memory_by_hand():
    t, dp = 8, 4
    layer_shard = (QKV + O + GATE_UP + DOWN) // t + NORMS  # norms replicated
    mcore_vocab_rows = 129024 // t  # vocab padded to a multiple of 128·t = 1024: 126·1024 = 129024
    stage0 = 40 * layer_shard + mcore_vocab_rows * H  # embedding
    stage1 = 40 * layer_shard + H + mcore_vocab_rows * H  # final norm, output layer
    assert (stage0, stage1) == (4_410_966_016, 4_410_974_208)
    vllm_vocab_rows = VOCAB // t  # 128256 is already a multiple of 64
    gen = L * layer_shard + 2 * vllm_vocab_rows * H + H  # vLLM t_g=8: one KV head per rank, as Megatron

    # saved activations per token per layer, 16-bit, without sequence parallelism (what the trainer runs):
    # whole on every TP rank: norm in, qkv in; norm in, fc1 in. Split over t: q, k, v, attention out; gate, up, fc2 in
    whole, split = 2 * (H + H + H + H), 2 * (HEADS * HD + 2 * KV * HD + HEADS * HD + 3 * FFN)
    act_layers = (whole * t + split) * 4096 * 40 // t  # one micro-batch of 4096 tokens through 40 layers
    plan = plan_json(*LLAMA_ARGS)
    s0, s1 = plan["stages"]
    assert s0["params"] == {"actor": stage0, "gen": gen} and s1["params"]["actor"] == stage1
    assert s0["bytes"] == {"actor_weights": 2 * stage0, "actor_grads": 4 * stage0,
                           "actor_optimizer": 12 * stage0 // dp, "gen_weights": 2 * gen}
    assert s0["activations"] == act_layers * 2  # stage 0 of 1F1B: 2 micro-batches in flight
    assert s1["activations"] == act_layers + 2 * 4 * 4096 * mcore_vocab_rows  # + fp32 logits
    kv_room = 80 * GIB - (2 + 4 + 3 + 0) * stage0 - 2 * gen - s0["activations"] - 2 * GIB
    mem, kv = plan["memory"], plan["kv"]
    assert mem["stage"] == 0 and mem["kv_cache"] == kv_room
    assert kv["bytes_per_token_per_rank"] == 2 * L * 1 * HD * 2 == 40960
    assert kv["tokens_per_replica"] == max(0, kv_room) // 40960  # without sleep mode this layout has no KV room left
    # ≈ 8.2 + 16.4 + 12.3 + 16.4 GiB resident; the report shows them
    text = cli("plan", *LLAMA_ARGS).stdout
    for gib in (2 * stage0, 4 * stage0, 12 * stage0 // dp, 2 * gen):
        assert f"{gib / GIB:8.2f}" in text
    assert f"{max(0, kv_room) // 40960:,} tokens per generation replica" in text
    assert kv_room < 0 and "DOES NOT FIT: the KV cache holds fewer than" in text  # activations of 4096-token
    # sequences at TP8 without sequence parallelism leave no room beside the whole training state (no sleep mode)


def test_llama70b_generation_pp_memory_by_hand():
    """Train TP4·PP4·DP4 → vLLM TP4·PP2 (d_g = 16/8 = 2), sleep mode and offload: the generation rank holds the
    largest of vLLM's two stages, and its KV cache caches that stage's 40 layers only."""
    t_g = 4
    layer = (QKV + O + GATE_UP + DOWN) // t_g + NORMS  # 213,925,888: vLLM TP4 splits the 8 KV heads 2 per rank
    rows = VOCAB // t_g * H  # vocab rows per rank (128256 is a multiple of 64: no padding)
    stage0 = 40 * layer + rows  # layers 0–39 and the embedding
    stage1 = 40 * layer + H + rows  # layers 40–79, the final norm and the LM head (untied)
    assert (stage0, stage1) == (8_819_703_808, 8_819_712_000)
    plan = plan_json("--hf-config", LLAMA70B, "--train", "tp=4,pp=4,dp=4", "--gen", "tp=4,pp=2", "--sleep-mode",
                     "--offload")
    assert plan["layout"]["gen"] == {"tp": 4, "pp": 2, "micro_dp": 2, "replicas": 8}
    for stage in plan["stages"]:  # every training stage is charged the larger vLLM stage
        assert stage["params"]["gen"] == stage1 and stage["bytes"]["gen_weights"] == 2 * stage1
    # KV per token per rank: 2 (K, V) · 40 layers · 8/4 KV heads · 128 · 2 B = 40,960 (81,920 at gen pp 1)
    assert plan["kv"]["bytes_per_token_per_rank"] == 2 * 40 * 2 * HD * 2 == 40960
    # while generating with sleep mode and offload only the vLLM weights and the 2 GiB overhead stay beside the
    # KV cache: 80 − 2·8,819,712,000 B (16.43 GiB) − 2 GiB = 61.57 GiB → 1,614,073 tokens per replica
    kv_room = 80 * GIB - 2 * stage1 - 2 * GIB
    assert plan["memory"]["kv_cache"] == kv_room and plan["kv"]["tokens_per_replica"] == kv_room // 40960 == 1_614_073
    assert plan["reshard"]["formula_recv_fraction"] == "1/16"  # (d_g − 1)/(t·p) = 1/16, as at gen pp 1
    text = cli("plan", "--hf-config", LLAMA70B, "--train", "tp=4,pp=4,dp=4", "--gen", "tp=4,pp=2").stdout
    assert "→ gen tp=4,pp=2 (d_g=2, 8 generation replicas)" in text
    assert f"vLLM shard tp=4,pp=2: {stage1:,} params × bf16 (the largest stage)" in text
    assert "40,960 B per token per rank = 2·40 layers·2 KV heads·128·2 B" in text


def test_tied_embedding_on_both_generation_stages(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                           tie_word_embeddings=True)))
    # 2 layers, hidden 64, vocab 250 → 256 rows (vLLM pads to 64), t_g = 2, p_g = 2: stage 0 has layer 0 and the
    # embedding; stage 1 has layer 1, the final norm and the embedding again (the tied LM head), counted once
    layer = ((4 + 2 * 2) * 16 * 64 + (4 + 2 * 2) * 16 + 64 * 64 + 2 * 96 * 64 + 64 * 96) // 2 + 2 * 64
    emb = 256 // 2 * 64
    plan = plan_json("--hf-config", cfg, "--train", "tp=2,pp=2,dp=2", "--gen", "tp=2,pp=2", "--reserve-gib", "0.5")
    assert plan["stages"][0]["params"]["gen"] == layer + emb + 64 == 23808
    assert plan["kv"]["bytes_per_token_per_rank"] == 2 * 1 * 1 * 16 * 2  # one layer per stage, one KV head per rank


# --- a small Qwen2 (biases, tied embeddings) with critic and reference ---------------------------------
def test_small_qwen2_by_hand(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                           tie_word_embeddings=True)))
    # hidden 64, 4 heads / 2 KV heads × 16, ffn 96, 2 layers, vocab 250; t=2, p=2, d=2 → t_g=2
    # qkv, qkv bias, o, gate/up, down, two norms
    layer = (4 + 2 * 2) * 16 * 64 + (4 + 2 * 2) * 16 + 64 * 64 + 2 * 96 * 64 + 64 * 96 + 2 * 64
    assert layer == 30976
    total = 250 * 64 + 2 * layer + 64  # tied: one embedding
    shard = (layer - 2 * 64) // 2 + 2 * 64
    emb = 256 // 2 * 64  # Megatron: 250 → multiple of 128·2 = 256; vLLM: multiple of 64 = 256 too
    actor = [shard + emb, shard + 64 + emb]  # the last stage holds megatron-core's copy of the tied embedding
    critic = [shard + emb, shard + 64 + 64]  # value head [1, 64] instead of an output layer
    gen = 2 * shard + emb + 64  # vLLM: lm_head is the embedding
    plan = plan_json("--hf-config", cfg, "--train", "tp=2,pp=2,dp=2", "--gen", "tp=2", "--with-critic", "--with-ref",
                     "--grad-dtype", "bf16", "--reserve-gib", "0.5")
    assert plan["model"]["params"] == total == 78016
    def trained(role, n):  # bf16 weights, bf16 grads, Adam 12 B/param over d=2
        return {f"{role}_weights": 2 * n, f"{role}_grads": 2 * n, f"{role}_optimizer": 12 * n // 2}

    for s, stage in enumerate(plan["stages"]):
        assert stage["params"] == {"actor": actor[s], "gen": gen, "critic": critic[s]}
        want = trained("actor", actor[s]) | {"gen_weights": 2 * gen, "ref_weights": 2 * actor[s]}
        want |= trained("critic", critic[s])
        assert stage["bytes"] == want
        assert stage["kv_cache"] == 80 * GIB - sum(want.values()) - GIB // 2
    assert plan["memory"]["stage"] == 0  # stage 0's critic holds the embedding: the fuller GPU
    assert plan["kv"]["bytes_per_token_per_rank"] == 2 * 2 * 1 * 16 * 2
    reshard = plan["reshard"]
    assert reshard["model_bytes"] == 2 * total
    assert reshard["recv_bytes_per_rank"] == [2 * total / 4] * 8  # (d_g−1)/(t·p) = 1/4
    assert reshard["link"] == "nvlink" and reshard["time_s"] == pytest.approx(2 * total / 4 / 370e9)


def test_shard_counts_match_the_row_maps():
    from hybridflow_mg.models.layouts import ModelDims, rules_for
    from hybridflow_mg.models.rowmaps import shard_shape
    from hybridflow_mg.planning import shard_numel

    for kv, tps in ((2, {"mcore": (1, 2), "vllm": (1, 2, 4, 8)}), (4, {"mcore": (1, 2, 4), "vllm": (1, 2, 4, 8)})):
        dims = ModelDims(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=kv, head_dim=8, ffn_hidden_size=96,
                         vocab_size=100, qkv_bias=True)
        for fmt, sizes in tps.items():
            for tp in sizes:
                for rule in rules_for(dims):
                    shape = shard_shape(rule, fmt, dims, tp)
                    assert shard_numel(rule, fmt, dims, tp) == math.prod(shape), (fmt, tp, rule.key)


def test_plan_imports_no_torch():
    code = ("import sys, io, contextlib; from hybridflow_mg.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['plan', '--hf-config', {str(LLAMA70B)!r}, '--train', 'tp=8,pp=2,dp=4', '--with-critic'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'vllm', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.parametrize("args,message", [
    (("--hf-config", "missing.json", "--train", "tp=8,pp=2,dp=4"), "no HF config at"),
    (("--train", "tp=3,pp=2,dp=4"), "num_heads=64 is not divisible by tp=3"),
    (("--train", "tp=16,pp=1,dp=4"), "num_kv_heads=8 is not divisible by megatron tp=16"),
    (("--train", "tp=8,pp=3,dp=1"), "num_layers=80 is not divisible by pp"),
    (("--train", "tp=8,pp=2"), "--train needs dp="),
    (("--train", "tp=8,pp=2,dp=4", "--gen", "tp=3"), "does not divide the training tp·pp"),
    (("--train", "tp=1,pp=1,dp=3", "--gen", "tp=1,pp=3"), "generation pp=3 does not divide the 80 layers of the model "
     "(--gen pp=, parallel.gen.pp) (vLLM would split them unevenly); pick one of 1, 2, 4, 5, 8, 10, 16"),
    (("--train", "tp=8,pp=2,dp=4", "--gen", "dp=2"), "unknown size 'dp'"),
    (("--train", "tp=8,pp=2,dp=4,ppp=1"), "did you mean 'pp'?"),
    (("--train", "tp=8,pp=2,dp=4", "--grad-dtype", "fp16"), "grad_dtype='fp16'"),
    (("--train", "tp=8,pp=2,dp=4", "--gpu-memory", "0"), "must be positive"),
])
def test_bad_input_gives_one_line(args, message):
    if "--hf-config" not in args:
        args = ("--hf-config", LLAMA70B, *args)
    proc = cli("plan", *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:") and message in lines[0], proc.stderr


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    proc = cli("plan", "--hf-config", tmp_path, "--train", "tp=1,dp=1")
    assert proc.returncode != 0 and proc.stderr.strip() == \
        "hybridflow-mg: error: unsupported architecture 'GPT2LMHeadModel': supported are Llama, Qwen2 and Mistral " \
        "(*ForCausalLM / *ForSequenceClassification)"


# --- plan CONFIG: the model presets, checked against 80 GB GPUs ------------------------------------------
PRESETS = [("llama3-8b-grpo", 8), ("qwen2.5-7b-grpo", 8), ("llama3-70b-tp8pp2", 64), ("llama3-70b-tp4pp4", 64)]


@pytest.mark.parametrize("preset,gpus", PRESETS)
def test_every_preset_fits_80gb_gpus(preset, gpus):
    config = ROOT / "configs" / f"{preset}.yaml"
    plan = plan_json(config, "--gpus", gpus, "--gpu-memory", "80GB")
    assert plan["fits"] and plan["kv"]["fits"]
    assert plan["layout"]["world"] == gpus
    longest = plan["options"]["min_kv_tokens"]
    assert plan["kv"]["tokens_per_replica"] >= longest  # a whole longest sequence fits a replica's KV cache
    assert max(plan["peaks"].values()) <= 80 * GIB
    assert plan["options"]["with_ref"] and not plan["options"]["with_critic"]  # GRPO with KL in the loss
    text = cli("plan", config, "--gpus", gpus, "--gpu-memory", "80GB")
    assert text.returncode == 0 and "DOES NOT FIT" not in text.stdout and "training peak" in text.stdout


def test_the_70b_presets_reshard_at_their_minimum():
    tp8pp2 = plan_json(ROOT / "configs" / "llama3-70b-tp8pp2.yaml", "--gpus", 64)
    assert tp8pp2["reshard"]["formula_recv_fraction"] == "1/16"  # (d_g − 1)/(t·p) with d_g = 2, t·p = 16
    assert tp8pp2["layout"]["train"] == {"tp": 8, "pp": 2, "dp": 4, "vpp": 1}
    tp4pp4 = plan_json(ROOT / "configs" / "llama3-70b-tp4pp4.yaml", "--gpus", 64)
    assert tp4pp4["layout"]["train"] == {"tp": 4, "pp": 4, "dp": 4, "vpp": 1} and tp4pp4["layout"]["gen"]["tp"] == 8


def test_a_preset_that_does_not_fit_is_one_line_and_status_2():
    config = ROOT / "configs" / "llama3-8b-grpo.yaml"
    proc = cli("plan", config, "parallel.train.tp=1", "parallel.gen.tp=1", "--gpus", 8, "--gpu-memory", "80GB")
    assert proc.returncode == 2 and "DOES NOT FIT: the training peak exceeds 80.00 GiB" in proc.stdout
    assert proc.stderr.strip() == (f"hybridflow-mg: error: {config} does not fit 8 GPUs of 80 GiB: see DOES NOT FIT "
                                   "above; change parallel.train / parallel.gen or the lengths")
    assert cli("plan", config).returncode == 2  # --gpus is needed with a config


def test_vllm_needs_its_budget_free_when_the_engine_starts():
    """vLLM refuses to start unless gpu_memory_utilization × GPU is free; the trainer builds it after the
    training models, so a budget that fits alone may not fit beside them."""
    config = ROOT / "configs" / "llama3-8b-grpo.yaml"
    fits = plan_json(config, "--gpus", 8)
    state = fits["stages"][0]["resident"] - fits["stages"][0]["bytes"]["gen_weights"]
    assert fits["peaks"]["engine_start"] == state + 2 * GIB + int(0.42 * 80 * GIB)
    proc = cli("plan", config, "rollout.gpu_memory_utilization=0.6", "--gpus", 8)
    assert proc.returncode == 2 and "DOES NOT FIT: the vLLM engine start (lower rollout.gpu_memory_utilization)" in proc.stdout
