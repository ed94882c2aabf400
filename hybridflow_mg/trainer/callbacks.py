"""Hooks into a `Trainer`: callbacks that observe the run, evaluators that measure the policy.

Callbacks and evaluators run on every rank (SPMD): every rank builds the same Trainer with the same
hooks, and an evaluator that generates takes part in collectives, so it must run everywhere. Only
the logging rank writes metrics; guard your own side effects with `trainer.is_logging_rank`.

    class PrintBest(Callback):
        def on_validation(self, step, metrics):
            ...

    def my_accuracy(trainer) -> dict[str, float]:         # an evaluator
        answers = trainer.generate(["2+3=", "7+5="])       # greedy, with the current policy
        return {"my_accuracy": sum(a[0] == t for a, t in zip(answers, ["5", "12"])) / 2}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hybridflow_mg.metrics.progress_bar import progress_bar

if TYPE_CHECKING:
    from hybridflow_mg.trainer.trainer import Trainer

Evaluator = Callable[["Trainer"], Mapping[str, float]]
"""`evaluator(trainer) -> {metric: value}`: called at the validation cadence with the policy before that
step's update; its metrics are logged with the step's (every sink of `run.loggers`)."""


class Callback:
    """Override the hooks you need; each default does nothing. A callback with state that must survive
    a checkpoint also defines `state_dict()` and `load_state_dict(state)`."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """After setup (and before the warm start): the trainer's parts exist."""

    def on_step_end(self, step: int, metrics: Mapping[str, float]) -> None:
        """After RL step `step` (1-based) was logged; `metrics` is what was logged for it."""

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        """After the evaluators ran before step `step`'s update; `metrics` holds theirs."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint of the policy after step `step` was completely written to `path`."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the last step and the final save, before the trainer closes."""


@dataclass(frozen=True)
class RegisteredEvaluator:
    """An evaluator with its name (the prefix of error messages) and cadence."""

    name: str
    fn: Evaluator
    every: int | None
    """Run before step 1 and every `every` steps; None follows `trainer.val_every`; 0 never."""

    def due(self, step: int, default_every: int) -> bool:
        every = default_every if self.every is None else self.every
        return bool(every) and (step == 1 or step % every == 0)

    def __call__(self, trainer: "Trainer") -> dict[str, float]:
        out = self.fn(trainer)
        if not isinstance(out, Mapping):
            raise TypeError(f"evaluator {self.name!r} returned {type(out).__name__}; return a dict of metrics")
        metrics: dict[str, float] = {}
        for key, value in out.items():
            metrics[str(key)] = _number(self.name, key, value)
        return metrics


def _number(name: str, key: Any, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"evaluator {name!r} returned {key!r}={value!r}, which is not a number") from None


def greedy_validation(trainer: "Trainer") -> dict[str, float]:
    """Greedy answers to the validation prompts (`data.val_files`), one per prompt, scored by the run's
    reward: `val_reward` (their mean reward) and, under `val/`, every metric one sample per prompt
    supports (`evaluation.response_metrics`: accuracy, response length mean and p95, truncation rate,
    distinct-1/2, bigram entropy, seq-rep-4, accuracy per data source). The diversity metrics read
    token ids, the stop token left out."""
    from hybridflow_mg.evaluation import response_metrics
    from hybridflow_mg.trainer.stages import decode_response

    run = trainer.run
    stops = {run.tokenizer.eos_id}
    total, scores, lengths, finish, tokens, sources = 0.0, [], [], [], [], []
    for batch in progress_bar(run.val_batches.epoch_batches(0), desc="validation", total=run.val_batches.num_batches,
                              enabled=trainer.is_logging_rank, leave=False):
        samples = [c.samples[0] for c in trainer.sample(batch.prompt_ids)]
        texts = [decode_response(run.tokenizer, s.token_ids) for s in samples]
        batch_scores = trainer.score(texts, batch.ground_truths, batch.data_sources, batch.extra_infos)
        total, scores = total + sum(batch_scores), scores + batch_scores  # val_reward summed as it always was
        lengths += [len(s.token_ids) for s in samples]
        finish += [s.finish_reason for s in samples]
        tokens += [s.without_stop(stops) for s in samples]
        sources += batch.data_sources
    metrics = {"val_reward": total / max(len(scores), 1)}
    if scores:
        metrics.update({f"val/{k}": v for k, v in response_metrics(
            scores=scores, lengths=lengths, finish_reasons=finish, tokens=tokens, data_sources=sources).items()})
    return metrics

