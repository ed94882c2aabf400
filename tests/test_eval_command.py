"""`hybridflow-mg eval`: bad inputs are one line before any process starts; a real 2-rank evaluation of a
checkpoint against its own HF model writes every metric, each consistent with the samples file."""
import json
import os
import subprocess
import sys

import pytest

from tests.clirun import cli
from tests.multirank import ROOT
from tests.test_bad_inputs import no_start  # noqa: F401 (the fixture: launching fails the case)
from tests.tiny import llama_config, save_random_hf

PROBLEMS = [("12+5=", "17"), ("3+4=", "7"), ("20+2=", "22"), ("9+9=", "18")]

# A reward that splits samples of a random model into correct and wrong ones (by response length), so
# that accuracy, pass@k and maj@k are not all 0.
REWARD = """
def even_length(solution, ground_truth, *, data_source="", extra_info=None):
    return 1.0 if len(solution) % 2 == 0 else 0.0
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hybridflow_mg.data.tokenizer import sentencepiece_to_hf, train_sentencepiece

    root = tmp_path_factory.mktemp("eval")
    model = save_random_hf(llama_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, eos_token_id=2,
                                        bos_token_id=1), root / "m")  # head_dim 64: vLLM CPU attention
    spm = train_sentencepiece([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], root / "spm.model",
                              vocab_size=40)
    sentencepiece_to_hf(spm, model)
    assert cli("convert", "--hf", model, "--out", root / "ck", "--tp", 2).returncode == 0
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"data_source": "synthetic/arithmetic", "prompt": q,
                                        "reward_model": {"ground_truth": a}}) + "\n" for q, a in PROBLEMS))
    (root / "reward.py").write_text(REWARD)
    return root


def _bad(world, tmp_path, args, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("eval", *args, "--out", tmp_path / "e.json")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:"), proc.stderr
    assert message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even half
    return lines[0]


@pytest.mark.usefixtures("no_start")
def test_data_without_the_prompt_column(world, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "reward_model": {"ground_truth": "2"}}) + "\n")
    line = _bad(world, tmp_path, [world / "m", "--data", data], f"--data '{data}' has no column 'prompt'")
    assert "columns: question, reward_model" in line and "--prompt-key" in line


@pytest.mark.usefixtures("no_start")
def test_a_model_directory_that_is_neither_format(world, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    line = _bad(world, tmp_path, [tmp_path, "--data", world / "val.jsonl"], f"MODEL '{tmp_path}' is neither")
    assert "config.json" in line and "hybridflow.json" in line


@pytest.mark.usefixtures("no_start")
def test_n_zero(world, tmp_path):
    _bad(world, tmp_path, [world / "m", "--data", world / "val.jsonl", "--n", "0"], "--n must be at least 1, got 0")


@pytest.mark.usefixtures("no_start")
def test_a_checkpoint_needing_more_processes_says_how_many(world, tmp_path):
    _bad(world, tmp_path, [world / "ck", "--data", world / "val.jsonl"], "add --nproc 2")


def test_eval_of_a_checkpoint_against_its_hf_model(world, tmp_path):
    """The tp=2 checkpoint at its saved layout (2 ranks; vLLM tp 1, 2 replicas), the HF model as the
    reference: the same weights, so the KL is exactly 0; every metric recomputed from the samples."""
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "eval", str(world / "ck"), "--data",
                           str(world / "val.jsonl"), "--n", "2", "--max-tokens", "4", "--nproc", "2", "--gen", "tp=1",
                           "--ref", str(world / "m"), "--reward", f"{world / 'reward.py'}:even_length", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model_format"] == "checkpoint" and report["config"]["world"] == 2 and report["date"]
    m = report["metrics"]
    for key in ("accuracy", "reward_mean", "pass@1", "pass@2", "maj@1", "maj@2", "response_len_mean",
                "response_len_p95", "truncation_rate", "distinct_1", "distinct_2", "ngram_entropy_2",
                "repetition_rate", "kl_ref", "kl_ref_k1", "by_data_source"):
        assert key in m, key
    rows = [json.loads(line) for line in open(report["samples_file"])]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, k) for p in range(4) for k in range(2)]
    correct = [r["reward"] >= 1.0 for r in rows]
    assert m["num_samples"] == 8 and m["accuracy"] == sum(correct) / 8 == m["pass@1"]
    assert m["pass@2"] == sum(correct[2 * p] or correct[2 * p + 1] for p in range(4)) / 4
    for r in rows:
        assert r["reward"] == (1.0 if len(r["response"]) % 2 == 0 else 0.0)
        assert r["answer"] == (" ".join(r["response"].lower().split()) or None)  # no rule named: the text votes
    first_voter = [rows[2 * p] if rows[2 * p]["answer"] is not None else rows[2 * p + 1] for p in range(4)]
    assert m["maj@2"] == sum(v["answer"] is not None and v["correct"] for v in first_voter) / 4  # a 1–1 tie: the first
    assert m["response_len_mean"] == sum(len(r["response_ids"]) for r in rows) / 8
    assert m["truncation_rate"] == sum(r["finish_reason"] == "length" for r in rows) / 8
    assert m["kl_ref"] == 0.0 and m["kl_ref_k1"] == 0.0 and all(r["kl_ref"] == 0.0 for r in rows)
    assert m["by_data_source"]["synthetic/arithmetic"]["accuracy"] == m["accuracy"]


def test_answers_vote_together_when_written_differently():
    from hybridflow_mg.evaluation.answers import answer_of

    assert answer_of("so #### 1,000", "openai/gsm8k") == answer_of("#### 1000.0", "openai/gsm8k") == "1000"
    assert answer_of("no marker 12", "openai/gsm8k") is None  # strict, as the reward reads it
    assert answer_of(r"\boxed{\dfrac12}", "lighteval/MATH") == answer_of(r"\boxed{0.5}", "math") == "1/2"
    assert answer_of(" 64 ", "synthetic/arithmetic") == "64" and answer_of("", "synthetic/arithmetic") is None
    assert answer_of("Hello   World", "my/data") == "hello world"  # no rule: the normalised text


def test_summary_by_hand():
    """2 prompts × 3 samples. Prompt 0: correct, wrong (answer 5), wrong (answer 5) → c=1, the vote
    goes to 5 (wrong). Prompt 1: wrong (no answer), correct (7), correct (7) → c=2, the vote to 7."""
    from hybridflow_mg.evaluation.summary import EvalSample, summarize

    def s(p, k, reward, answer, ids, finish="stop", source="a"):
        return EvalSample(prompt_index=p, sample_index=k, data_source=source, prompt="q", ground_truth="g",
                          response_ids=ids, response="", finish_reason=finish, reward=reward, answer=answer,
                          diversity_ids=ids[:-1] if finish == "stop" else ids)

    samples = [s(0, 0, 1.0, "4", [1, 2]), s(0, 1, 0.0, "5", [3, 2]), s(0, 2, 0.0, "5", [3, 2]),
               s(1, 0, 0.0, None, [4, 4, 4, 4, 4], "length", "b"), s(1, 1, 1.0, "7", [5, 2], source="b"),
               s(1, 2, 1.0, "7", [5, 2], source="b")]
    m = summarize(samples, 3)
    assert m["accuracy"] == m["pass@1"] == 0.5  # (1/3 + 2/3) / 2
    assert m["pass@2"] == pytest.approx(((1 - 1 / 3) + 1.0) / 2)  # 1 − C(2,2)/C(3,2); 1 − C(1,2)/C(3,2) = 1
    assert m["pass@3"] == 1.0
    assert m["maj@1"] == 0.5  # prompt 0's first answer is right; prompt 1's first has none
    assert m["maj@2"] == 1.0  # prompt 0: 4 and 5 tie, the first (4, right) wins; prompt 1: only 7 votes
    assert m["maj@3"] == 0.5  # prompt 0: 5 wins 2–1 (wrong); prompt 1: 7
    assert m["response_len_mean"] == 15 / 6 and m["truncation_rate"] == 1 / 6
    assert m["by_data_source"]["a"]["pass@3"] == 1.0 and m["by_data_source"]["b"]["accuracy"] == 2 / 3
    assert "kl_ref" not in m


def test_a_checkpoints_reference_is_a_policy_and_its_critic_is_not(world, tmp_path):
    """`--ref RUN/checkpoints/final/reference` (a warm-started run's reference) is read like an actor."""
    import shutil

    from hybridflow_mg.checkpoint.megatron import META
    from hybridflow_mg.evaluation.inputs import resolve_model

    shutil.copytree(world / "ck" / "tokenizer", tmp_path / "tokenizer")  # tmp_path stands in for the checkpoint
    for role in ("reference", "critic"):
        where = tmp_path / role
        shutil.copytree(world / "ck", where)
        shutil.rmtree(where / "tokenizer")  # saved only with the actor
        meta = json.loads((where / META).read_text())
        (where / META).write_text(json.dumps({**meta, "role": role}))
        if role == "reference":
            source = resolve_model(str(where), "--ref")
            assert source.format == "checkpoint" and source.tokenizer_dir == tmp_path / "tokenizer"
        else:
            with pytest.raises(ValueError, match=r"holds critic weights \(a value head\), not a policy"):
                resolve_model(str(where), "--ref")
