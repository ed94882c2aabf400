"""The in-process vLLM engine of every rank: the rollout half of the 3D-HybridEngine.

One `VLLMEngine` per run on every rank (SPMD, vLLM's ``external_launcher``): it joins the trainer's
torch.distributed world (gloo on CPU, NCCL on GPU), runs generation with tensor parallelism t_g and
pipeline parallelism p_g over the generation groups that `ParallelLayout` plans, and exposes this rank's
vLLM parameters (vLLM names, per-rank shards of its stage) so that the resharder writes them in place.
With p_g > 1 vLLM's external_launcher broadcasts the last stage's sampled tokens to every stage
(``GPUModelRunner.broadcast_pp_output``), so every rank returns the same completions.

Two seams into vLLM, each the only one of its kind:

- Groups (`_groups_follow_plan`). vLLM's ``initialize_model_parallel`` cuts its world into groups of
  *consecutive* ranks (ExternalDP × DP × PP × PCP × TP) and hands each list to
  ``init_model_parallel_group``, whose ``GroupCoordinator`` takes ``rank_in_group = ranks.index(rank)``.
  HybridFlow's optimal micro-DP grouping needs generation TP groups strided across each training TP
  group (t_g < t). During engine construction only, that module-level function is wrapped: every
  group list vLLM builds (TP, PP, DP, DCP, PCP, EP) goes through `ParallelLayout.vllm_groups`, which
  maps vLLM's consecutive rank v to world rank ``vllm_rank_order[v]`` and sorts each group, so a
  rank's vLLM TP rank is its sorted position — the plan's generation coordinate. The constructor then
  checks ``get_tp_group()`` against the plan. Example: world 4, train tp=4 → gen tp=2 gives vLLM TP
  groups [0, 2] and [1, 3].
- Teardown (`_release_engine_groups`). ``EngineCore.shutdown`` (run by ``LLM``'s finalizer, at the
  latest at interpreter exit) calls ``cleanup_dist_env_and_memory``, which ends with
  ``torch.distributed.destroy_process_group()``: the *default* group, and with it Megatron's. From the
  first engine on, for the rest of the process, that name in ``vllm.v1.engine.core`` (its only caller)
  is a function that releases vLLM's own groups and never the default one.

Everything else vLLM needs in-process or on CPU lives in `vllm_cpu`. (The engine runs without a
tokenizer — token ids in and out, stop ids explicit — and drops the one log record that choice causes.)

Ids the tokenizer cannot decode. Models often pad vocab_size past their tokenizer (Qwen2.5: 151936
rows, 151665 ids); a sampled padding id makes sentencepiece raise and HF tokenizers drop it from the
text a reward scores. Given `num_decodable_ids`, every request carries a logit bias of -inf on the ids
from there to vocab_size: public SamplingParams, honoured by both of vLLM's model runners, and sized
by the padding (hundreds of ids), not the vocabulary. ``allowed_token_ids`` would be the other way
and costs far more: the V1 runner copies a [requests, vocab] mask to the device every step, and the
V2 runner takes at most 1024 allowed ids. The bias comes after the raw logprobs (``logprobs_mode=raw``
still reports the model's own distribution, as the trainer computes it) and only when something is
masked, so sampling is exactly as before for a tokenizer that covers the vocabulary. The trainer's
log-probs still normalise over the whole vocabulary, so with masking the policy that samples differs
from the one optimised by the probability mass the model puts on the padding ids (untrained rows:
usually negligible, and visible in `rollout_logprob_diff` under ``logprobs_mode=processed``).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.hf_spec import read_hf_config, spec_from_hf
from hybridflow_mg.models.layouts import hf_names, match, rules_for
from hybridflow_mg.models.rowmaps import shard_index, take_shard, to_canonical
from hybridflow_mg.rollout import vllm_cpu
from hybridflow_mg.rollout.config import RolloutConfig, Sampling
from hybridflow_mg.rollout.kv_cache import TRAIN_OPTIONS, OptionNames, explain_engine_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    token_ids: list[int]
    logprobs: list[float]
    """Logprob of each sampled token (``RolloutConfig.logprobs_mode`` says which distribution)."""
    finish_reason: str
    """``"stop"`` (emitted a stop token, which ends `token_ids`) or ``"length"`` (max_new_tokens)."""
    stop_token_id: int | None = None
    """The stop token that ended the sample (its last token), when finish_reason is ``"stop"``."""

    def without_stop(self, stops=()) -> list[int]:
        """The sampled tokens without the stop token that ended them (`stop_token_id`, or a last token in
        `stops` when vLLM did not say which), as the diversity metrics read a response."""
        ids = list(self.token_ids)
        if self.finish_reason == "stop" and ids and (ids[-1] in stops or ids[-1] == self.stop_token_id):
            ids.pop()
        return ids


@dataclass(frozen=True)
class Completion:
    """All samples of one prompt, in sample order."""

    prompt_token_ids: list[int]
    samples: list[Sample]


# --- seam 1: vLLM's groups follow the plan ----------------------------------------------------------
@contextlib.contextmanager
def _groups_follow_plan(layout: ParallelLayout):
    """During the body, every group vLLM creates is `layout.vllm_groups` of what it asked for."""
    from vllm.distributed import parallel_state

    original = parallel_state.init_model_parallel_group

    def planned(group_ranks, *args, **kwargs):
        return original(layout.vllm_groups([list(g) for g in group_ranks]), *args, **kwargs)

    parallel_state.init_model_parallel_group = planned  # looked up as a module global at call time
    try:
        yield
    finally:
        parallel_state.init_model_parallel_group = original


# --- seam 2: shutting vLLM down keeps the trainer's groups -------------------------------------------
def _release_engine_groups(*_args, **_kwargs) -> None:
    """``cleanup_dist_env_and_memory`` without its final ``destroy_process_group()`` of the default group."""
    import gc

    from vllm.distributed import parallel_state

    gc.unfreeze()
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()  # vLLM's own TP/PP/DP/... groups (new_group, not default)
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()  # vLLM's copy of the world: also its own new_group
    else:  # the trainer already destroyed the default group, and every group with it
        for name in ("_TP", "_ETP", "_ENGRAM_DP", "_DCP", "_PCP", "_PP", "_DP", "_EP", "_EPLB"):
            setattr(parallel_state, name, None)
    parallel_state._WORLD = None
    parallel_state._NODE_COUNT = None


def _install_teardown_seam() -> None:
    from vllm.v1.engine import core

    core.cleanup_dist_env_and_memory = _release_engine_groups


@contextlib.contextmanager
def _without_tokenizer_warmup_noise():
    """We run vLLM without a tokenizer (token ids in and out); its chat-template warmup then logs a
    traceback at construction (``BaseRenderer.warmup``). Drop exactly that record."""
    logger = logging.getLogger("vllm.renderers.base")
    drop = logging.Filter()
    drop.filter = lambda record: not record.getMessage().startswith("Chat template warmup failed")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class VLLMEngine:
    """vLLM in this process, generation TP over the planned groups; create once per run on every rank.

    ``model_path``: an HF model directory (config.json; weights unless ``load_weights=False``, which
    starts from random weights for a resharder that writes all of them). torch.distributed must
    already run over ``layout.world`` ranks. Construction is collective over the world.
    ``num_decodable_ids``: the tokenizer's size (`Tokenizer.vocab_size`); ids from there up are never
    sampled (see the module docstring); None masks nothing.
    ``option_names``: how the user sets max_model_len and the KV-cache size, named in the error when
    the cache cannot hold one sequence (config keys by default, `generate`'s flags there).
    """

    def __init__(self, model_path: str, layout: ParallelLayout, config: RolloutConfig | None = None, *,
                 load_weights: bool = True, option_names: OptionNames = TRAIN_OPTIONS,
                 num_decodable_ids: int | None = None):
        if not dist.is_initialized():
            raise RuntimeError("start torch.distributed first (hybridflow_mg.parallel.launch.init_distributed)")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout plans {layout.world} ranks but {dist.get_world_size()} were launched")
        self.layout, self.config = layout, config or RolloutConfig()
        self.rank = dist.get_rank()
        self.gen_coord = layout.gen_coord(self.rank)
        self.tp_rank = self.gen_coord.tp
        self.dims = spec_from_hf(read_hf_config(model_path)).dims

        with contextlib.ExitStack() as scope:
            # from the first vLLM import on: vLLM's imports set env vars as well (see vllm_cpu item 2)
            scope.enter_context(vllm_cpu.preserved_process_state("vLLM construction"))
            vllm = vllm_cpu.import_vllm()
            self.on_cpu = vllm_cpu.on_cpu()
            kwargs = self._engine_kwargs(model_path, load_weights)
            if self.on_cpu:
                kwargs = vllm_cpu.cpu_engine_kwargs(kwargs, self.dims.head_dim)
                scope.enter_context(vllm_cpu.cpu_construction())
            if kwargs["enforce_eager"] is None:
                kwargs["enforce_eager"] = False  # GPU: CUDA graphs
            _install_teardown_seam()
            scope.enter_context(_groups_follow_plan(layout))
            scope.enter_context(_without_tokenizer_warmup_noise())
            try:
                self._llm = vllm.LLM(**kwargs)
            except ValueError as e:  # KV cache too small for max_model_len: said with our option names
                explained = explain_engine_error(e, option_names)
                if explained is None:
                    raise
                raise explained from e
        self._check_groups()
        if self.on_cpu and layout.gen_pp > 1:
            vllm_cpu.allocate_pp_receive_buffers(self._llm.llm_engine.model_executor.driver_worker.worker.model_runner)
        self._closed = False
        self.num_decodable_ids = num_decodable_ids

    def _engine_kwargs(self, model_path: str, load_weights: bool) -> dict:
        cfg = self.config
        kwargs = dict(
            model=model_path, skip_tokenizer_init=True, generation_config="vllm",  # no HF sampling defaults
            tensor_parallel_size=self.layout.gen_tp, pipeline_parallel_size=self.layout.gen_pp,
            distributed_executor_backend="external_launcher", seed=cfg.seed, dtype=cfg.dtype,
            max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager, gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, enable_sleep_mode=cfg.enable_sleep_mode,
            logprobs_mode=f"{cfg.logprobs_mode}_logprobs", load_format="auto" if load_weights else "dummy",
            disable_log_stats=True,
        )
        for key in ("max_model_len", "max_num_batched_tokens", "block_size"):
            if getattr(cfg, key) is not None:
                kwargs[key] = getattr(cfg, key)
        return kwargs

    def _check_groups(self) -> None:
        from vllm.distributed import parallel_state

        for kind, group, groups, position in (("TP", parallel_state.get_tp_group(), self.layout.gen_tp_groups, self.tp_rank),
                                              ("PP", parallel_state.get_pp_group(), self.layout.gen_pp_groups,
                                               self.gen_coord.pp)):
            planned = next(g for g in groups if self.rank in g)
            if group.ranks != planned or group.rank_in_group != position:
                raise RuntimeError(f"vLLM built {kind} group {group.ranks} (rank {group.rank_in_group} in it) on rank "
                                   f"{self.rank}; the plan is {planned} (rank {position})")

    # --- facts -----------------------------------------------------------------------------------------
    @property
    def tp_group_ranks(self) -> list[int]:
        """World ranks of this rank's generation TP group, as vLLM uses it."""
        from vllm.distributed import parallel_state

        return list(parallel_state.get_tp_group().ranks)

    def _model(self) -> torch.nn.Module:
        return self._llm.llm_engine.model_executor.driver_worker.worker.get_model()

    @property
    def num_decodable_ids(self) -> int | None:
        """Ids at or above this are never sampled (None: every id of the model's vocabulary may be)."""
        return self._num_decodable_ids

    @num_decodable_ids.setter
    def num_decodable_ids(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"num_decodable_ids must be a positive integer or None, got {value!r}")
        masked = range(value, self.dims.vocab_size) if value is not None else range(0)
        limit = _max_logit_bias_ids(self._llm.llm_engine.vllm_config)
        if limit is not None and len(masked) > limit:
            raise ValueError(f"the model's vocab_size {self.dims.vocab_size} exceeds the tokenizer's {value} ids by "
                             f"{len(masked)}, more than vLLM's model runner V2 masks per request ({limit}); set "
                             "VLLM_USE_V2_MODEL_RUNNER=0")
        self._num_decodable_ids = value
        # one dict for every request: vLLM copies it per request, and the V1 runner gathers all of them
        # into one index tensor when the batch changes (requests × padding ids, not × vocabulary)
        self._logit_bias = {i: float("-inf") for i in masked} or None

    # --- weights (the resharder's target) ----------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's vLLM parameters: vLLM names, per-rank shards, writable in place with ``copy_``.

        Vocab-parallel rows past the real vocab are padding: vLLM drops their logits
        (``LogitsProcessor._get_logits`` keeps ``[..., :org_vocab_size]`` after the TP gather), so
        whatever they hold is never sampled. Call `weights_updated` after writing.
        """
        return self._model().named_parameters()

    def weights_updated(self) -> None:
        """Forget cached KV of the old weights (prefix cache); call after every weight update."""
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Write FULL HF tensors into this rank's shards through the row maps; returns tensors written.

        For tests and tools: the resharder writes shards directly. Every vLLM parameter must be covered.
        """
        rules = rules_for(self.dims)
        written = 0
        with torch.no_grad():
            for param_name, param in self.named_parameters():
                found = match(rules, "vllm", param_name)
                if found is None:
                    raise KeyError(f"vLLM parameter {param_name!r} has no rule in models/layouts.py")
                rule, layer, _ = found
                sources = hf_names(rule, layer)
                missing = [s for s in sources if s not in state_dict]
                if missing:
                    raise KeyError(f"state dict lacks {missing} for vLLM parameter {param_name!r}")
                canonical = to_canonical(rule, [state_dict[s] for s in sources])
                index = shard_index(rule, "vllm", self.dims, self.layout.gen_tp, self.gen_coord.tp_for(rule.kind))
                shard = take_shard(canonical, index, rule.index_dim)
                if shard.shape != param.shape:
                    raise ValueError(f"{param_name}: shard {tuple(shard.shape)} but vLLM holds {tuple(param.shape)}")
                param.copy_(shard)
                written += 1
        self.weights_updated()
        return written

    # --- generation ----------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling | None = None, *,
                 prompt_indices: Sequence[int] | None = None) -> list[Completion]:
        """Sample ``sampling.n`` responses per prompt; one `Completion` per prompt, in order.

        Collective over this rank's generation TP group: its ranks must pass the same prompts and
        `Sampling`. Seeds make each sample independent of batch and rank (see `Sampling`): prompt k
        is seeded by ``prompt_indices[k]`` (its index in the global batch; default k). The trainer's
        RNG states are left as they were.
        """
        from vllm import SamplingParams

        sampling = sampling or self.config.sampling()
        if not prompt_token_ids:
            return []
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                                 stop_token_ids=list(sampling.stop_token_ids), seed=sampling.request_seed(j),
                                 logit_bias=self._logit_bias, logprobs=0, detokenize=False)
                  for j in (prompt_indices if prompt_indices is not None else range(len(prompt_token_ids)))]
        if len(params) != len(prompt_token_ids):
            raise ValueError(f"{len(prompt_token_ids)} prompts but {len(params)} prompt indices")
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        with vllm_cpu.preserved_process_state("LLM.generate"):
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [Completion(prompt_token_ids=list(out.prompt_token_ids),
                           samples=[_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)])
                for out in outputs]

    # --- memory around training (GPU) ----------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free vLLM's GPU memory for training: level 1 offloads weights to host and drops the KV cache;
        level 2 drops both (the resharder must then write every weight after `wake_up`)."""
        if self.on_cpu or not self.config.enable_sleep_mode:
            log.debug("sleep(level=%d): no sleep mode (CPU, or rollout.enable_sleep_mode=false)", level)
            return
        self._llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what `sleep` freed; ``tags`` picks ``["weights"]`` or ``["kv_cache"]`` (default both),
        so the resharder can write weights before the KV cache takes its memory back."""
        if self.on_cpu or not self.config.enable_sleep_mode:
            log.debug("wake_up(%s): no sleep mode (CPU, or rollout.enable_sleep_mode=false)", tags)
            return
        self._llm.wake_up(tags=tags)

    # --- end -----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Release vLLM (its groups, KV cache, model); the trainer's process groups stay. Idempotent;
        runs at interpreter exit through vLLM's finalizer when not called."""
        if self._closed:
            return
        self._closed = True
        self._llm.llm_engine.engine_core.shutdown()
        del self._llm


def _max_logit_bias_ids(vllm_config) -> int | None:
    """How many logit-bias ids vLLM's model runner takes per request (None: no limit, the V1 runner)."""
    if not vllm_config.use_v2_model_runner:
        return None
    from vllm.v1.worker.gpu.sample.logit_bias import MAX_NUM_LOGIT_BIAS_TOKENS  # imports triton: GPU only

    return MAX_NUM_LOGIT_BIAS_TOKENS


def _sample(out) -> Sample:
    tokens = list(out.token_ids)
    logprobs = [float(step[tok].logprob) for tok, step in zip(tokens, out.logprobs)]
    stop = out.stop_reason if isinstance(out.stop_reason, int) else None
    return Sample(token_ids=tokens, logprobs=logprobs, finish_reason=str(out.finish_reason), stop_token_id=stop)
