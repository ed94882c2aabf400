"""The Tokenizer wrapper over sentencepiece and HF directories, built offline from generated text."""
import random
import re

import pytest

from hybridflow_mg.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_fits_model,
    sentencepiece_to_hf,
    tokenizer_in,
    train_sentencepiece,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _corpus():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "answer", "is", "user", "assistant", "system"]
    lines = [" ".join(rng.choice(words) for _ in range(6)) + f" {rng.randint(0, 999)}+{rng.randint(0, 99)}=" for _ in range(300)]
    return lines + ["<>\nHello, World!"]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(_corpus(), tmp_path_factory.mktemp("sp") / "tiny.model", vocab_size=64)


@pytest.fixture(scope="module")
def hf_dir(sp_path, tmp_path_factory):
    return sentencepiece_to_hf(sp_path, tmp_path_factory.mktemp("hf"))


KNOWN = ["the cat sat on the mat 12+34=", "  sat  mat\n", "user\nassistant", "Hello, World!", "", "7"]
TEXTS = KNOWN + ["unseen characters: qjz ü"]  # these map to <unk>


def test_sentencepiece_basics(sp_path):
    tok = Tokenizer.from_path(sp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert 20 < tok.vocab_size <= 64
    for text in KNOWN:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # identity normalisation: exact round trip of seen characters
        assert tok.encode(text, add_bos=True) == [tok.bos_id, *ids]
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # special tokens dropped
    assert tok.encode("1234") == [tok.encode(d)[0] for d in "1234"]  # split_digits: one piece per digit


def test_sentencepiece_and_hf_directory_agree(sp_path, hf_dir):
    sp, hf = Tokenizer.from_path(sp_path), Tokenizer.from_path(hf_dir)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size)
    for text in TEXTS:
        assert hf.encode(text) == sp.encode(text), text
    for text in KNOWN:  # <unk> decodes differently (sentencepiece: " ⁇ ", HF: dropped as special)
        assert hf.decode(hf.encode(text)) == sp.decode(sp.encode(text)) == text
    assert 0 in sp.encode(TEXTS[-1])
    messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "12+34="}]
    assert not hf.has_chat_template and not sp.has_chat_template
    # the plain fallback: contents joined by "\n", BOS first
    assert hf.apply_chat_template(messages) == sp.apply_chat_template(messages) == sp.encode("the cat\n12+34=", add_bos=True)


def test_hf_chat_template(sp_path, tmp_path):
    hf = Tokenizer.from_path(sentencepiece_to_hf(sp_path, tmp_path / "chat", chat_template=CHAT_TEMPLATE))
    assert hf.has_chat_template
    messages = [{"role": "user", "content": "12+34="}]
    assert hf.apply_chat_template(messages) == hf.encode("<user>12+34=\n<assistant>")


def test_save_and_reload(sp_path, hf_dir, tmp_path):
    sp = Tokenizer.from_path(sp_path)
    out = sp.save(tmp_path / "export_sp")  # tokenizer.model + HF files: loads both ways
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()
    again = Tokenizer.from_path(out)
    assert isinstance(again, HFTokenizer) and again.encode(TEXTS[0]) == sp.encode(TEXTS[0])
    assert SentencePieceTokenizer(out / "tokenizer.model").encode(TEXTS[0]) == sp.encode(TEXTS[0])
    hf = Tokenizer.from_path(hf_dir)
    copy = Tokenizer.from_path(hf.save(tmp_path / "export_hf"))
    assert copy.encode(TEXTS[2]) == hf.encode(TEXTS[2])


def test_directory_with_only_a_model_file(sp_path, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_path.read_bytes())
    assert isinstance(Tokenizer.from_path(tmp_path), SentencePieceTokenizer)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing")
    with pytest.raises(ValueError, match="has neither tokenizer_config.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot be loaded"):
        Tokenizer.from_path(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="at least one"):
        train_sentencepiece(["", ""], tmp_path / "x.model")


def test_added_tokens_count_and_a_model_without_their_rows_is_refused(hf_dir, tmp_path):
    """vocab_size bounds every id the tokenizer produces, added special tokens included; a model with
    fewer embedding rows is one line naming both files, one with more (padded) is fine."""
    base = Tokenizer.from_path(hf_dir)
    base.hf.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    more = Tokenizer.from_path(base.save(tmp_path / "more"))
    assert more.vocab_size == len(base.hf) and more.encode("<tool>") == [more.vocab_size - 1]
    check_fits_model(more, more.vocab_size, "m/config.json")
    check_fits_model(more, more.vocab_size + 64, "m/config.json")  # padded past the tokenizer, as Qwen2.5's
    top = more.vocab_size - 1
    line = rf"^tokenizer '{re.escape(str(tmp_path / 'more' / 'tokenizer.json'))}' produces ids up to {top} .* " \
           rf"vocab_size {top} \('m/config.json'\)"
    with pytest.raises(ValueError, match=line):
        check_fits_model(more, more.vocab_size - 1, "m/config.json")
    assert tokenizer_in(tmp_path / "more").vocab_size == more.vocab_size and tokenizer_in(tmp_path) is None
