"""`hybridflow-mg generate`: check a layout end to end before a long run.

Loads an HF model into the Megatron training layout, reshards it into the in-process vLLM engine's
generation layout, generates, and writes one JSON line per prompt: `prompt_ids`, `output_ids`,
`logprobs`, `finish_reason` (and `samples` when --n > 1). The prompts file holds JSON lines with
`prompt_ids`, or `prompt` text when the model directory has a tokenizer. `--nproc N` starts N local
processes (parallel/local_launch.py); under an existing launcher (torchrun, srun, mpirun) the command runs as is.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridflow_mg.commands._args import check_out_file, parse_sizes
from hybridflow_mg.rollout.config import GREEDY_BELOW

if TYPE_CHECKING:
    from hybridflow_mg.models.hf_spec import ModelSpec


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="HF model → Megatron layout → reshard → vLLM generate", description=__doc__)
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--train", default="tp=1,pp=1", metavar="tp=T,pp=P")
    p.add_argument("--gen", default="", metavar="tp=TG[,pp=PG]",
                   help="generation tp (default: training tp) and pipeline stages (default 1)")
    p.add_argument("--nproc", type=int, default=None, help="start this many local processes (parallel/local_launch.py)")
    p.add_argument("--prompts", required=True,
                   help='JSON lines: {"prompt_ids": [ids]} or {"prompt": "text"} (text needs a tokenizer in --hf)')
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64,
                   help="new tokens per sample; each prompt plus these must fit --max-model-len")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + response the engine holds (default: the longest prompt + --max-tokens; "
                        "at most the model's max_position_embeddings)")
    p.add_argument("--kv-cache-mb", type=int, default=None,
                   help="vLLM KV-cache size per rank in MiB (default on CPU: 256; on GPU vLLM's "
                        "gpu_memory_utilization decides)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=None, help="output JSON lines (default: stdout)")
    p.set_defaults(run=run)


PROMPT_EXAMPLE = '{"prompt_ids": [1, 17, 33]} or {"prompt": "text"}'


def read_prompts(path: str, model_dir: str, *, vocab_size: int, context: int, max_new_tokens: int,
                 context_name: str | None = None) -> list[list[int]]:
    """The prompts of a JSON-lines file as token ids, each checked against the model.

    A line is a JSON object with `prompt_ids` (ints in [0, vocab_size)) or `prompt` text (needs a
    tokenizer in `model_dir`); a prompt plus `max_new_tokens` must fit the `context` (what
    `context_name` calls it; by default the model's max_position_embeddings). A bad line raises one
    ValueError `FILE:LINE: problem; fix`.
    """
    context_name = context_name or f"the model's context of {context} (max_position_embeddings in {config_path(model_dir)})"
    if os.path.isdir(path):
        raise ValueError(f"--prompts {path!r} is a directory; give a JSON-lines file ({PROMPT_EXAMPLE} per line)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path!r} does not exist; give a JSON-lines file ({PROMPT_EXAMPLE} per line)")
    config = config_path(model_dir)
    prompts, tokenizer = [], None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text; save the prompts file as UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # a cut-off line errs at its end, not at column 1 of the next
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); write one object per line, "
                                 f"e.g. {PROMPT_EXAMPLE}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a line must be a JSON object, not {_json_kind(row)}; write {PROMPT_EXAMPLE}")
            if "prompt_ids" in row:
                ids = _checked_ids(row["prompt_ids"], where, vocab_size, config)
            elif "prompt" in row:
                if not isinstance(row["prompt"], str):
                    raise ValueError(f"{where}: 'prompt' must be text, not {_json_kind(row['prompt'])}")
                tokenizer = tokenizer or _tokenizer(model_dir, where)
                ids = _checked_ids(tokenizer.encode(row["prompt"], add_bos=True), where, vocab_size, config)
            else:
                raise ValueError(f"{where}: a line needs 'prompt_ids' or 'prompt', e.g. {PROMPT_EXAMPLE}")
            if len(ids) + max_new_tokens > context:
                raise ValueError(f"{where}: prompt of {len(ids)} tokens + --max-tokens {max_new_tokens} exceeds "
                                 f"{context_name}; shorten the prompt to at most {context - max_new_tokens} tokens "
                                 f"or lower --max-tokens")
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"--prompts {path!r} has no prompts; write one JSON object per line, e.g. {PROMPT_EXAMPLE}")
    return prompts


def config_path(model_dir: str) -> str:
    """The config.json of an HF model directory."""
    return os.path.join(model_dir, "config.json")


def kv_cache_bytes(args) -> int | None:
    """--kv-cache-mb in bytes (None when not given)."""
    return args.kv_cache_mb << 20 if args.kv_cache_mb is not None else None


def _json_kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}[type(value)]


def _checked_ids(ids, where: str, vocab_size: int, config: str) -> list[int]:
    """`ids` as a list of token ids in [0, vocab_size), or a ValueError at `where`."""
    if not isinstance(ids, list):
        raise ValueError(f"{where}: 'prompt_ids' must be a list of token ids, not {_json_kind(ids)}")
    if not ids:
        raise ValueError(f"{where}: 'prompt_ids' is empty; give at least one token id")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"{where}: 'prompt_ids'[{i}] is {json.dumps(t)}, not an integer token id")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{where}: token id {t} at 'prompt_ids'[{i}] is outside the vocabulary: ids run "
                             f"0..{vocab_size - 1} (vocab_size in {config})")
    return ids


def _tokenizer(model_dir: str, where: str):
    from hybridflow_mg.data.tokenizer import Tokenizer

    try:
        return Tokenizer.from_path(model_dir)
    except ValueError:
        raise ValueError(f"{where}: 'prompt' text needs a tokenizer and {model_dir!r} has none (tokenizer.json, "
                         f"tokenizer_config.json or tokenizer.model); give 'prompt_ids' instead") from None


@dataclass(frozen=True)
class GenerateInputs:
    """What `run` checked before any process or engine starts, handed to the generation itself."""

    hf_config: dict
    spec: ModelSpec
    train: dict[str, int]  # {"tp": T, "pp": P} as given to --train
    gen: dict[str, int]  # {"tp": TG, "pp": PG}, either left out (the training tp; one stage)
    prompts: list[list[int]]
    max_model_len: int  # --max-model-len, or the longest prompt + --max-tokens
    num_decodable_ids: int | None = None  # the size of --hf's tokenizer, when it has one: ids past it are never sampled


def check_inputs(args) -> GenerateInputs:
    """Every flag and prompt checked against the model's config.json: a one-line ValueError for the
    first mistake. Cheap (no weights, no torch.distributed), so the launching process runs it before
    `--nproc` starts workers, and each worker again on its own."""
    from hybridflow_mg.data.tokenizer import check_fits_model, tokenizer_in
    from hybridflow_mg.models.hf_io import hf_model_dir
    from hybridflow_mg.models.hf_spec import read_hf_config, spec_from_hf
    from hybridflow_mg.rollout.standalone import check_kv_cache, check_layouts

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    for flag, value in (("--max-tokens", args.max_tokens), ("--n", args.n), ("--max-model-len", args.max_model_len),
                        ("--kv-cache-mb", args.kv_cache_mb)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature} (--greedy samples at 0)")
    if args.n > 1 and (args.greedy or args.temperature < GREEDY_BELOW):
        raise ValueError(f"--n {args.n} with greedy decoding gives {args.n} identical samples; drop --greedy and "
                         f"sample at a --temperature > 0, or ask for --n 1")
    check_out_file(args.out)
    t = parse_sizes(args.train, ("tp", "pp"), "--train")
    g = parse_sizes(args.gen, ("tp", "pp"), "--gen")
    model_dir = hf_model_dir(args.hf)
    hf_config = read_hf_config(model_dir)
    spec = spec_from_hf(hf_config)
    check_layouts(spec, train=t, gen=g, nproc=args.nproc, where=f" of {model_dir}")
    context = spec.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > context:
        raise ValueError(f"--max-model-len {args.max_model_len} exceeds the model's context of {context} tokens "
                         f"(max_position_embeddings in {model_dir / 'config.json'}); lower it to at most {context}")
    limit, limit_name = (context, f"the model's context of {context} tokens (max_position_embeddings in "
                                  f"{model_dir / 'config.json'})") if args.max_model_len is None else \
        (args.max_model_len, f"--max-model-len {args.max_model_len}")
    if args.max_tokens >= limit:
        raise ValueError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in {limit_name}; "
                         f"lower it below {limit}")
    tokenizer = tokenizer_in(model_dir)
    if tokenizer is not None:
        check_fits_model(tokenizer, spec.dims.vocab_size, model_dir / "config.json",
                         fix="the tokenizer files in --hf do not belong to this model")
    prompts = read_prompts(args.prompts, str(model_dir), vocab_size=spec.dims.vocab_size, context=limit,
                           max_new_tokens=args.max_tokens, context_name=limit_name)
    max_model_len = args.max_model_len or max(map(len, prompts)) + args.max_tokens
    check_kv_cache(spec, g.get("tp", t.get("tp", 1)), g.get("pp", 1), max_model_len, kv_cache_bytes=kv_cache_bytes(args),
                   dtype=args.dtype)
    return GenerateInputs(hf_config=hf_config, spec=spec, train=t, gen=g, prompts=prompts, max_model_len=max_model_len,
                          num_decodable_ids=tokenizer.vocab_size if tokenizer is not None else None)


def run(args) -> int:
    from hybridflow_mg.parallel.launch import discover

    inputs = check_inputs(args)  # before any worker or engine: bad input costs a second, not a startup
    if args.nproc and discover().world_size == 1:  # start the processes ourselves
        from hybridflow_mg.parallel.local_launch import launch_local, without_nproc

        return launch_local(args.nproc, without_nproc(args.argv))
    return _generate(args, inputs)


def _generate(args, inputs: GenerateInputs) -> int:
    from hybridflow_mg.rollout.config import RolloutConfig
    from hybridflow_mg.rollout.standalone import start_policy, stop_ids

    policy = start_policy(args.hf, inputs.spec, args.hf, train=inputs.train, gen=inputs.gen, dtype=args.dtype,
                          rollout=RolloutConfig(dtype=args.dtype, max_new_tokens=args.max_tokens,
                                                max_model_len=inputs.max_model_len,
                                                kv_cache_memory_bytes=kv_cache_bytes(args)),
                          num_decodable_ids=inputs.num_decodable_ids)
    engine, stats = policy.engine, policy.reshard
    sampling = engine.config.sampling(n=args.n, temperature=0.0 if args.greedy else args.temperature,
                                      max_new_tokens=args.max_tokens, seed=args.seed,
                                      stop_token_ids=stop_ids(inputs.hf_config))
    with policy.hybrid.generating():
        completions = policy.hybrid.generate(inputs.prompts, sampling, whole_batch=True)
    if policy.grid.is_logging_rank:
        out = open(args.out, "w") if args.out else sys.stdout
        for c in completions:
            first = c.samples[0]
            row = {"prompt_ids": c.prompt_token_ids, "output_ids": first.token_ids, "logprobs": first.logprobs,
                   "finish_reason": first.finish_reason}
            if len(c.samples) > 1:
                row["samples"] = [{"output_ids": s.token_ids, "logprobs": s.logprobs,
                                   "finish_reason": s.finish_reason} for s in c.samples]
            out.write(json.dumps(row) + "\n")
        if args.out:
            out.close()
        print(f"generated {len(completions)} prompts × {args.n} on {policy.grid.layout.describe()}; reshard received "
              f"{stats.recv_bytes / 1e6:.2f} MB per rank in {stats.collectives} collectives ({stats.seconds:.3f} s)",
              file=sys.stderr)
    policy.close()
    return 0
