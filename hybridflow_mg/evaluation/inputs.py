"""What `hybridflow-mg eval` checks before any process or engine starts: the model (an HF directory or
one of our checkpoints), the reference, the data, the flags. Each mistake is one ValueError line that
names the input and the fix; nothing here loads weights or starts torch.distributed, so the launching
process runs it before `--nproc` starts workers (and each worker again on its own).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from hybridflow_mg.rollout.config import GREEDY_BELOW
from hybridflow_mg.rollout.kv_cache import OptionNames

if TYPE_CHECKING:
    from hybridflow_mg.data.datasets import PromptItem
    from hybridflow_mg.data.tokenizer import Tokenizer
    from hybridflow_mg.models.hf_spec import ModelSpec

EVAL_OPTIONS = OptionNames(max_model_len="--max-tokens", kv_cache="--kv-cache-mb", kv_cache_unit=1 << 20)
"""How eval's KV-cache error names its options (max_model_len is the longest prompt + --max-tokens)."""

HF_FORMAT = "an HF model directory (config.json + *.safetensors)"
CHECKPOINT_FORMAT = "a hybridflow_mg checkpoint (hybridflow.json)"
FORMATS = f"{HF_FORMAT} or {CHECKPOINT_FORMAT}"
NEITHER = f"neither {HF_FORMAT} nor {CHECKPOINT_FORMAT}"
SCHEMA = ("verl's schema: a 'prompt' column (chat messages, text or token ids), reward_model.ground_truth and "
          "data_source")


@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate (or to compare against), as found on disk."""

    path: Path
    format: str
    """"hf" or "checkpoint"."""
    hf_config: dict
    spec: ModelSpec
    tokenizer_dir: Path | None
    saved_layout: dict[str, int] | None = None
    """{"tp", "pp"} a checkpoint was saved at (and trained with); None for HF."""
    step: int | None = None
    """The RL step of a training checkpoint (its COMPLETE marker); None otherwise."""

    def weights(self) -> Any:
        """The weights as a canonical source (`models.hf_io.CanonicalSource`): the HF directory's
        tensors, or the checkpoint's shards at whatever layout they were saved."""
        if self.format == "hf":
            from hybridflow_mg.models.hf_io import HFSource

            return HFSource(self.path, self.spec.dims)
        from hybridflow_mg.checkpoint.megatron import MegatronSource

        return MegatronSource(self.path)

    @contextlib.contextmanager
    def config_dir(self) -> Iterator[Path]:
        """A directory holding this model's config.json, for the vLLM engine (which starts from random
        weights that the resharder overwrites): the HF directory itself, or for a checkpoint a temporary
        one holding the config the checkpoint recorded (removed afterwards; the checkpoint is not touched)."""
        if self.format == "hf":
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="hybridflow_eval_") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(self.hf_config))
            yield Path(tmp)


def resolve_model(path: str, flag: str = "MODEL") -> ModelSource:
    """`path` as a `ModelSource`; one line naming `flag` when it is neither format."""
    from hybridflow_mg.checkpoint import training
    from hybridflow_mg.checkpoint.megatron import META, read_meta
    from hybridflow_mg.models.hf_spec import read_hf_config, spec_from_hf

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path!r} does not exist; give {FORMATS}")
    if not p.is_dir():
        raise ValueError(f"{flag} {path!r} is a file; give the directory of {FORMATS}")
    if (p / META).is_file():
        step = training.verify(p)["step"] if (p / training.MARKER).is_file() else None  # sizes checked first
        meta = read_meta(p)
        if meta.role not in ("actor", "reference"):  # a training checkpoint's reference/ is a policy too
            raise ValueError(f"{flag} {path!r} holds {meta.role} weights (a value head), not a policy; give the "
                             f"checkpoint directory above it")
        spec = spec_from_hf(meta.hf_config, vocab_divisor=meta.model_dims.vocab_divisor)
        if spec.dims != meta.model_dims:
            raise ValueError(f"{flag} {path!r}: its {META} records dims that its HF config does not give; the "
                             "checkpoint is damaged: re-save or re-convert it")
        tokenizer = p / "tokenizer"
        if not tokenizer.is_dir() and meta.role == "reference":  # a training checkpoint's reference/: its actor's
            tokenizer = p.parent / "tokenizer"
        return ModelSource(path=p, format="checkpoint", hf_config=meta.hf_config, spec=spec,
                           tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
                           saved_layout={"tp": meta.tp, "pp": meta.pp}, step=step)
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    if (p / "config.json").is_file() and has_weights:
        return ModelSource(path=p, format="hf", hf_config=read_hf_config(p), spec=spec_from_hf(read_hf_config(p)),
                           tokenizer_dir=p)
    if (p / "checkpoints").is_dir():
        found = [d.name for _, d in training.complete(p / "checkpoints")]
        hint = f"; it is a run directory: give {str(p / 'checkpoints' / found[-1])!r}" if found else ""
        raise ValueError(f"{flag} {path!r} is {NEITHER}{hint}")
    lacks = "no *.safetensors weights next to its config.json" if (p / "config.json").is_file() else \
        "no config.json and no hybridflow.json"
    raise ValueError(f"{flag} {path!r} is {NEITHER}: it has {lacks}; point it at one (e.g. "
                     "runs/NAME/checkpoints/final, or an `hybridflow-mg export` directory)")


def _tokenizer(model: ModelSource, flag: str) -> Tokenizer:
    from hybridflow_mg.data.tokenizer import check_fits_model, tokenizer_in

    tokenizer = tokenizer_in(model.tokenizer_dir) if model.tokenizer_dir is not None else None
    if tokenizer is None:
        where = "tokenizer/ folder" if model.format == "checkpoint" else "tokenizer files"
        raise ValueError(f"{flag} {str(model.path)!r} has no {where} (tokenizer.json, tokenizer_config.json or "
                         "tokenizer.model); eval encodes the prompts and decodes the responses with it: copy the "
                         "model's tokenizer files there")
    check_fits_model(tokenizer, model.spec.dims.vocab_size, model.path,
                     fix=f"the tokenizer in {flag} does not belong to this model")
    return tokenizer


def _load_data(path: str, tokenizer: Tokenizer, prompt_key: str) -> tuple[list[PromptItem], list[Any]]:
    """(the prompts of the data file, each row's prompt as the file holds it); one line when the file
    lacks a column eval needs."""
    from hybridflow_mg.data.datasets import _MISSING, load_prompts, lookup, read_rows

    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path!r} does not exist; give a .parquet or .jsonl file of prompts in {SCHEMA}")
    rows = read_rows(path)  # a directory, an unknown extension, a bad line: one line
    if not rows:
        raise ValueError(f"--data {path!r} holds no rows; give a file of prompts in {SCHEMA}")
    columns = ", ".join(sorted({k for row in rows[:100] for k in row})) or "none"
    for key, fix in ((prompt_key, "rename the column or pass --prompt-key COLUMN"),
                     ("reward_model.ground_truth", "eval scores each response against it: add the column")):
        if lookup(rows[0], key) is _MISSING:
            raise ValueError(f"--data {path!r} has no column {key!r} (columns: {columns}); eval reads {SCHEMA}: {fix}")
    data = load_prompts([path], tokenizer, prompt_key=prompt_key, max_prompt_length=1 << 30)  # length: checked by the caller
    return data.items, [lookup(row, prompt_key) for row in rows]


@dataclass(frozen=True)
class EvalInputs:
    """Everything `run` checked, handed to the evaluation itself."""

    model: ModelSource
    ref: ModelSource | None
    tokenizer: Tokenizer
    train: dict[str, int]
    gen: dict[str, int]
    items: list[PromptItem]
    raw_prompts: list[Any]
    """[rows] each row's prompt as the data file holds it (for the samples file)."""
    temperature: float
    max_model_len: int
    rule: str | None
    """--reward, which every sample is scored by; None: each sample's data source picks the rule."""


def check_inputs(args) -> EvalInputs:
    """Every flag, the model, the reference and the data: a one-line ValueError for the first mistake."""
    from hybridflow_mg.commands._args import check_out_file, parse_sizes
    from hybridflow_mg.evaluation.answers import rule_for
    from hybridflow_mg.parallel.launch import discover
    from hybridflow_mg.rewards import DEFAULT_BY_DATA_SOURCE, resolve
    from hybridflow_mg.rollout.standalone import check_kv_cache, check_layouts

    for flag, value in (("--n", args.n), ("--max-tokens", args.max_tokens), ("--kv-cache-mb", args.kv_cache_mb),
                        ("--nproc", args.nproc)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}"
                             + ("; it is the number of samples per prompt (pass@k and maj@k need k ≤ n)"
                                if flag == "--n" else ""))
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 1.0)
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if args.n > 1 and temperature < GREEDY_BELOW:
        raise ValueError(f"--n {args.n} with greedy decoding (--temperature {temperature}) gives {args.n} identical "
                         "samples; sample at a --temperature > 0 or ask for --n 1")
    check_out_file(args.out)
    if args.reward is not None:
        resolve(args.reward)  # an unknown name or a bad path: one line
    model = resolve_model(args.model)
    ref = resolve_model(args.ref, "--ref") if args.ref is not None else None
    if ref is not None and ref.spec.dims != model.spec.dims:
        raise ValueError(f"--ref {args.ref!r} is a different architecture from MODEL (vocabulary, layers or widths "
                         "differ); the KL compares two models of the same architecture and tokenizer")
    tokenizer = _tokenizer(model, "MODEL")
    items, raw = _load_data(args.data, tokenizer, args.prompt_key)
    if args.reward is None:
        for item in items:
            if rule_for(item.data_source) is None:
                raise ValueError(f"--data {args.data!r} row {item.index}: data_source {item.data_source!r} has no "
                                 f"built-in reward rule (data sources containing {', '.join(DEFAULT_BY_DATA_SOURCE)}); "
                                 "name one with --reward NAME or --reward path/to/file.py:fn")
    context = model.spec.max_position_embeddings
    longest = max(items, key=lambda it: len(it.prompt_ids))
    if len(longest.prompt_ids) + args.max_tokens > context:
        raise ValueError(f"--data {args.data!r} row {longest.index}: a prompt of {len(longest.prompt_ids)} tokens + "
                         f"--max-tokens {args.max_tokens} exceeds the model's context of {context} tokens "
                         "(max_position_embeddings); lower --max-tokens or shorten the prompt")
    saved = model.saved_layout or {}
    train = parse_sizes(args.train, ("tp", "pp"), "--train") if args.train is not None else dict(saved)
    gen = parse_sizes(args.gen, ("tp", "pp"), "--gen")
    size = train.get("tp", 1) * train.get("pp", 1)
    if args.train is None and size > 1 and not args.nproc and discover().world_size == 1:
        raise ValueError(f"MODEL {args.model!r} was saved at tp={train.get('tp', 1)} pp={train.get('pp', 1)}, which "
                         f"needs {size} processes: add --nproc {size}, or evaluate it at another layout with "
                         "--train tp=1,pp=1")
    check_layouts(model.spec, train=train, gen=gen, nproc=args.nproc, where=f" of {args.model}")
    max_model_len = len(longest.prompt_ids) + args.max_tokens
    check_kv_cache(model.spec, gen.get("tp", train.get("tp", 1)), gen.get("pp", 1), max_model_len,
                   kv_cache_bytes=args.kv_cache_mb << 20 if args.kv_cache_mb else None, dtype=args.dtype,
                   names=EVAL_OPTIONS)
    return EvalInputs(model=model, ref=ref, tokenizer=tokenizer, train=train, gen=gen, items=items, raw_prompts=raw,
                      temperature=temperature, max_model_len=max_model_len, rule=args.reward)
