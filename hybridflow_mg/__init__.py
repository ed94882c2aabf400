"""hybridflow_mg: RL post-training of LLMs on megatron-core, in the HybridFlow design.

    from hybridflow_mg import Trainer
    Trainer.from_yaml("configs/quickstart.yaml", overrides=["trainer.total_steps=20"]).fit()

Importing the package is cheap: no torch, megatron-core or vLLM is imported here (`Trainer` is
loaded on first use), so the planning commands (`hybridflow-mg grid`, `plan`) run instantly on any
machine.
"""
__version__ = "0.1.0"

__all__ = ["Callback", "Trainer", "__version__"]


def __getattr__(name: str):
    if name == "Trainer":
        from hybridflow_mg.trainer.trainer import Trainer

        return Trainer
    if name == "Callback":
        from hybridflow_mg.trainer.callbacks import Callback

        return Callback
    raise AttributeError(f"module 'hybridflow_mg' has no attribute {name!r}")
