"""Tokenizers for the prompt templates: a sentencepiece model, or a local Hugging Face directory.

The reference (CuMo / LLaVA, transformers 4.37.2) loads the LLM's tokenizer with ``use_fast=False``:
the *slow*, sentencepiece-backed ``LlamaTokenizer``. `SentencePieceTokenizer` reproduces what that
tokenizer returns for ``tokenizer(text).input_ids``, id for id, from the same ``tokenizer.model``:

1. The text is split on the special-token strings (``<unk>``, ``<s>``, ``</s>`` and any added
   token): a literal ``</s>`` or ``<s>`` *inside the text* becomes that token's id. The LLaMA-2
   style template relies on this (its prompt starts with a literal ``<s>``).
2. Each piece of text between special tokens is encoded on its own by sentencepiece.
   ``legacy=True`` (the slow tokenizer's default, used when ``tokenizer_config.json`` has no
   ``legacy``): every piece gets sentencepiece's dummy prefix, so ``"</s>USER"`` encodes ``USER``
   as if it began a text (``"▁US"...``).
   ``legacy=False``: only the very start of the text gets the ``▁`` prefix; a piece after a special
   token is encoded without it (transformers' "unk trick" for pieces starting with a space).
3. ``add_bos=True`` puts one BOS id in front (``add_bos_token``; LLaMA/Mistral/Vicuna never add EOS).

`HFTokenizer` wraps ``transformers.AutoTokenizer`` on a local directory: it tokenizes the way that
directory's files say (transformers 5 loads the ``tokenizers`` backend), which can differ from the
slow tokenizer on text pieces that start with a space. For reference parity give the
``tokenizer.model``; `load_tokenizer` does so by itself when a directory contains one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cumo_megatron.errors import EXIT_CONFIG, UserError

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "TokenizerError",
    "load_tokenizer",
]

_SPIECE_UNDERLINE = "\u2581"  # "▁", sentencepiece's visible space


class Tokenizer:
    """What the templates need from a tokenizer.

    Attributes: ``bos_id``, ``eos_id``, ``unk_id`` (ints or None), ``pad_id`` (the reference sets
    ``pad_token = unk_token``, so the unk id unless the tokenizer defines a pad), ``vocab_size``
    (ids are ``0 .. vocab_size-1``), ``legacy`` (whether a text piece that follows a special token
    is encoded as if it began a text; the reference's ``preprocess_v1`` reads this flag).
    """

    bos_id: Optional[int]
    eos_id: Optional[int]
    unk_id: Optional[int]
    pad_id: int
    vocab_size: int
    legacy: bool

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in it become their ids), BOS first if asked."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of real token ids (no image placeholders: negative ids are refused)."""
        raise NotImplementedError

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        negative = [i for i in ids if i < 0]
        if negative:
            raise ValueError(
                f"cannot decode ids {negative[:5]}: image placeholders (negative ids) must be removed before decoding"
            )
        beyond = [i for i in ids if i >= self.vocab_size]
        if beyond:
            raise ValueError(
                f"cannot decode ids {beyond[:5]}: this tokenizer has ids 0..{self.vocab_size - 1} only; the ids come "
                "from a model with a larger vocabulary (generate with vocab_limit=tokenizer.vocab_size, or use the "
                "model's own tokenizer)"
            )
        return ids


@dataclass(frozen=True)
class _AddedToken:
    """A string the slow tokenizer never splits, and whether it eats whitespace on either side."""

    id: int
    lstrip: bool = False
    rstrip: bool = False
    special: bool = True  # special tokens (not plain added ones) take part in the legacy=False "▁" rule


class SentencePieceTokenizer(Tokenizer):
    """The slow ``LlamaTokenizer`` of transformers 4.37 re-stated on a sentencepiece ``tokenizer.model``.

    ``legacy``: see the module docstring (True is what LLaMA/Mistral/Mixtral checkpoints without a
    ``legacy`` entry get). ``added_tokens``: extra unsplittable strings ``{content: id}`` (or
    `_AddedToken`), as a ``tokenizer_config.json`` lists them; ``<unk>``/``<s>``/``</s>`` are always
    there. Use `from_directory` for a checkpoint directory.
    """

    def __init__(self, model_path, *, legacy: bool = True, added_tokens: Optional[dict] = None):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found (expected a tokenizer.model file)")
        self.path = path
        self.legacy = bool(legacy)
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        # legacy=False: transformers switches sentencepiece's dummy prefix off and adds the "▁"
        # itself, only at the start of the whole text.
        self._sp_text = self._sp if self.legacy else self._without_dummy_prefix(path)

        def special(i: int) -> Optional[int]:
            return i if i >= 0 else None

        self.unk_id = special(self._sp.unk_id())
        self.bos_id = special(self._sp.bos_id())
        self.eos_id = special(self._sp.eos_id())
        sp_pad = special(self._sp.pad_id())
        # The reference sets tokenizer.pad_token = tokenizer.unk_token (LLaMA ships no pad).
        self.pad_id = sp_pad if sp_pad is not None else (self.unk_id if self.unk_id is not None else 0)

        self._added: dict[str, _AddedToken] = {}
        for i in (self.unk_id, self.bos_id, self.eos_id, sp_pad):
            if i is not None:
                self._added[self._sp.id_to_piece(i)] = _AddedToken(i)
        for content, tok in (added_tokens or {}).items():
            self._added[content] = tok if isinstance(tok, _AddedToken) else _AddedToken(int(tok))
        self.vocab_size = max([self._sp.get_piece_size()] + [t.id + 1 for t in self._added.values()])
        # Longest string first: at one position the longest special token wins (transformers' Trie).
        alternatives = sorted(self._added, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")
        self._unk_piece = self._sp.id_to_piece(self.unk_id) if self.unk_id is not None else "<unk>"
        self._unk_len = len(self._sp_text.encode(self._unk_piece))

    @staticmethod
    def _without_dummy_prefix(path: Path):
        import sentencepiece as spm

        proto = _model_proto_class()()
        proto.ParseFromString(path.read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto.SerializeToString())
        return sp

    @classmethod
    def from_directory(cls, directory) -> "SentencePieceTokenizer":
        """A checkpoint directory with ``tokenizer.model`` (+ optional ``tokenizer_config.json``).

        Reads ``legacy`` (absent/null -> True, as the slow tokenizer) and the added tokens. Refuses
        ``add_bos_token: false`` or ``add_eos_token: true``: the templates' masking arithmetic (the
        reference's) assumes exactly one BOS and no EOS added by the tokenizer.
        """
        directory = Path(directory)
        model = directory / "tokenizer.model"
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if cfg.get("add_bos_token", True) is not True or cfg.get("add_eos_token", False) is not False:
            raise ValueError(
                f"{cfg_path}: add_bos_token={cfg.get('add_bos_token', True)!r}, "
                f"add_eos_token={cfg.get('add_eos_token', False)!r} is not supported; the CuMo templates "
                "need a tokenizer that adds one BOS and no EOS (as LLaMA, Vicuna, Mistral ship)"
            )
        legacy = cfg.get("legacy")
        added: dict[str, _AddedToken] = {}
        for key, spec in (cfg.get("added_tokens_decoder") or {}).items():
            added[spec["content"]] = _AddedToken(
                int(key), bool(spec.get("lstrip")), bool(spec.get("rstrip")), bool(spec.get("special", True))
            )
        extra = directory / "added_tokens.json"  # the older format: {content: id}
        if extra.is_file():
            for content, i in json.loads(extra.read_text()).items():
                added.setdefault(content, _AddedToken(int(i)))
        return cls(model, legacy=True if legacy is None else bool(legacy), added_tokens=added)

    # -- tokenization -------------------------------------------------------------------------

    def _pieces(self, text: str) -> list[str]:
        """transformers 4.37 ``LlamaTokenizer.tokenize``: sentencepiece pieces and special strings."""
        if not text:
            return []
        if not self.legacy:
            text = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ")
        parts = self._special_re.split(text)  # odd positions are the special tokens
        # Added tokens with lstrip/rstrip eat the whitespace next to them.
        for k in range(1, len(parts), 2):
            tok = self._added[parts[k]]
            if tok.rstrip and k + 1 < len(parts):
                parts[k + 1] = parts[k + 1].lstrip()
            if tok.lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
        pieces: list[str] = []
        for k, part in enumerate(parts):
            if not part:
                continue
            if k % 2:
                pieces.append(part)
            else:
                pieces.extend(self._encode_text(part))
        if not self.legacy and len(pieces) > 1 and pieces[0] == _SPIECE_UNDERLINE and self._is_special(pieces[1]):
            pieces = pieces[1:]  # "▁" added in front of a text that starts with a special token
        return pieces

    def _is_special(self, piece: str) -> bool:
        tok = self._added.get(piece)
        return tok is not None and tok.special

    def _encode_text(self, text: str) -> list[str]:
        """transformers 4.37 ``LlamaTokenizer._tokenize`` on one piece of text between special tokens."""
        if self.legacy or not text.startswith((_SPIECE_UNDERLINE, " ")):
            return self._sp_text.encode(text, out_type=str)
        # Without the dummy prefix sentencepiece would swallow a leading "▁": encode behind "<unk>"
        # and cut it off again.
        pieces = self._sp_text.encode(self._unk_piece + text, out_type=str)
        return pieces[self._unk_len :] if len(pieces) >= self._unk_len else pieces

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """``LlamaTokenizer(text).input_ids`` (``add_bos=True``) or its ids without the BOS."""
        ids = [self._added[p].id if p in self._added else self._sp.piece_to_id(p) for p in self._pieces(text)]
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Sentencepiece decoding (control tokens such as BOS/EOS decode to nothing)."""
        return self._sp.decode(self._check_ids(ids))

    def id_to_piece(self, i: int) -> str:
        """The sentencepiece piece (``"▁red"``, ``"<0x0A>"``, ``"</s>"``) of one id, for debugging."""
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, legacy={self.legacy})"


def _model_proto_class():
    """sentencepiece's ``ModelProto`` message class (needs ``protobuf``).

    sentencepiece and transformers each ship a copy of ``sentencepiece_model.proto``; protobuf
    refuses to register the same file twice, so use whichever copy is already loaded.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except TypeError:  # "duplicate file name sentencepiece_model.proto": another copy is registered
        from google.protobuf import descriptor_pool, message_factory

        descriptor = descriptor_pool.Default().FindMessageTypeByName("sentencepiece.ModelProto")
        return message_factory.GetMessageClass(descriptor)
    return model_pb2.ModelProto


class HFTokenizer(Tokenizer):
    """``transformers.AutoTokenizer`` on a local directory (never the hub).

    ``encode`` asks for the ids without the tokenizer's own special tokens and puts the BOS in front
    itself, so BOS handling is the same whatever the directory's post-processor says. ``legacy`` is
    *measured* (does a piece after ``</s>`` start like a new text?) rather than read: the
    reference's masking depends on that behaviour, and transformers 5 no longer keeps the flag
    in step with what its tokenizers backend does.
    """

    def __init__(self, directory):
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} not found (HFTokenizer reads local directories only)")
        self.path = directory
        self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        self.unk_id = self._tok.unk_token_id
        pad = self._tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.unk_id if self.unk_id is not None else 0)
        self.vocab_size = len(self._tok)
        self.legacy = self._measure_legacy()

    def _measure_legacy(self) -> bool:
        eos = self._tok.eos_token
        if not eos:
            return True
        after_special = self.encode(eos + "USER")[1:]
        return after_special == self.encode("USER")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """The directory's tokenization of ``text`` without added specials, BOS first if asked."""
        ids = list(self._tok(text, add_special_tokens=False)["input_ids"])
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The directory's decoding, special tokens kept."""
        return self._tok.decode(self._check_ids(ids))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, legacy={self.legacy})"


class TokenizerError(UserError, FileNotFoundError, ValueError):
    """A tokenizer path that does not exist or does not load (a path the user gave: exit status 2).

    Both a FileNotFoundError and a ValueError, the types `load_tokenizer` raised before it existed.
    """

    label = "configuration error"
    exit_status = EXIT_CONFIG


def load_tokenizer(path, kind: str = "auto") -> Tokenizer:
    """A tokenizer from ``path``: a ``tokenizer.model`` file or a checkpoint/tokenizer directory.

    ``kind="auto"``: a file -> `SentencePieceTokenizer`; a directory holding ``tokenizer.model`` ->
    `SentencePieceTokenizer.from_directory` (the reference used the slow sentencepiece tokenizer);
    any other directory -> `HFTokenizer`. ``kind="sentencepiece"`` / ``"hf"`` force one. A path
    that does not exist, or files that do not load, raise `TokenizerError`.
    """
    path = Path(path)
    if kind not in ("auto", "sentencepiece", "hf"):
        raise ValueError(f"tokenizer kind {kind!r} is unknown; choose auto, sentencepiece or hf")
    if not path.exists():
        raise TokenizerError(
            f"tokenizer path {path} does not exist (give a tokenizer.model or a tokenizer directory: "
            "data.tokenizer or --tokenizer)"
        )
    try:
        return _load(path, kind)
    except TokenizerError:
        raise
    except Exception as exc:  # sentencepiece / transformers raise many types for unusable files
        raise TokenizerError(
            f"cannot load the tokenizer at {path} ({type(exc).__name__}: {str(exc).strip()[:300]}); "
            "give a sentencepiece tokenizer.model or a Hugging Face tokenizer directory"
        ) from None


def _load(path: Path, kind: str) -> Tokenizer:
    if path.is_file():
        if kind == "hf":
            raise TokenizerError(f"{path} is a file; an HF tokenizer is a directory")
        return SentencePieceTokenizer(path)
    if kind == "hf":
        return HFTokenizer(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_directory(path)
    if kind == "sentencepiece":
        raise TokenizerError(f"{path} has no tokenizer.model")
    return HFTokenizer(path)
