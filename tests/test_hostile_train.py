"""Hostile input to `hybridflow-mg train` (issue 16): every case one line, the documented exit status,
and no run directory left behind.

The table runs `train --nproc 2` in this process: everything in it must be caught by the launching
process before a worker starts (`commands/train.py: preflight`, `trainer/inputs.py`). The last two
tests are real 2-rank runs: a reward function that returns NaN on one rank, and one that blocks on one
rank under `dist.timeout_minutes=1`.
"""
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import trainrun
from tests.clirun import cli
from tests.tiny import llama_config, save_random_hf

ROW = {"prompt": [{"role": "user", "content": "1+1="}], "data_source": "openai/gsm8k",
       "reward_model": {"ground_truth": "2", "style": "rule"}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from hybridflow_mg.data.tokenizer import sentencepiece_to_hf, train_sentencepiece

    root = tmp_path_factory.mktemp("hostile")
    texts = ["what is 1+1? the answer is 2.", "add 12 and 30, then say 42", "user assistant system"] * 20
    sp = train_sentencepiece(texts, root / "sp.model", vocab_size=64)
    model = save_random_hf(llama_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=128), root / "m")
    sentencepiece_to_hf(sp, model, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    save_random_hf(llama_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
                          root / "no_tokenizer")
    save_random_hf(llama_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=16),
                   root / "small_vocab")  # fewer embedding rows than the tokenizer of "m" has ids
    pq.write_table(pa.Table.from_pylist([ROW] * 4), root / "good.parquet")
    pq.write_table(pa.Table.from_pylist([{**ROW, "prompt": 5}] * 4), root / "int_prompts.parquet")
    lines = [json.dumps(ROW)] * 2 + ['{"prompt": "cut off']
    (root / "broken.jsonl").write_text("\n".join(lines) + "\n")
    (root / "truth_later.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    (root / "bad_ids.jsonl").write_text(json.dumps({**ROW, "prompt": [1, 100000]}) + "\n")
    (root / "info_later.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "extra_info": [1]}) + "\n")
    (root / "dir.parquet").mkdir()
    (root / "a_file").write_text("")
    (root / "preset.yaml").write_text(f"model: {{path: {model}}}\ndata: {{train_files: [{root / 'good.parquet'}], "
                                      "prompts_per_step: 2}\nrollout: {n: 2, max_new_tokens: 8}\n")
    (root / "child.yaml").write_text("base: nope.yaml\n")
    return root


def _train_files(name):
    return lambda root: [f"data.train_files=[{root / name}]"]


CASES = {  # name: (extra arguments given the fixture's root, a part of the one line)
    "prompt column of integers": (_train_files("int_prompts.parquet"), "row 0: a prompt must be text"),
    "broken jsonl line after line 1": (_train_files("broken.jsonl"), "line 3 is not valid JSON"),
    "ground truth missing in a later row": (_train_files("truth_later.jsonl"), "row 1 has no 'reward_model.ground_truth'"),
    "token id outside the vocabulary": (_train_files("bad_ids.jsonl"), "token id 100000 is outside"),
    "extra_info not an object in a later row": (_train_files("info_later.jsonl"), "'extra_info' must be an object"),
    "data path that is a directory": (_train_files("dir.parquet"), "is a directory; list the files"),
    "missing tokenizer": (lambda root: [f"model.path={root / 'no_tokenizer'}"], "has neither"),
    "tokenizer with ids past the model's vocab_size": (
        lambda root: [f"model.path={root / 'small_vocab'}", f"data.tokenizer={root / 'm'}"],
        "/m/tokenizer.json' produces ids up to 63 (special and added tokens included) but the model has vocab_size 16"),
    "a prompt too long": (lambda root: ["data.max_prompt_length=1"], "more than data.max_prompt_length=1; raise it"),
    "all prompts too long, dropping": (lambda root: ["data.max_prompt_length=1", "data.truncation=drop"],
                                       "are longer than max_prompt_length=1"),
    "a group estimator with one sample per prompt": (lambda root: ["rollout.n=1"],
                                                     "rollout.n=1 gives one-member groups"),
    "max_new_tokens beyond the context": (lambda root: ["rollout.max_new_tokens=500"],
                                          "exceed the model's max_position_embeddings"),
    "a stop token outside the tokenizer": (lambda root: ["rollout.stop_token_ids=[64]"],
                                           "rollout.stop_token_ids: 64 is not a token id of the tokenizer"),
    "pipeline stages that do not split the layers": (
        lambda root: ["parallel.train.pp=2", "parallel.train.vpp=2"],
        "parallel.train (tp=1, pp=2, vpp=2) cannot split model.path"),
    "KV cache smaller than one sequence": (lambda root: ["rollout.kv_cache_memory_bytes=1024"],
                                           "rollout.max_model_len (left out: data.max_prompt_length + "
                                           "rollout.max_new_tokens)=128 tokens need"),
    "max_model_len beyond the context": (lambda root: ["rollout.max_model_len=1000"],
                                         "rollout.max_model_len=1000 exceeds the model's max_position_embeddings = 128"),
    "output_dir is a file": (lambda root: [f"run.output_dir={root / 'a_file'}"], "is a file, not a directory"),
    "output_dir under a file": (lambda root: [f"run.output_dir={root / 'a_file' / 'x'}"], "is a file"),
    "output_dir not writable": (lambda root: ["run.output_dir=/sys/hybridflow_test"], "cannot write in /sys"),
    "nproc 0": (lambda root: ["--nproc", "0"], "--nproc must be at least 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_launch_and_leaves_nothing(root, case, tmp_path):
    extra, message = CASES[case]
    args = extra(root)
    output = [] if any(a.startswith("run.output_dir=") for a in args) else [f"run.output_dir={tmp_path / 'runs'}"]
    nproc = [] if "--nproc" in args else ["--nproc", "2"]
    proc = cli("train", root / "preset.yaml", *nproc, *output, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()  # no half-created run directory


def test_a_missing_base_is_traced_to_the_file_naming_it(root):
    proc = cli("config", root / "child.yaml")
    assert proc.returncode == 2
    assert f"config file '{root / 'child.yaml'}': base: 'nope.yaml' is not a file" in proc.stderr


def _reward_file(tmp_path, body: str) -> str:
    path = tmp_path / "rewards.py"
    path.write_text("import os, time\n\n\ndef score(solution, ground_truth, *, data_source='', extra_info=None):\n"
                    + body)
    return f"reward.fn={path}:score"


def test_a_nan_reward_on_one_rank_stops_the_run_naming_function_rank_and_row(tmp_path):
    fn = _reward_file(tmp_path, "    return float('nan') if os.environ['RANK'] == '1' else 1.0\n")
    proc = trainrun.run(tmp_path, "nan", "parallel.train.tp=1", "trainer.total_steps=2", "trainer.save_every=1", fn,
                        nproc=2, timeout=300)
    lines = trainrun.error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("hybridflow-mg: error: rank 1: data row ")
    assert "(data_source 'synthetic/arithmetic'): reward function " in lines[0] and ":score' returned nan (float)" in lines[0]
    assert not (tmp_path / "nan" / "checkpoints").exists() or not any((tmp_path / "nan" / "checkpoints").iterdir())


def test_a_rank_that_blocks_is_named_within_the_timeout(tmp_path):
    """`dist.timeout_minutes=1` governs the groups the step waits in, and the line names the blocked rank."""
    fn = _reward_file(tmp_path, "    if os.environ['RANK'] == '1':\n        time.sleep(3600)\n    return 1.0\n")
    start = time.monotonic()
    proc = trainrun.run(tmp_path, "stuck", "parallel.train.tp=1", "trainer.total_steps=2", "dist.timeout_minutes=1",
                        "actor.warm_start.steps=0", fn, nproc=2, timeout=300)
    assert time.monotonic() - start < 180
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert trainrun.error_lines(proc) == [trainrun.error_lines(proc)[0]]
    line = trainrun.error_lines(proc)[0]
    assert line.startswith("hybridflow-mg: error: rank 1 stopped making progress in stage 'reward' of step 1; the other "
                           "ranks waited in 'reward agreement' until dist.timeout_minutes=1 ran out"), proc.stderr[-2000:]


def test_a_failed_setup_leaves_no_half_created_run_directory(tmp_path):
    proc = trainrun.run(tmp_path, "failed", "parallel.train.tp=1", nproc=2, fault="raise:setup:0", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = trainrun.error_lines(proc)
    assert line.endswith(": RuntimeError: injected fault (HYBRIDFLOW_FAULT) at 'setup' in step 0 (HYBRIDFLOW_DEBUG=1 "
                         "shows the traceback)"), line
    assert not (tmp_path / "failed").exists()
