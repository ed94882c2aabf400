"""Throughput benchmarks of the RL step (issue 12): `bench step`, `bench rollout`, `bench train`.

- `measure.py`: model FLOPs, the measured GEMM ceiling, peak memory per stage, the machine.
- `step.py`: a whole RL step through the `Trainer`, and the JSON schema every benchmark here writes.
- `parts.py`: generation alone (`rollout`) and the actor update alone (`train`).

`commands/bench.py` is the entry point; `bench reshard` lives in `benchmarks/reshard.py`.
"""
