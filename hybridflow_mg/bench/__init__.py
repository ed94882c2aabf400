"""Throughput benchmarks of the RL step (issue 12): `bench step`, `bench rollout`, `bench train`.

- `measure.py`: model FLOPs, the measured GEMM ceiling, peak memory per stage, the machine.
- `step.py`: a whole RL step through the `Trainer`, and the JSON schema every benchmark here writes.
- `parts.py`: generation alone (`rollout`) and the actor update alone (`train`).
- `scale.py`: growth exponents of reshard time and bytes (depth, world size) and step time (samples).
- `report.py`: PNG charts and the results table of the JSONs; `suite.py`: `bench all`, every part into one folder.
- `peer.py`: TRL's GRPOTrainer on the same model and settings, in its own environment.

`commands/bench.py` is the entry point; `bench reshard` lives in `benchmarks/reshard.py`.
"""
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
"""Where benchmark JSONs, pictures and the results README live (`benchmarks/results/` of the checkout)."""
