"""hybridflow_mg: RL post-training of LLMs on megatron-core, in the HybridFlow design.

Importing the package is cheap: no torch, megatron-core or vLLM is imported here, so the planning
commands (`hybridflow-mg grid`, `plan`) run instantly on any machine.
"""
__version__ = "0.1.0"
