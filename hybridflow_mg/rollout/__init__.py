"""Rollout: the generation half of the 3D-HybridEngine — an in-process vLLM engine on every rank.

`config.py` holds the typed knobs (`RolloutConfig`) and the per-call sampling request (`Sampling`);
`vllm_engine.py` is the engine (`VLLMEngine`: generate, weight target for the resharder, sleep/wake);
`vllm_cpu.py` is the one place that knows how vLLM must be treated in-process and on CPU. Importing
this package imports neither torch nor vLLM.
"""
