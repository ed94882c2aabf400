"""The in-process vLLM engine under torchrun on CPU (gloo), against HF transformers.

Two launches, one engine per rank each: 2 ranks at t_g = 1 (train tp=2 → gen tp=1) and 4 ranks at
t_g = 2 with HybridFlow's strided generation TP groups [0, 2], [1, 3] (train tp=4 → gen tp=2).
Checks: fp32 greedy = HF generate, logprobs = HF log_softmax (1e-4), direct weight updates take effect
(twice), vocab padding never sampled, nor ids past a smaller tokenizer (`num_decodable_ids`), seeded
sampling repeats and agrees within a TP group, the trainer's RNG / threads / env / process groups
survive the engine, and shutdown (explicit, or at exit) leaves the default group alone.
"""
import importlib.util

import pytest

from tests.multirank import assert_rank_check, check_names, results

# find_spec, not import: importing vLLM here would change this process's env, which the launches inherit
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

LAUNCHES = [("tests.ranks.rollout2", 2), ("tests.ranks.rollout4", 4)]
CASES = [(module, nproc, name) for module, nproc in LAUNCHES for name in check_names(module)]


@pytest.mark.parametrize("module,nproc,name", CASES, ids=[f"{n}ranks-{name}" for _, n, name in CASES])
def test_rollout_on_ranks(module, nproc, name):
    assert_rank_check(module, nproc, name)


@pytest.mark.parametrize("module,nproc", LAUNCHES, ids=[f"{n}ranks" for _, n in LAUNCHES])
def test_launch_exits_cleanly(module, nproc):
    """Every rank exits 0: vLLM's teardown (explicit in rollout2, at exit in rollout4) kills nothing."""
    launch = results(module, nproc)["_launch"]
    assert launch["returncode"] == 0, launch["tail"]
    assert "Traceback" not in launch["tail"], launch["tail"]
