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
    assert cfg.stop_token_ids == (2, 7) and not s.greedy and cfg.sampling(temperature=0).greedy
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
        assert out == dict(block_size=None, kv_cache_memory_bytes=vllm_cpu.DEFAULT_CPU_KV_CACHE_BYTES,
                           enforce_eager=True)
        assert base["enable_sleep_mode"] is True  # the caller's dict is not changed
        with pytest.raises(ValueError, match="block_size=48: .* multiple of 32"):
            vllm_cpu.cpu_engine_kwargs({**base, "block_size": 48}, head_dim=64)
        with pytest.raises(ValueError, match=r"head_dim=16 .* one of \[64"):
            vllm_cpu.cpu_engine_kwargs(base, head_dim=16)
