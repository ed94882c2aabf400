"""Rollout configs and the process-state bookkeeping of vllm_cpu, in one process (no engine)."""
import gc
import importlib.util
import os
import random

import pytest
import torch

from hybridflow_mg.rollout.config import RolloutConfig, Sampling
from hybridflow_mg.rollout.vllm_cpu import ProcessState, preserved_process_state


@pytest.mark.parametrize("key,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
    ("stop_token_ids", [2, -1]), ("stop_token_ids", "2"), ("seed", -3), ("dtype", "fp8"), ("block_size", 0),
    ("logprobs_mode", "final"), ("gpu_memory_utilization", 0.0), ("kv_cache_memory_bytes", -1),
    ("max_num_seqs", True), ("enforce_eager", "yes"), ("enable_sleep_mode", 1),
])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=key):
        RolloutConfig(**{key: value})


def test_response_must_fit_in_the_model_length():
    with pytest.raises(ValueError, match="max_new_tokens=128 .*max_model_len=128"):
        RolloutConfig(max_new_tokens=128, max_model_len=128)


def test_sampling_from_config_with_overrides_and_seeds():
    cfg = RolloutConfig(n=4, temperature=0.7, top_k=20, stop_token_ids=[2, 7], seed=11)
    s = cfg.sampling(seed=100, max_new_tokens=9)
    assert s == Sampling(n=4, temperature=0.7, top_k=20, stop_token_ids=(2, 7), seed=100, max_new_tokens=9)
    assert cfg.stop_token_ids == (2, 7) and not s.greedy and cfg.sampling(temperature=0, n=1).greedy
    with pytest.raises(ValueError, match="n=4 with temperature=0: greedy decoding gives n identical samples"):
        cfg.sampling(temperature=0)
    # sample i of prompt j uses seed + j·n + i: prompt seeds never overlap within a call
    assert [s.request_seed(j) for j in range(3)] == [100, 104, 108]
    with pytest.raises(ValueError, match="temperature"):
        cfg.sampling(temperature=-1)
    hash(s)  # frozen: usable as a key, equal on every rank


def test_process_state_restores_rngs_threads_gc_and_env():
    import numpy as np

    os.environ["HF_TEST_KEEP"] = "1"
    saved_set_num_threads = torch.set_num_threads
    with preserved_process_state("test") as before:
        torch.manual_seed(99), random.seed(99), np.random.seed(99)
        torch.set_num_threads = lambda n: None  # what CPUWorker.init_device does
        gc.freeze()
        os.environ["LD_PRELOAD"] = "/x/libgomp.so"
        os.environ["HF_TEST_KEEP"] = "2"
        os.environ["VLLM_HF_TEST"] = "kept"  # vLLM's own variables stay as vLLM left them
    after = ProcessState.capture()
    assert torch.equal(before.rng["torch"], after.rng["torch"]) and before.rng["python"] == after.rng["python"]
    assert np.array_equal(before.rng["numpy"][1], after.rng["numpy"][1])
    assert torch.set_num_threads is saved_set_num_threads and gc.get_freeze_count() == before.gc_frozen
    assert os.environ.get("LD_PRELOAD") == before.env.get("LD_PRELOAD") and os.environ["HF_TEST_KEEP"] == "1"
    assert os.environ.pop("VLLM_HF_TEST") == "kept"
    del os.environ["HF_TEST_KEEP"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_cpu_engine_arguments():
    from hybridflow_mg.rollout import vllm_cpu

    with preserved_process_state():  # importing vLLM sets env vars the later launches would inherit
        vllm_cpu.import_vllm()
        base = dict(block_size=None, kv_cache_memory_bytes=None, enable_sleep_mode=True, enforce_eager=None)
        out = vllm_cpu.cpu_engine_kwargs(base, head_dim=128)
        assert out == dict(block_size=None, kv_cache_memory_bytes=256 << 20,
                           enforce_eager=True)
        assert base["enable_sleep_mode"] is True  # the caller's dict is not changed
        with pytest.raises(ValueError, match="block_size=48: .* multiple of 32"):
            vllm_cpu.cpu_engine_kwargs({**base, "block_size": 48}, head_dim=64)
        with pytest.raises(ValueError, match=r"head_dim=16 .* one of \[64"):
            vllm_cpu.cpu_engine_kwargs(base, head_dim=16)


def test_the_kv_cache_check_counts_bytes_per_token_and_names_the_options_given():
    from hybridflow_mg.models.layouts import ModelDims
    from hybridflow_mg.rollout import kv_cache

    # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32 → 2·30·3·64·4 = 46080 bytes per token on one rank
    dims = ModelDims(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, ffn_hidden_size=1536,
                     vocab_size=49152)
    assert kv_cache.bytes_per_token(dims, 1, 4) == 46080
    assert kv_cache.bytes_per_token(dims, 3, 4) == 46080 // 3
    assert kv_cache.bytes_per_token(dims, 9, 2) == 2 * 30 * 1 * 64 * 2  # KV heads replicated past gen_tp = 3
    assert kv_cache.bytes_per_token(dims, 1, 4, gen_pp=3) == 2 * 10 * 3 * 64 * 4  # a stage caches its 10 layers
    assert kv_cache.element_bytes("auto", {"torch_dtype": "bfloat16"}) == 2
    kv_cache.check_fits(5000, 256 << 20, dims=dims, gen_tp=1, element=4)  # 230 MB fits 256 MiB
    with pytest.raises(ValueError, match=r"^rollout.max_model_len=8192 tokens need 360 MiB of KV cache per rank "
                                         r"\(46080 bytes per token\), more than rollout.kv_cache_memory_bytes=268435456 "
                                         r"holds \(about 5825 tokens\); raise rollout.kv_cache_memory_bytes to at least"):
        kv_cache.check_fits(8192, 256 << 20, dims=dims, gen_tp=1, element=4)
    with pytest.raises(ValueError, match=r"^--max-model-len=8192 .* more than --kv-cache-mb=256 \(268435456 bytes\)"):
        kv_cache.check_fits(8192, 256 << 20, dims=dims, gen_tp=1, element=4, names=kv_cache.GENERATE_OPTIONS)
    kv_cache.check_fits(10 ** 9, None, dims=dims, gen_tp=1, element=4)  # GPU without a set size: vLLM decides
    # vLLM 0.32's refusal, as printed on CPU, in our words
    vllm_says = ValueError("To serve at least one request with the model's max seq len (8192), (0.35 GiB KV cache is "
                           "needed, which is larger than the available KV cache memory (0.24 GiB). Based on the "
                           "available memory, the estimated maximum model length is 5632. Try increasing "
                           "`gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing "
                           "`max_model_len` when initializing the engine.")
    said = str(kv_cache.explain_engine_error(vllm_says, kv_cache.GENERATE_OPTIONS))
    assert said == ("--max-model-len=8192 tokens need 0.35 GiB of KV cache per rank, more than the 0.24 GiB the engine "
                    "has (--kv-cache-mb); raise --kv-cache-mb or lower --max-model-len")
    assert kv_cache.explain_engine_error(ValueError("something else")) is None


def test_the_engine_holds_what_the_run_needs_unless_told_otherwise():
    from hybridflow_mg.models.hf_spec import spec_from_hf
    from hybridflow_mg.trainer.config import ModelConfig, TrainConfig
    from hybridflow_mg.trainer.inputs import engine_max_model_len
    from hybridflow_mg.data.config import DataConfig
    from tests.tiny import llama_config

    def cfg(**rollout):
        return TrainConfig(model=ModelConfig(path="m"),
                           data=DataConfig(train_files=["t.parquet"], max_prompt_length=96),
                           rollout=RolloutConfig(n=2, max_new_tokens=40, **rollout))

    long_context = spec_from_hf(llama_config(max_position_embeddings=8192))
    short_context = spec_from_hf(llama_config(max_position_embeddings=128))
    assert engine_max_model_len(cfg(), long_context) == 96 + 40  # not the advertised 8192
    assert engine_max_model_len(cfg(), short_context) == 128  # capped at the context
    assert engine_max_model_len(cfg(max_model_len=1000), long_context) == 1000  # as told
