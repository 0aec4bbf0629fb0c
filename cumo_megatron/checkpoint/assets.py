"""What generation needs besides the weights, carried inside every model checkpoint.

A checkpoint written by the tools (HF imports, ``--cumo`` release imports, upcycled checkpoints)
or by the trainer holds, next to ``model_config.yaml``::

    tokenizer/        the LLM's tokenizer files as the source shipped them (``tokenizer.model``,
                      ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
                      ``added_tokens.json``, ``chat_template.jinja``: whichever it had)
    generation.json   ``{"template": ..., "aspect": ...}``: the prompt template (our names,
                      `cumo_megatron.data.templates`) and the image aspect handling

so ``python -m cumo_megatron.generate --load CKPT`` needs no other flag. The image processor's
other settings (size, mean, std) are the vision section of ``model_config.yaml``.

`export_hf_tokenizer` writes what ``transformers.AutoTokenizer.from_pretrained`` reads (for the
split export's ``language/``): the carried files, plus ``tokenizer_config.json``,
``special_tokens_map.json`` and ``tokenizer.json`` made from them when the source had none.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.files import write_text_atomic

PathLike = Union[str, Path]

TOKENIZER_DIR = "tokenizer"
GENERATION_FILE = "generation.json"
# A tokenizer's files, as publishers ship them; anything else in a source directory is not copied.
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# Files that make a directory a tokenizer (the others only configure one).
_VOCABULARY_FILES = ("tokenizer.model", "tokenizer.json")
ASPECTS = ("pad", "crop")


def default_template(arch: str) -> str:
    """The chat template the released models use for an LLM family (``language.arch``)."""
    return "mistral_instruct" if arch in ("mistral", "mixtral") else "vicuna_v1"


@dataclass
class GenerationSettings:
    """How prompts and images are prepared for the model: template name and image aspect handling."""

    template: str
    aspect: str = "pad"

    def write(self, checkpoint: PathLike) -> Path:
        """Write ``generation.json`` into ``checkpoint``."""
        return write_text_atomic(Path(checkpoint) / GENERATION_FILE, json.dumps(asdict(self), indent=2) + "\n")


def aspect_of_release(config: dict) -> str:
    """Our aspect handling for a LLaVA/CuMo ``config.json`` (``image_aspect_ratio``: ``pad`` pads to a
    square; anything else is the CLIP processor's resize + center crop)."""
    return "pad" if config.get("image_aspect_ratio", "pad") == "pad" else "crop"


def read_generation_settings(checkpoint: PathLike) -> Optional[GenerationSettings]:
    """The carried ``generation.json`` of ``checkpoint`` (None when it has none)."""
    path = Path(checkpoint) / GENERATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        settings = GenerationSettings(template=str(data["template"]), aspect=str(data.get("aspect", "pad")))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); give --template and --aspect instead, or delete it") from err
    if settings.aspect not in ASPECTS:
        raise CheckpointError(f"{path}: aspect={settings.aspect!r}; expected one of {', '.join(ASPECTS)}")
    return settings


def tokenizer_files(source: PathLike) -> list[Path]:
    """The tokenizer files of ``source``: a ``tokenizer.model`` file, or a directory's files among
    `TOKENIZER_FILES` (empty when the directory has no vocabulary file)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir() or not any((source / name).is_file() for name in _VOCABULARY_FILES):
        return []
    return [source / name for name in TOKENIZER_FILES if (source / name).is_file()]


def carried_tokenizer(checkpoint: PathLike) -> Optional[Path]:
    """The ``tokenizer/`` directory ``checkpoint`` carries (None when it carries none)."""
    directory = Path(checkpoint) / TOKENIZER_DIR
    return directory if tokenizer_files(directory) else None


def carry_tokenizer(source: PathLike, checkpoint: PathLike) -> list[str]:
    """Copy the tokenizer at ``source`` (a ``tokenizer.model`` file or a tokenizer directory) into
    ``checkpoint/tokenizer/``, replacing what was there. Returns the names copied (empty: ``source``
    holds no tokenizer).

    What was there is removed first, not overwritten: a trainer's checkpoint holds hard links to
    the files of the checkpoint it started from, and writing into them would change that one too.
    """
    files = tokenizer_files(source)
    if not files:
        return []
    dest = Path(checkpoint) / TOKENIZER_DIR
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    names = []
    for path in files:
        name = "tokenizer.model" if Path(source).is_file() else path.name  # a bare file is a sentencepiece model
        shutil.copyfile(path, dest / name)
        names.append(name)
    return names


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str, flag: str = "--tokenizer") -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary (ids the embedding has no row for).

    A smaller one is accepted: embedding tables are often padded beyond the tokenizer (e.g. to a
    multiple the tensor-parallel split needs), the trainer accepts that pairing, and generation
    never picks an id the tokenizer does not have (`cumo_megatron.inference.generation.generate`'s
    ``vocab_limit``).
    """
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"the tokenizer {where} has {tokenizer.vocab_size} ids but the model's vocabulary has {vocab_size} "
            f"(language.vocab_size): it belongs to another model; give the model's own tokenizer with {flag}"
        )


def export_hf_tokenizer(tokenizer_dir: PathLike, dest: PathLike) -> list[str]:
    """Write a tokenizer ``transformers.AutoTokenizer.from_pretrained(dest)`` loads into ``dest``.

    The carried files are copied as they are; a sentencepiece-only tokenizer also gets the
    ``tokenizer_config.json`` and ``special_tokens_map.json`` our `SentencePieceTokenizer` reads
    it with (``legacy``, BOS added, no EOS) and the ``tokenizer.json`` transformers converts from
    them (so loading needs neither sentencepiece nor protobuf). Returns the names written.
    """
    from cumo_megatron.data.tokenizer import SentencePieceTokenizer

    tokenizer_dir, dest = Path(tokenizer_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tokenizer_files(tokenizer_dir):
        shutil.copyfile(path, dest / path.name)
        written.append(path.name)
    model = dest / "tokenizer.model"
    if not model.is_file():
        return written  # an HF tokenizer: its own files say everything
    sp = SentencePieceTokenizer.from_directory(dest)
    piece = sp.id_to_piece
    specials = {name: piece(i) for name, i in (("bos_token", sp.bos_id), ("eos_token", sp.eos_id),
                                               ("unk_token", sp.unk_id)) if i is not None}
    if not (dest / "tokenizer_config.json").is_file():
        config = dict(specials, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                      legacy=sp.legacy, clean_up_tokenization_spaces=False)
        write_text_atomic(dest / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        written.append("tokenizer_config.json")
    if not (dest / "special_tokens_map.json").is_file():
        write_text_atomic(dest / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
        written.append("special_tokens_map.json")
    if not (dest / "tokenizer.json").is_file():
        written.append(_write_fast_tokenizer(dest))
    return written


def _write_fast_tokenizer(dest: Path) -> str:
    """``tokenizer.json`` of the sentencepiece tokenizer in ``dest``, as transformers converts it
    (transformers' own converter: the file is what its loader expects)."""
    import tempfile

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        hf.save_pretrained(tmp)
        produced = Path(tmp) / "tokenizer.json"
        if not produced.is_file():
            raise CheckpointError(f"transformers wrote no tokenizer.json for the tokenizer in {dest}")
        shutil.copyfile(produced, dest / "tokenizer.json")
    return "tokenizer.json"



def write_generation_assets(checkpoint: PathLike, tokenizer: Optional[PathLike], settings: GenerationSettings) -> list[str]:
    """Carry ``tokenizer`` (a ``tokenizer.model`` file or tokenizer directory; None: none) and
    ``settings`` into ``checkpoint``. Returns the tokenizer file names copied."""
    names = carry_tokenizer(tokenizer, checkpoint) if tokenizer is not None else []
    settings.write(checkpoint)
    return names


def load_checked_tokenizer(path: PathLike, vocab_size: int, flag: str):
    """`load_tokenizer(path)`, as a `CheckpointError` naming ``flag`` when it cannot be read, and
    checked against the model's vocabulary (`check_tokenizer_fits`)."""
    from cumo_megatron.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the tokenizer {path} ({err}); give another with {flag}") from err
    check_tokenizer_fits(tokenizer, vocab_size, str(path), flag)
    return tokenizer


__all__ = [
    "TOKENIZER_DIR",
    "GENERATION_FILE",
    "TOKENIZER_FILES",
    "GenerationSettings",
    "default_template",
    "aspect_of_release",
    "read_generation_settings",
    "tokenizer_files",
    "carried_tokenizer",
    "carry_tokenizer",
    "check_tokenizer_fits",
    "export_hf_tokenizer",
    "write_generation_assets",
    "load_checked_tokenizer",
]
