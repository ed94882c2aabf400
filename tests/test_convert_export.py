"""`hybridflow-mg convert` / `export` as users run them (single process): round trips and bad inputs."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from hybridflow_mg.models.hf_io import HFCheckpoint
from tests.clirun import cli
from tests.multirank import ROOT
from tests.tiny import llama_config, save_random_hf


def test_a_real_process_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "export", "--ckpt", str(tmp_path), "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, cfg in {"llama": llama_config(), "tied": llama_config(tie_word_embeddings=True),
                      "qwen2": llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
                      "rm": llama_config(architectures=["LlamaForSequenceClassification"], num_labels=1)}.items():
        out[name] = save_random_hf(cfg, root / name, shard_size="30KB")
    from hybridflow_mg.data.tokenizer import sentencepiece_to_hf, train_sentencepiece

    spm = train_sentencepiece(["the quick brown fox jumps over 12 lazy dogs"] * 50, root / "spm.model", vocab_size=40)
    sentencepiece_to_hf(spm, out["llama"])  # tokenizer files next to the model, to be carried along
    return out


@pytest.mark.parametrize("name", ["llama", "tied", "qwen2", "rm"])
def test_hf_convert_export_hf_is_bit_identical_at_every_layout(models, tmp_path, name):
    src = HFCheckpoint(models[name])
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        ckpt, out = tmp_path / f"ckpt{tp}{pp}", tmp_path / f"out{tp}{pp}"
        assert cli("convert", "--hf", models[name], "--out", ckpt, "--tp", tp, "--pp", pp).returncode == 0
        proc = cli("export", "--ckpt", ckpt, "--out", out, "--max-shard-size", "40KB")
        assert proc.returncode == 0, proc.stderr
        got = HFCheckpoint(out)
        assert set(got.weight_map) == set(src.weight_map)
        for tensor in src.weight_map:
            assert torch.equal(got.read(tensor), src.read(tensor)), (tp, pp, tensor)
        assert json.loads((out / "config.json").read_text())["architectures"] == \
            json.loads((models[name] / "config.json").read_text())["architectures"]


def test_export_is_loadable_by_transformers_with_its_tokenizer(models, tmp_path):
    import transformers

    assert cli("convert", "--hf", models["llama"], "--out", tmp_path / "ck", "--tp", 2, "--pp", 2).returncode == 0
    assert cli("export", "--ckpt", tmp_path / "ck", "--out", tmp_path / "out").returncode == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 33]])
    assert torch.equal(model(tokens).logits, reference(tokens).logits)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("quick fox").input_ids == transformers.AutoTokenizer.from_pretrained(models["llama"])("quick fox").input_ids


def _one_line_error(proc, message):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:") and message in lines[0], proc.stderr


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _one_line_error(cli("convert", "--hf", tmp_path / "m", "--out", tmp_path / "c"), "unsupported architecture 'GPT2LMHeadModel'")


def test_heads_and_layers_that_do_not_divide(models, tmp_path):
    _one_line_error(cli("convert", "--hf", models["llama"], "--out", tmp_path / "c", "--tp", 8), "not divisible by tp=8")
    _one_line_error(cli("convert", "--hf", models["llama"], "--out", tmp_path / "c", "--pp", 3), "not divisible by pp")
    assert not (tmp_path / "c" / "hybridflow.json").exists()


def test_shard_missing_from_the_index(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    (broken / sorted(set(index["weight_map"].values()))[1]).unlink()
    _one_line_error(cli("convert", "--hf", broken, "--out", tmp_path / "c"), "listed in")


def test_weight_shapes_not_matching_the_config(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    _one_line_error(cli("convert", "--hf", broken, "--out", tmp_path / "c"), "config.json implies")
    assert not (tmp_path / "c" / "hybridflow.json").exists()


def test_corrupt_and_missing_checkpoints(models, tmp_path):
    ckpt = tmp_path / "ck"
    assert cli("convert", "--hf", models["llama"], "--out", ckpt, "--tp", 2).returncode == 0
    shard = ckpt / "model" / "mp_rank_01_000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    _one_line_error(cli("export", "--ckpt", ckpt, "--out", tmp_path / "o"), "is corrupt")
    shard.unlink()
    _one_line_error(cli("export", "--ckpt", ckpt, "--out", tmp_path / "o"), "missing its shard")
    _one_line_error(cli("export", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "o"), "is not a hybridflow_mg checkpoint")
    assert not (tmp_path / "o").exists()


def test_generate_command_matches_transformers(models, tmp_path):
    """`hybridflow-mg generate --nproc 2`: HF → Megatron TP2 → reshard → vLLM TP1 (2 replicas), greedy."""
    import transformers

    from tests.tiny import llama_config, save_random_hf

    model_dir = save_random_hf(llama_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                            eos_token_id=2), tmp_path / "m")
    prompts = [[1, 17, 33, 5], [1, 9, 120, 44], [1, 200, 3]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "generate", "--hf", str(model_dir), "--train",
                           "tp=2,pp=1", "--gen", "tp=1", "--nproc", "2", "--prompts", str(tmp_path / "p.jsonl"),
                           "--greedy", "--max-tokens", "6", "--out", str(tmp_path / "out.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for row, prompt in zip(rows, prompts):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert row["prompt_ids"] == prompt and row["output_ids"] == want
        assert len(row["logprobs"]) == len(want)


def test_export_refuses_a_folder_holding_something_else(models, tmp_path):
    assert cli("convert", "--hf", models["llama"], "--out", tmp_path / "ck").returncode == 0
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    _one_line_error(cli("export", "--ckpt", tmp_path / "ck", "--out", tmp_path / "out"), "is not empty")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert cli("export", "--ckpt", tmp_path / "ck", "--out", tmp_path / "hf").returncode == 0
    assert cli("export", "--ckpt", tmp_path / "ck", "--out", tmp_path / "hf").returncode == 0  # replaces an export
