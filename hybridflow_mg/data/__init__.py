"""Data: tokenizers, prompt datasets (verl parquet or plain parquet/jsonl), and a synthetic task.

    Tokenizer.from_path(path)                 HF directory or sentencepiece .model, one interface
    build_prompt_data(cfg, tok, default_seed) training batches (seeded, fixed size) + validation
    make_synthetic_task(dir)                  arithmetic data + tiny tokenizer for the CPU quickstart

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
from hybridflow_mg.data.synthetic import (
    ARITHMETIC_SOURCE,
    COUNTDOWN_SOURCE,
    Example,
    SyntheticTask,
    arithmetic_examples,
    countdown_examples,
    make_synthetic_task,
    to_verl_rows,
    tokenizer_corpus,
    warm_start_pairs,
    warm_start_texts,
    write_jsonl,
    write_parquet,
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
    "ARITHMETIC_SOURCE",
    "COUNTDOWN_SOURCE",
    "Example",
    "SyntheticTask",
    "arithmetic_examples",
    "countdown_examples",
    "make_synthetic_task",
    "to_verl_rows",
    "tokenizer_corpus",
    "warm_start_pairs",
    "warm_start_texts",
    "write_jsonl",
    "write_parquet",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "sentencepiece_to_hf",
    "train_sentencepiece",
]
