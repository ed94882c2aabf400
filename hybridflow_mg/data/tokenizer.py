"""One tokenizer interface over an HF tokenizer directory or a sentencepiece `.model` file.

    tok = Tokenizer.from_path("checkpoints/qwen2.5-0.5b")      # HF: AutoTokenizer, local files only
    tok = Tokenizer.from_path("tiny/tokenizer.model")          # sentencepiece
    tok.encode("23+41=")  ·  tok.decode(ids)  ·  tok.apply_chat_template(messages)  ·  tok.save(dir)

Conventions, the same for both kinds so that the rest of the code never asks which one it has:

* `encode(text)` adds no special tokens; `encode(text, add_bos=True)` prepends BOS when there is one.
* `decode(ids)` drops special tokens (BOS, EOS, PAD): it gives the text a reward function scores.
* `pad_id` is the tokenizer's pad token, else EOS (padded positions are masked anyway).
* `apply_chat_template(messages)` renders the tokenizer's chat template (HF, when it has one) as text
  with the generation prompt, then encodes that text without adding special tokens (templates write
  their own BOS). Without a template, the fallback is plain: the message *contents* joined by "\\n"
  (roles dropped, no generation marker), with BOS prepended when the tokenizer has one. A one-message
  prompt thus gives the same ids as `encode(text, add_bos=True)` of its content.

Also here, for tests and the CPU quickstart (nothing is downloaded): `train_sentencepiece` trains a
tiny BPE model from strings in milliseconds, and `sentencepiece_to_hf` turns one into an HF tokenizer
directory that encodes every text to the same ids.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

HF_FILES = ("tokenizer_config.json", "tokenizer.json")
SP_FILE = "tokenizer.model"
_FIX = "point data.tokenizer at an HF tokenizer directory or a sentencepiece .model file"


class Tokenizer:
    """The interface; build one with `Tokenizer.from_path`. Subclasses: `HFTokenizer`, `SentencePieceTokenizer`."""

    path: Path
    eos_id: int
    pad_id: int
    bos_id: int | None
    vocab_size: int
    """One more than the largest id the tokenizer can produce (special and added tokens included): its
    ids lie in [0, vocab_size). The model may pad beyond it; ids past it are never sampled (the engine
    masks them) and a model smaller than it is refused (`check_fits_model`)."""

    @staticmethod
    def from_path(path: str | os.PathLike) -> "Tokenizer":
        """An HF directory (with tokenizer_config.json or tokenizer.json), a sentencepiece `.model` file,
        or a directory holding only a `tokenizer.model`."""
        p = Path(path)
        if p.is_file() and p.suffix == ".model":
            return SentencePieceTokenizer(p)
        if p.is_dir():
            if any((p / f).is_file() for f in HF_FILES):
                return HFTokenizer(p)
            if (p / SP_FILE).is_file():
                return SentencePieceTokenizer(p / SP_FILE)
            raise ValueError(f"tokenizer directory {str(p)!r} has neither {' nor '.join(HF_FILES)} nor {SP_FILE}; {_FIX}")
        if not p.exists():
            raise ValueError(f"tokenizer path {str(p)!r} does not exist; {_FIX}")
        raise ValueError(f"tokenizer path {str(p)!r} is neither a directory nor a sentencepiece .model file")

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt ids for a list of `{"role", "content"}` messages (see the module docstring)."""
        return self.encode("\n".join(str(m["content"]) for m in messages), add_bos=True)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer files into `directory` (e.g. next to an exported HF model)."""
        raise NotImplementedError

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class HFTokenizer(Tokenizer):
    """`transformers.AutoTokenizer` from a local directory (never the Hub)."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer  # ~3 s of imports: only when an HF tokenizer is used

        self.path = Path(path)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs the path and the first line
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"tokenizer directory {str(self.path)!r} cannot be loaded: {type(e).__name__}: {first}") from None
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer {str(self.path)!r} defines no eos token; set eos_token in its tokenizer_config.json")
        self.eos_id = int(self.hf.eos_token_id)
        self.pad_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_id
        self.bos_id = int(self.hf.bos_token_id) if self.hf.bos_token_id is not None else None
        # added tokens may sit past len() (ids with gaps below them): the largest id is what bounds them
        self.vocab_size = max(len(self.hf), 1 + max(self.hf.get_vocab().values(), default=-1))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._with_bos(list(self.hf.encode(text, add_special_tokens=False)), add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.has_chat_template:
            return super().apply_chat_template(messages)
        text = self.hf.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out))
        return out


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file. No chat template: prompts use the plain fallback."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise ValueError(f"sentencepiece model {str(self.path)!r} cannot be loaded: {e}") from None
        if self.sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {str(self.path)!r} has no eos piece; train it with eos_id >= 0")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._with_bos(self.sp.encode(text), add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])  # control pieces (BOS, EOS, PAD) decode to ""

    def save(self, directory: str | os.PathLike) -> Path:
        """`tokenizer.model` plus the HF files (`sentencepiece_to_hf`), so that an exported model
        directory loads with `AutoTokenizer` as well as with sentencepiece."""
        out = Path(directory)
        sentencepiece_to_hf(self.path, out)
        return out


def tokenizer_in(directory: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it holds no tokenizer file (one that is there
    but does not load raises, as `Tokenizer.from_path` does)."""
    p = Path(directory)
    return Tokenizer.from_path(p) if any((p / f).is_file() for f in (*HF_FILES, SP_FILE)) else None


def check_fits_model(tokenizer: Tokenizer, vocab_size: int, config_file: str | os.PathLike, *,
                     fix: str = "point data.tokenizer at the model's own tokenizer") -> None:
    """Refuse, with one line naming both files, a tokenizer that can produce an id the model has no
    embedding row for (`tokenizer.vocab_size` > the model's `vocab_size`, read from `config_file`).
    The other way round is common and fine: models pad vocab_size past their tokenizer (Qwen2.5:
    151936 rows, 151665 ids), and the engine never samples the padding."""
    if tokenizer.vocab_size <= vocab_size:
        return
    named = tokenizer.path / "tokenizer.json" if (tokenizer.path / "tokenizer.json").is_file() else tokenizer.path
    raise ValueError(f"tokenizer {str(named)!r} produces ids up to {tokenizer.vocab_size - 1} (special and added "
                     f"tokens included) but the model has vocab_size {vocab_size} ({str(config_file)!r}): ids "
                     f"≥ {vocab_size} have no embedding row; {fix}")


def train_sentencepiece(
    texts: Iterable[str],
    path: str | os.PathLike,
    *,
    vocab_size: int = 64,
    split_digits: bool = True,
    byte_fallback: bool = False,
) -> Path:
    """Train a small sentencepiece BPE model on `texts` and write it to `path` (a `.model` file).

    Ids: 0 `<unk>`, 1 `<s>` (BOS), 2 `</s>` (EOS), 3 `<pad>`. Text is kept as given (no Unicode
    normalisation, no dummy-prefix space, repeated spaces kept), so decode(encode(t)) == t for every
    character seen in training. `split_digits` keeps each digit its own piece, which makes arithmetic
    learnable by a tiny model. `vocab_size` is a soft limit: a corpus too small for it yields fewer
    pieces instead of an error. A corpus with more distinct characters than `vocab_size` - 4 fails.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=split_digits,
        byte_fallback=byte_fallback,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def sentencepiece_to_hf(model_path: str | os.PathLike, directory: str | os.PathLike, *, chat_template: str | None = None) -> Path:
    """Write an HF tokenizer directory equivalent to a sentencepiece BPE model.

    For models from `train_sentencepiece` (identity normalisation) every text encodes to the same
    ids either way; a model with Unicode normalisation rules (most published ones) agrees on
    ordinary text, as no normaliser is carried over. Decoding differs only at `<unk>` (sentencepiece
    writes " ⁇ ", HF drops it with the other special tokens).

    transformers extracts the BPE merges from the model (through `LlamaTokenizer`); the result is saved
    as a plain `tokenizers` backend, because `LlamaTokenizer` rebuilds its BPE with byte fallback and
    no unknown token on load, which would drop characters the model maps to `<unk>`. The `.model`
    file is copied along as `tokenizer.model`. `chat_template` (Jinja text) is stored when given.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    from sentencepiece import sentencepiece_model_pb2

    model_path, out = Path(model_path), Path(directory)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"sentencepiece model {str(model_path)!r} is not BPE; only BPE models convert to an HF directory here")
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:  # only the .model there: transformers must convert it
        shutil.copyfile(model_path, Path(scratch) / SP_FILE)
        llama = LlamaTokenizer.from_pretrained(
            scratch, add_prefix_space=proto.normalizer_spec.add_dummy_prefix, local_files_only=True
        )
    spec = json.loads(llama.backend_tokenizer.to_str())
    spec["model"]["unk_token"] = piece(sp.unk_id())
    spec["model"]["byte_fallback"] = any(sp.is_byte(i) for i in range(sp.vocab_size()))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=RustTokenizer.from_str(json.dumps(spec)),
        unk_token=piece(sp.unk_id()),
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        pad_token=piece(sp.pad_id()),
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    if model_path.resolve() != (out / SP_FILE).resolve():
        shutil.copyfile(model_path, out / SP_FILE)
    return out
