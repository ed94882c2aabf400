"""The RL training loop and the model workers it drives (HybridFlow's dataflow on megatron-core)."""
