"""Tokenizers: the slow-LlamaTokenizer re-statement on a real sentencepiece model, HF directories, loading.

Expectations are written from raw sentencepiece encodings of hand-chosen pieces: what the slow
tokenizer of transformers 4.37 (the reference's) does is "split on special-token strings, encode
every piece with sentencepiece, BOS in front" (legacy) or the same without the dummy prefix after
a special token (legacy=False). The same model's outputs from the real transformers 4.37.2 are
checked in test_templates.py (reference_golden).
"""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from cumo_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.fixtures.tiny_models import tiny_sentencepiece

BOS, EOS, UNK = 1, 2, 0


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    path = tiny_sentencepiece(tmp_path_factory.mktemp("sp"))
    return path.parent


@pytest.fixture(scope="module")
def raw(sp_dir):
    """The bare sentencepiece model: its default encoding adds the dummy prefix "▁"."""
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(sp_dir):
    return SentencePieceTokenizer(sp_dir / "tokenizer.model")


def test_special_ids_and_sizes(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (UNK, BOS, EOS)
    assert tok.pad_id == UNK  # the reference sets pad_token = unk_token
    assert tok.vocab_size == 320
    assert tok.legacy is True


def test_plain_text_is_sentencepiece_with_bos(tok, raw):
    text = "A big red circle is left of the blue square."
    assert tok.encode(text) == raw.encode(text)
    assert tok.encode(text, add_bos=True) == [BOS] + raw.encode(text)
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [BOS]
    # Leading / doubled spaces and newlines are kept (LLaMA models: remove_extra_whitespaces=False).
    assert tok.encode(" two  squares\n") == raw.encode(" two  squares\n")
    assert raw.encode(" two  squares\n", out_type=str)[:2] == ["\u2581", "\u2581t"]


def test_legacy_splits_on_special_strings_and_prefixes_each_piece(tok, raw):
    # "</s>" and "<s>" written in the text are the special ids; every piece of text between them is
    # encoded as if it began a text (dummy prefix): the legacy slow tokenizer.
    assert tok.encode("It is red.</s>USER: hi", add_bos=True) == (
        [BOS] + raw.encode("It is red.") + [EOS] + raw.encode("USER: hi")
    )
    # The LLaMA-2 template starts with a literal "<s>": two BOS in a row.
    assert tok.encode("<s>[INST] q", add_bos=True) == [BOS, BOS] + raw.encode("[INST] q")
    assert tok.encode("a<unk>b") == raw.encode("a") + [UNK] + raw.encode("b")
    # Case matters: "<</SYS>>" holds "</S", not "</s>".
    assert EOS not in tok.encode("<</SYS>>")


def test_non_legacy_has_no_prefix_after_special_tokens(sp_dir, raw):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model", legacy=False)
    assert tok.legacy is False
    # "USER: hi" alone starts with a lone "▁" piece (no "▁U" in this vocabulary); after "</s>" the
    # non-legacy tokenizer leaves that "▁" out.
    alone = raw.encode("USER: hi")
    assert raw.id_to_piece(alone[0]) == "\u2581"
    assert tok.encode("It is red.</s>USER: hi", add_bos=True) == [BOS] + raw.encode("It is red.") + [EOS] + alone[1:]
    # A text starting with a special token gets no "▁" in front of it either.
    assert tok.encode("<s>[INST] q", add_bos=True) == [BOS, BOS] + raw.encode("[INST] q")[1:]
    # Plain text is unchanged.
    assert tok.encode("A red circle.") == raw.encode("A red circle.")


def test_decode(tok):
    text = "There are 3 small red circles."
    assert tok.decode(tok.encode(text, add_bos=True)) == text
    assert tok.id_to_piece(EOS) == "</s>"
    with pytest.raises(ValueError, match="image placeholders"):
        tok.decode([BOS, -200, 5])
    # An id beyond the tokenizer is not called a placeholder: it names the tokenizer's range.
    with pytest.raises(ValueError, match=rf"ids \[{tok.vocab_size}\]: this tokenizer has ids 0..{tok.vocab_size - 1} only"):
        tok.decode([BOS, tok.vocab_size, 5])


def test_from_directory_reads_tokenizer_config(sp_dir, tmp_path, raw):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", d / "tokenizer.model")
    # No tokenizer_config.json: legacy, as the slow tokenizer's default.
    assert load_tokenizer(d).legacy is True
    # Vicuna-v1.5-style config: legacy false, special tokens listed in added_tokens_decoder.
    added = {str(i): {"content": c, "lstrip": False, "rstrip": False, "special": True} for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))}
    (d / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "add_bos_token": True, "added_tokens_decoder": added}))
    t = load_tokenizer(d)
    assert isinstance(t, SentencePieceTokenizer) and t.legacy is False
    assert t.encode("x</s>USER") == raw.encode("x") + [EOS] + raw.encode("USER")[1:]
    (d / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": True}))
    with pytest.raises(ValueError, match="add_eos_token"):
        load_tokenizer(d)


def test_added_tokens_from_config_with_rstrip(sp_dir, tmp_path, raw):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", d / "tokenizer.model")
    added = {"320": {"content": "<sep>", "lstrip": False, "rstrip": True, "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    t = load_tokenizer(d)
    assert t.vocab_size == 321
    # rstrip: the token eats the whitespace on its right, so "  b" is encoded as "b".
    assert t.encode("a<sep>  b") == raw.encode("a") + [320] + raw.encode("b")


def test_hf_directory(sp_dir, tmp_path, raw):
    """A tokenizer directory as transformers writes it (tokenizer.json, no tokenizer.model)."""
    from transformers import LlamaTokenizer

    hf_dir = tmp_path / "hf"
    LlamaTokenizer.from_pretrained(str(sp_dir), legacy=True).save_pretrained(str(hf_dir))
    assert not (hf_dir / "tokenizer.model").exists()
    t = load_tokenizer(hf_dir)
    assert isinstance(t, HFTokenizer)
    assert (t.bos_id, t.eos_id, t.unk_id, t.pad_id, t.vocab_size) == (BOS, EOS, UNK, UNK, 320)
    # transformers 5 writes a non-legacy tokenizer: measured, not read from a flag.
    assert t.legacy is False
    sp_nl = SentencePieceTokenizer(sp_dir / "tokenizer.model", legacy=False)
    for text in ("A big red circle.", "It is red.</s>USER: hi ASSISTANT: ", "<s>[INST] q [/INST] a </s>", "\nWhat"):
        assert t.encode(text, add_bos=True) == sp_nl.encode(text, add_bos=True), text
    assert t.encode("A red circle.") == raw.encode("A red circle.")
    assert t.decode(t.encode("A red circle.")) == "A red circle."
    # kind="hf" on a sentencepiece directory goes through transformers as well.
    assert isinstance(load_tokenizer(sp_dir, kind="hf"), HFTokenizer)


def test_load_tokenizer_picks_and_refuses(sp_dir, tmp_path):
    assert isinstance(load_tokenizer(sp_dir / "tokenizer.model"), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown"):
        load_tokenizer(sp_dir, kind="tiktoken")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")
