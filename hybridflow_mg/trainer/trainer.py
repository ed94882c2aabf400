"""`Trainer`: one object that owns an RL run, from setup to close. The Python API and the CLI's engine.

    from hybridflow_mg import Trainer

    trainer = Trainer.from_yaml("configs/quickstart.yaml", overrides=["trainer.total_steps=20"])
    trainer.register_evaluator(my_accuracy)       # fn(trainer) -> {metric: value}
    trainer.fit()                                 # setup, warm start, steps, checkpoints, curves, close

Under a launcher every rank builds the same Trainer (SPMD); without one it runs as a world of one
process (a notebook). The parts of a run (grid, roles, vLLM engine, resharder, data, rewards,
trackers) are built by `setup()` into `trainer.run` (a `setup.Run`, which lists them with their
types); `fit()` is the outer loop (cadence of validation, logging, checkpoints), `train_step()` one
iteration (`loop.rl_step`). `state_dict()` gathers everything that changes while training, so the
checkpoint code never needs to know what a role is.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from hybridflow_mg.rewards.base import RewardFn
from hybridflow_mg.trainer.callbacks import Callback, Evaluator, RegisteredEvaluator, greedy_validation
from hybridflow_mg.trainer.config import TrainConfig

if TYPE_CHECKING:
    from hybridflow_mg.rollout.vllm_engine import Completion


class Trainer:
    """An RL post-training run (PPO, GRPO, ...) on megatron-core with in-process vLLM rollouts.

    Args:
        config: the full config (`TrainConfig`); see `from_yaml` to read a preset.
        reward_fn: a Python reward function, `fn(solution, ground_truth, *, data_source, extra_info) ->
            float`, used instead of the config's `reward` section; it may carry a `needs` attribute
            (see `utils.registry.NEEDS`).
        callbacks: `Callback` objects, called in order on every rank.
        evaluators: functions `fn(trainer) -> {metric: value}`, registered as by `register_evaluator`.

    Raises TypeError for a config that is not a `TrainConfig` or a `reward_fn` that is not callable,
    and ValueError (one line naming the key) when `reward_fn` is given while the config names a reward
    function too. Nothing heavy happens before `setup()` (which `fit()` calls), so constructing a
    Trainer is cheap. One Trainer runs per process at a time; `fit()` closes it.
    """

    def __init__(self, config: TrainConfig, *, reward_fn: RewardFn | None = None,
                 callbacks: Iterable[Callback] = (), evaluators: Iterable[Evaluator] = ()):
        from hybridflow_mg.utils.imports import import_user_modules

        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer needs a TrainConfig, got {type(config).__name__}; use Trainer.from_yaml(path)")
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        if reward_fn is not None and (config.reward.fn or config.reward.mix or config.reward.by_data_source):
            raise ValueError("reward_fn is given and the config names reward functions too (reward.fn, reward.mix "
                             "or reward.by_data_source); keep one of the two")
        import_user_modules(config.run.imports)  # a config built in Python has not imported them yet
        self.config = config
        self.reward_fn = reward_fn
        self.callbacks: list[Callback] = list(callbacks)
        self.evaluators: list[RegisteredEvaluator] = []
        for fn in evaluators:
            self.register_evaluator(fn)
        self.run = None
        """The run's parts (`setup.Run`), once `setup()` has run; None before and after `close()`."""
        self.step = 0
        """RL steps completed."""
        self.metrics: dict[str, float] = {}
        """The last step's metrics."""
        self.preempted: str | None = None
        """Why `fit()` stopped early with a checkpoint (a signal's name, or "deadline"); the CLI then
        exits with status 75 (`EXIT_RESUMABLE`)."""
        self.bad_steps = 0
        """Consecutive steps whose update was skipped for a non-finite loss or gradient."""
        self._saved_step: int | None = None  # the step of the newest checkpoint this trainer wrote
        self._vllm_step: int | None = None  # the actor of which step vLLM holds (None: not synced)
        self._generating = False  # inside a generation phase (weights synced, KV cache awake)
        self._closed = False
        from hybridflow_mg.parallel.launch import discover

        self._rank = discover().rank

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = (), **kwargs: Any) -> "Trainer":
        """A Trainer from a YAML preset and `section.key=value` overrides (the modules of `run.imports`
        are imported before the names are checked); `kwargs` go to the constructor."""
        from hybridflow_mg.config.load import load_config

        return cls(load_config(TrainConfig, path, list(overrides)), **kwargs)

    # --- hooks ---------------------------------------------------------------------------------------------
    def register_evaluator(self, fn: Evaluator, *, name: str | None = None, every: int | None = None) -> Evaluator:
        """Run `fn(trainer) -> {metric: value}` before step 1 and every `every` steps (default
        `trainer.val_every`), with the policy before that step's update. Its metrics are logged with the
        step's; a metric name another evaluator or the step already uses is an error. Returns `fn`, so
        this works as a decorator."""
        if not callable(fn):
            raise TypeError(f"an evaluator must be callable, got {type(fn).__name__}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"every must be an integer ≥ 0 (0 = never), got {every!r}")
        self.evaluators.append(RegisteredEvaluator(name or getattr(fn, "__name__", repr(fn)), fn, every))
        return fn

    def add_callback(self, callback: Callback) -> Callback:
        """Append `callback` (called after those given to the constructor); returns it."""
        self.callbacks.append(callback)
        return callback

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    # --- the run -------------------------------------------------------------------------------------------
    def setup(self):
        """Build the run's parts on every rank (collective); idempotent. Returns `self.run`.

        With `trainer.resume` pointing at a checkpoint (by default the newest complete one of the run
        directory), the models are built from its weights and the rest of the training state is
        loaded: `self.step` is then the checkpoint's step."""
        if self._closed:
            raise RuntimeError("this Trainer was closed; build a new one")
        if self.run is None:
            from hybridflow_mg.trainer.bootstrap import abandon_setup, setup_finished
            from hybridflow_mg.trainer.setup import build_run

            try:
                self.run = build_run(self.config, reward_fn=self.reward_fn)
                self.config = self.run.cfg  # with the synthetic run's paths filled in
                if self.run.resume is not None:
                    from hybridflow_mg.trainer.checkpoint import load_checkpoint

                    self._load_own_state(load_checkpoint(self.run, self.run.resume, self.run.resume_marker))
                    if self.is_logging_rank:
                        print(f"resumed from {self.run.resume} at step {self.step}", flush=True)
            except BaseException:
                if self.is_logging_rank:  # a run directory this setup created goes with it
                    abandon_setup(self.config)
                raise
            if self.run.val_batches is not None:
                self.evaluators.insert(0, RegisteredEvaluator("validation", greedy_validation, None))
            if self.is_logging_rank:
                setup_finished(self.run.run_dir)
        return self.run

    @property
    def is_logging_rank(self) -> bool:
        """Whether this rank writes metrics and prints (global rank 0); known before `setup()` and
        after `close()`. Guard only your own side effects with it: `generate`, `validate` and
        `save_checkpoint` are collective and must run on every rank."""
        return self._rank == 0

    def fit(self) -> dict[str, float]:
        """Everything `hybridflow-mg train` does: setup (resuming when there is a checkpoint), warm start
        (when configured, on a fresh run), RL steps with validation and checkpoints, the final save, the
        printed curves, close. Returns the last step's metrics. A run that already reached
        `trainer.total_steps` says so and returns; a signal (SIGTERM, SIGUSR1, SIGINT) or the deadline
        ends it after the current step with a checkpoint and sets `self.preempted`."""
        from hybridflow_mg.trainer.bootstrap import finished
        from hybridflow_mg.trainer.preemption import Preemption

        done = finished(self.config) if self.run is None else None
        if done:  # a rerun of a finished run: nothing to build or write
            if self.is_logging_rank:
                print(done, flush=True)
            self._closed = True
            return self.metrics
        cfg = self.config
        # Signals are caught from here on: a long setup or warm start interrupted ends resumable too. An
        # exception skips the collective teardown (peers may be dead or stuck, and a destroy would wait for
        # them): the process ends anyway, and in a notebook close() can follow once the others are gone.
        with Preemption(cfg.trainer.save_before_deadline) as preemption:
            run = self.setup()
            preemption.device = run.grid.device
            self._call("on_train_start", self)
            if cfg.actor.warm_start.steps and self.step == 0:
                from hybridflow_mg.trainer.warm_start import warm_start

                warm_start(run)
                self._vllm_step = None  # the warm start changed the actor
            while self.step < cfg.trainer.total_steps:
                try:
                    if run.progress is not None:
                        run.progress.arrive("the step boundary", self.step)
                    if preemption.due():
                        self._stop_resumable(preemption.requested)
                        break
                    self.train_step()
                except Exception as e:  # a peer that stopped making progress is named (parallel/progress.py)
                    explained = run.progress.explain(e) if run.progress is not None else e
                    if explained is e:
                        raise
                    raise explained from e
        if self.preempted is None:
            if cfg.trainer.save_final:
                self.save_checkpoint(run.run_dir / "checkpoints" / "final")
            if self.is_logging_rank:
                print("\nmean reward per step:\n" + run.tracker.curve("reward_mean"))
                if any("val_reward" in r for r in run.tracker.history):
                    print("\nvalidation reward (greedy):\n" + run.tracker.curve("val_reward"))
                if "jsonl" in cfg.run.loggers:
                    print(f"\nmetrics: {run.run_dir / 'metrics.jsonl'}")
            self._call("on_train_end", self)
        self.close()
        return self.metrics

    def _stop_resumable(self, why: str) -> None:
        """Save (unless this step was just saved, or no step ran yet) and mark the run preempted: `fit` stops
        and the CLI exits 75. Under a launcher that set `HYBRIDFLOW_PREEMPTED_FILE`, rank 0 also writes
        that file, so a batch script requeues whatever the job step's status (launch/slurm/train.sbatch)."""
        from hybridflow_mg.checkpoint.training import step_name

        path = self.run.run_dir / "checkpoints" / step_name(self.step)
        if self.step and self._saved_step != self.step:
            self.save_checkpoint(path)
        self.preempted = why
        if self.is_logging_rank:
            where = f"saved {path}" if self.step else "before the first step, nothing to save"
            print(f"stopped by {why} after step {self.step}: {where}; with trainer.resume=auto (the default) the "
                  "same command resumes (exit status 75)", flush=True)
            marker = os.environ.get("HYBRIDFLOW_PREEMPTED_FILE")
            if marker:
                Path(marker).write_text(f"{self.step}\n")

    def train_step(self) -> dict[str, float]:
        """One RL step (validation first when due), logged, with callbacks and the periodic checkpoint."""
        from hybridflow_mg.checkpoint.training import step_name
        from hybridflow_mg.parallel import faults
        from hybridflow_mg.trainer.checkpoint import trainable
        from hybridflow_mg.trainer.loop import rl_step

        run, cfg = self.setup(), self.config
        step = self.step + 1
        faults.set_step(step)
        faults.trigger("step")
        due = [e for e in self.evaluators if e.due(step, cfg.trainer.val_every)]
        evaluate = (lambda: self._evaluate_in_step(step, due)) if due else None
        self._vllm_step = self.step  # rl_step starts with the reshard
        lr = run.actor.optimizer.param_groups[0]["lr"]
        metrics = rl_step(run, next(run.train_batches), step, evaluate=evaluate)
        for _, worker in trainable(run):
            worker.scheduler.step(1)  # the schedule counts RL steps
        skipped = metrics.get("update_skipped", 0.0) + metrics.get("critic/update_skipped", 0.0)
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        metrics.update(lr=lr, bad_steps=self.bad_steps)
        if step == 1:  # what the length check did to the data, once (a resumed run keeps step 1's row; printed at setup)
            for split, batches in (("train", run.train_batches), ("val", run.val_batches)):
                if batches is not None:
                    metrics[f"data/{split}_prompts"] = len(batches.dataset)
                    metrics[f"data/{split}_dropped_too_long"] = batches.dataset.num_dropped_too_long
                    metrics[f"data/{split}_truncated"] = batches.dataset.num_truncated
        self.step, self.metrics = step, metrics
        run.tracker.log(step, metrics)
        self._call("on_step_end", step, metrics)
        if self.bad_steps >= cfg.trainer.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps} consecutive steps (to step {step}) had a non-finite loss or gradient "
                               "and were skipped (trainer.max_bad_steps); lower the learning rate, check the rewards, "
                               "or resume from an earlier checkpoint")
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            self.save_checkpoint(run.run_dir / "checkpoints" / step_name(step))
        return metrics

    def _evaluate_in_step(self, step: int, evaluators: list[RegisteredEvaluator]) -> dict[str, float]:
        """`evaluators` and the `on_validation` callbacks, inside the step's generation phase (weights
        synced, KV cache awake: `generate` has nothing to set up)."""
        self._generating = True
        try:
            metrics = self._evaluate(evaluators)
            self._call("on_validation", step, metrics)
        finally:
            self._generating = False
        return metrics

    def _evaluate(self, evaluators: list[RegisteredEvaluator]) -> dict[str, float]:
        from hybridflow_mg.metrics.progress_bar import progress_bar

        metrics: dict[str, float] = {}
        bar = progress_bar(evaluators, desc="evaluation", enabled=self.is_logging_rank, leave=False)
        for e in bar:
            bar.set_postfix_str(e.name)
            for key, value in e(self).items():
                if key in metrics:
                    raise ValueError(f"evaluator {e.name!r} returned {key!r}, which another evaluator "
                                     "already reported; give your metrics distinct names")
                metrics[key] = value
        return metrics

    def validate(self) -> dict[str, float]:
        """Run every registered evaluator now, on the current policy, and return their metrics (nothing is
        logged, no callback is called). Collective."""
        with self._generation_phase():
            return self._evaluate(self.evaluators)

    # --- tools for evaluators ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any], *, n: int = 1, temperature: float = 0.0,
                 max_new_tokens: int | None = None, seed: int | None = None) -> list[list[str]]:
        """`n` responses to each prompt from the current policy, as text (EOS removed), on every rank;
        `sample` with the arguments and errors described there."""
        from hybridflow_mg.trainer.stages import decode_response

        completions = self.sample(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        return [[decode_response(self.run.tokenizer, s.token_ids) for s in c.samples] for c in completions]

    def sample(self, prompts: Sequence[Any], *, n: int = 1, temperature: float = 0.0,
               max_new_tokens: int | None = None, seed: int | None = None) -> list[Completion]:
        """`n` samples of each prompt from the current policy, on every rank: one `Completion` per prompt
        (`rollout.vllm_engine`), whose samples hold the token ids (the stop token included), their
        log-probs and the finish reason ("stop" or "length").

        A prompt is text (encoded as the training prompts are, `data.text_prompts_as_chat` included),
        a list of chat messages, or a list of token ids. Greedy by default; `max_new_tokens` defaults to
        `rollout.max_new_tokens`, `seed` to `rollout.seed`. Collective: every rank must call it with the
        same arguments. Raises ValueError for a prompt that cannot be encoded or is longer than
        `data.max_prompt_length`, a prompt + `max_new_tokens` beyond the engine's max_model_len, or `n` /
        `max_new_tokens` below 1.
        """
        from hybridflow_mg.data.datasets import encode_prompt

        run, cfg = self.setup(), self.config
        ids = []
        for i, prompt in enumerate(prompts):
            try:
                ids.append(encode_prompt(run.tokenizer, prompt, text_as_chat=cfg.data.text_prompts_as_chat))
            except ValueError as e:
                raise ValueError(f"generate: prompt {i}: {e}") from None
            if len(ids[-1]) > cfg.data.max_prompt_length:
                raise ValueError(f"generate: prompt {i} has {len(ids[-1])} tokens, more than data.max_prompt_length="
                                 f"{cfg.data.max_prompt_length}")
        if max_new_tokens is None:
            max_new_tokens = run.sampling.max_new_tokens
        limit = run.engine.config.max_model_len
        if ids and limit is not None and max(map(len, ids)) + max_new_tokens > limit:
            i = max(range(len(ids)), key=lambda k: len(ids[k]))
            raise ValueError(f"generate: prompt {i} ({len(ids[i])} tokens) + max_new_tokens {max_new_tokens} exceeds "
                             f"the engine's max_model_len={limit}; set rollout.max_model_len, or ask for fewer tokens")
        sampling = run.engine.config.sampling(
            n=n, temperature=temperature, max_new_tokens=max_new_tokens,
            stop_token_ids=run.sampling.stop_token_ids, **({} if seed is None else {"seed": seed}))
        with self._generation_phase():
            return run.hybrid.generate(ids, sampling, whole_batch=True) if ids else []

    def score(self, responses: Sequence[str], ground_truths: Sequence[Any], data_sources: Sequence[str] | None = None,
              extra_infos: Sequence[Mapping | None] | None = None) -> list[float]:
        """[len(responses)] the run's reward function applied to each response (no collective); the
        optional columns default to "" and None. Raises ValueError when the lists differ in length."""
        from hybridflow_mg.rewards import score_batch

        return score_batch(self.setup().reward_fn, list(responses), list(ground_truths), data_sources, extra_infos)

    @contextlib.contextmanager
    def _generation_phase(self):
        """vLLM ready for generation: inside a step nothing to do; between steps, the actor's current
        weights resharded into vLLM (once per policy) and the training state offloaded (GPU)."""
        from hybridflow_mg.trainer.loop import offloaded

        if self._generating:
            yield
            return
        run = self.setup()
        if self._vllm_step != self.step:
            run.hybrid.sync_weights()
            self._vllm_step = self.step
        with offloaded(run), run.hybrid.generating():
            self._generating = True
            try:
                yield
            finally:
                self._generating = False

    # --- checkpoints and state -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Save the whole training state at `path`, atomically (collective; see trainer/checkpoint.py for
        what it holds; `hybridflow-mg export --ckpt PATH` makes an HF model of its actor). Older
        `step_N` checkpoints beyond `trainer.keep_last` are then deleted."""
        from hybridflow_mg.checkpoint.training import prune
        from hybridflow_mg.parallel.grid import on_rank0
        from hybridflow_mg.trainer.checkpoint import save_checkpoint

        run = self.setup()
        if run.progress is not None:
            run.progress.arrive("checkpoint", self.step)
        out = save_checkpoint(run, Path(path), self._own_state())
        self._saved_step = self.step
        on_rank0(prune, run.run_dir / "checkpoints", self.config.trainer.keep_last)
        self._call("on_checkpoint", self.step, out)
        return out

    def _own_state(self) -> dict[str, Any]:
        """What `state_dict` holds besides the roles' weights and optimizers and the RNG streams."""
        from hybridflow_mg.trainer.checkpoint import trainable

        run = self.setup()
        state: dict[str, Any] = {"step": self.step, "data": run.train_batches.state_dict(),
                                 "kl_controller": run.kl_controller.state_dict(), "bad_steps": self.bad_steps,
                                 "schedulers": {role: w.scheduler.state_dict() for role, w in trainable(run)}}
        callbacks = {i: cb.state_dict() for i, cb in enumerate(self.callbacks) if hasattr(cb, "state_dict")}
        if callbacks:
            state["callbacks"] = callbacks
        return state

    def _load_own_state(self, state: Mapping[str, Any]) -> None:
        from hybridflow_mg.trainer.checkpoint import trainable

        run = self.setup()
        run.train_batches.load_state_dict(state["data"])  # checks the seed and the prompt count first
        self.step, self.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        run.kl_controller.load_state_dict(state["kl_controller"])
        for role, worker in trainable(run):
            if role in state.get("schedulers", {}):
                worker.scheduler.load_state_dict(state["schedulers"][role])
        for i, cb_state in state.get("callbacks", {}).items():
            self.callbacks[int(i)].load_state_dict(cb_state)
        self._vllm_step = None

    def state_dict(self) -> dict[str, Any]:
        """This rank's training state: step, data position, KL controller, learning-rate schedules,
        consecutive bad steps, callbacks' states (those with a `state_dict`), every RNG stream, and
        the actor's and critic's weights and optimizer states (this rank's shards; tensors are
        references, as torch's `state_dict` gives them), and the reference's weights when they are its
        own (the warm-started actor's). Otherwise the reference and the reward model are frozen and
        rebuilt from their sources. Checkpoints on disk: `save_checkpoint`."""
        from hybridflow_mg.trainer.checkpoint import reference_is_trained
        from hybridflow_mg.trainer.state import process_rng_state, worker_state

        run = self.setup()
        state = {**self._own_state(), "rng": process_rng_state(), "actor": worker_state(run.actor)}
        if run.critic is not None:
            state["critic"] = worker_state(run.critic)
        if reference_is_trained(run):
            state["reference"] = worker_state(run.ref)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (on the same layout); vLLM is resynced before it generates.
        Raises ValueError, before changing anything, when the state does not fit this run."""
        from hybridflow_mg.trainer.state import check_worker_state, load_worker_state, set_process_rng_state

        run = self.setup()
        if ("critic" in state) != (run.critic is not None):
            raise ValueError("the state was saved by a run " + ("with" if "critic" in state else "without") +
                             " a critic, and this run's algorithm " + ("does not" if "critic" in state else "does") +
                             " train one")
        check_worker_state(run.actor, state["actor"])
        if run.critic is not None:
            check_worker_state(run.critic, state["critic"])
        reference = state.get("reference") if run.ref is not None else None
        if reference is not None:
            check_worker_state(run.ref, reference)
        self._load_own_state(state)
        load_worker_state(run.actor, state["actor"])
        if run.critic is not None:
            load_worker_state(run.critic, state["critic"])
        if reference is not None:
            load_worker_state(run.ref, reference)
            run.reference_trained = True
        set_process_rng_state(state["rng"])  # last: loading must not draw from the restored streams

    def close(self) -> None:
        """Release the vLLM engine, the process groups and the trackers (idempotent)."""
        if self.run is not None:
            self.run.close()
        self.run, self._closed = None, True

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Trainer"]
