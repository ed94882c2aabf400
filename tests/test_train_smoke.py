"""`hybridflow-mg train --nproc 4` end to end, short: warm start, RL steps with actor + critic + reference
(GAE, KL in the loss), validation, metrics, the final checkpoint, and its HF export loading in
transformers. (The full quickstart, where learning is visible, is the README's main command.)"""
import json
import math
import os
import subprocess
import sys

import torch

from tests.multirank import ROOT


def test_training_run_end_to_end(tmp_path):
    overrides = [f"run.output_dir={tmp_path}", "run.name=smoke", "trainer.total_steps=3", "trainer.val_every=2",
                 "actor.warm_start.steps=4", "model.synthetic.num_warm_start=64", "model.synthetic.num_train=64",
                 "model.synthetic.num_val=16", "data.prompts_per_step=8", "rollout.n=4",
                 "algo.advantage.estimator=gae", "algo.kl.use_in_loss=true", "algo.kl.coef=0.01",
                 "actor.mini_batches=2", "actor.micro_batch_tokens=96", "trainer.save_every=2"]
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "train", "configs/quickstart.yaml", "--nproc", "4",
                           *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "smoke"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward_mean", "loss", "grad_norm", "kl", "critic/loss", "critic/grad_norm", "response_len"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert r["rollout_logprob_diff"] < 1e-3  # vLLM and the Megatron actor agree on the sampled tokens
        assert r["reshard_collectives"] >= 1
        assert 0 <= r["truncation_rate"] <= 1 and r["rollout_kl"] >= 0  # KL in the loss: the reference is built
        assert math.isclose(r["perf/tokens_per_s_per_rank"] * 4, r["perf/tokens_per_s"]) and r["perf/tokens_per_s"] > 0
        assert math.isclose(r["perf/response_tokens"], r["response_len"] * 8 * 4)  # prompts_per_step × rollout.n
    # the reference is the warm-started actor: KL(π_old ‖ π_ref) is exactly 0 before the first RL update
    assert rows[0]["rollout_kl"] == 0.0 < rows[2]["rollout_kl"]
    assert "val_reward" in rows[0] and "val_reward" in rows[1]
    for r in rows[:2]:  # the validation metrics of one greedy sample per prompt (evaluation.response_metrics)
        assert r["val/accuracy"] == r["val_reward"]  # exact-answer reward, format_score 0: mean reward = accuracy
        assert r["val/accuracy/synthetic/arithmetic"] == r["val/accuracy"]  # the only data source
        assert 1 <= r["val/response_len_mean"] <= 6 and 1 <= r["val/response_len_p95"] <= 6  # rollout.max_new_tokens
        for key in ("val/truncation_rate", "val/distinct_1", "val/distinct_2", "val/repetition_rate"):
            assert 0 <= r[key] <= 1, key
        assert r["val/ngram_entropy_2"] >= 0
    assert "mean reward per step" in proc.stdout
    # the final actor: a Megatron checkpoint that exports to an HF model transformers can run
    ckpt, hf = run / "checkpoints" / "final", tmp_path / "hf"
    assert subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "export", "--ckpt", str(ckpt), "--out", str(hf)],
                          cwd=ROOT, capture_output=True).returncode == 0
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "step_2" / "hybridflow.json").is_file()
