"""Data: tokenizers and prompt datasets (verl parquet or plain parquet/jsonl).

    Tokenizer.from_path(path)                 HF directory or sentencepiece .model, one interface
    build_prompt_data(cfg, tok, default_seed) training batches (seeded, fixed size) + validation

Importing this package imports neither torch nor transformers; an HF tokenizer imports transformers
when it is loaded.
"""
from hybridflow_mg.data.config import DataConfig
from hybridflow_mg.data.datasets import (
    PromptBatch,
    PromptBatches,
    PromptDataset,
    PromptItem,
    build_prompt_data,
    encode_prompt,
    load_prompts,
    read_rows,
)
from hybridflow_mg.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    sentencepiece_to_hf,
    train_sentencepiece,
)

__all__ = [
    "DataConfig",
    "PromptBatch",
    "PromptBatches",
    "PromptDataset",
    "PromptItem",
    "build_prompt_data",
    "encode_prompt",
    "load_prompts",
    "read_rows",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "sentencepiece_to_hf",
    "train_sentencepiece",
]
