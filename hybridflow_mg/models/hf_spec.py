"""HF `config.json` → what megatron-core needs: `ModelSpec` (architecture facts) and `TransformerConfig`.

Supported: Llama 2/3 (incl. llama3 and linear rope scaling), Qwen2 (q/k/v biases) and Mistral, as
`*ForCausalLM` or `*ForSequenceClassification` (critic / reward model). Everything else is refused
with one line. Reads both config styles: transformers ≥ 5 (`rope_parameters`) and older files
(`rope_theta` + `rope_scaling`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridflow_mg.models.layouts import ModelDims, check_pp, check_split

FAMILIES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}
_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of one HF model, independent of any parallel layout."""

    family: str
    dims: ModelDims
    norm_eps: float
    rope_theta: float
    rope_type: str
    max_position_embeddings: int
    sliding_window: int | None
    hf_config: dict[str, Any] = field(repr=False, compare=False)

    @property
    def is_value_model(self) -> bool:
        return self.dims.head == "value"


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json as a dict; `path` is the file or its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config at {str(path)!r}; point to a model directory with a config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _rope(config: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    return float(theta), rope_type, {**scaling, **params}


def spec_from_hf(config: dict[str, Any], *, head: str | None = None, vocab_divisor: int = 128) -> ModelSpec:
    """The `ModelSpec` of an HF config; `head` forces "lm" or "value" (default: from the architecture)."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unsupported architecture {archs[0] if archs else model_type!r}: "
                         f"supported are Llama, Qwen2 and Mistral (*ForCausalLM / *ForSequenceClassification)")
    arch = archs[0] if archs else ""
    if arch and not (arch.endswith("ForCausalLM") or arch.endswith("ForSequenceClassification")):
        raise ValueError(f"unsupported architecture {arch!r}: expected a *ForCausalLM or *ForSequenceClassification model")
    if head is None:
        head = "value" if arch.endswith("ForSequenceClassification") else "lm"
    if head not in ("lm", "value"):
        raise ValueError(f"model head must be 'lm' or 'value', got {head!r}")
    if head == "value" and len(config.get("id2label") or {0: ""}) != 1:
        raise ValueError(f"a critic / reward model needs one output (num_labels=1); this config has "
                         f"{len(config['id2label'])}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported; Llama-family models use silu")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported (megatron-core cannot bias the MLP alone)")
    if family == "llama" and config.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported (it also biases o_proj, which megatron-core cannot express alone)")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    theta, rope_type, _ = _rope(config)
    dims = ModelDims(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)) and head == "lm",
        qkv_bias=family == "qwen2",
        head=head,
        vocab_divisor=vocab_divisor,
    )
    window = config.get("sliding_window") if (family == "mistral" or config.get("use_sliding_window")) else None
    return ModelSpec(family=family, dims=dims, norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                     rope_theta=theta, rope_type=rope_type,
                     max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                     sliding_window=int(window) if window else None, hf_config=dict(config))


def check_layout(spec: ModelSpec, tp: int, pp: int, vpp: int = 1) -> None:
    """One-line ValueError when the model cannot be split this way (heads, kv heads, ffn, layers)."""
    check_split(spec.dims, "mcore", tp)
    check_pp(spec.dims.num_layers, pp, vpp)


def rope_inv_freq(spec: ModelSpec):
    """Rotary inverse frequencies exactly as transformers computes them for this config."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if spec.rope_type == "default":
        dim = spec.dims.head_dim
        return 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    extra = {k: v for k, v in spec.hf_config.items() if k not in ("architectures", "transformers_version", "model_type")}
    hf = AutoConfig.for_model(spec.hf_config["model_type"], **extra)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[spec.rope_type](hf, torch.device("cpu"))
    return inv_freq.float()
