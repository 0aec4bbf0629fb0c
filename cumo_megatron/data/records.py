"""LLaVA JSON records: reading files, weighted mixtures of files, structural checks.

A LLaVA record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``;
a text-only record has no ``image``. Files are a JSON list (``.json``) or JSON lines (``.jsonl``, or
a ``.json`` whose content is one object per line). Every record keeps where it came from (file,
position, JSONL line), so any problem found later can be reported as ``file record N (id=...)``.

A *mixture* combines several files with weights, as stage-3 instruction data does: weight ``w``
takes every record ``floor(w)`` times plus a seeded random ``w - floor(w)`` fraction of the file
(``0.5`` = a fixed random half, ``2`` = every record twice, ``0`` = none). The choice depends only
on the files, the weights and the seed, so a restarted run builds the same index.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from cumo_megatron.errors import EXIT_DATA, UserError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "HUMAN",
    "GPT",
    "DataError",
    "Problem",
    "ProblemKind",
    "RawRecord",
    "DataSource",
    "parse_source_spec",
    "load_file",
    "Mixture",
    "record_images",
    "check_record",
    "approx_text_length",
]

IMAGE_PLACEHOLDER = "<image>"
HUMAN = "human"
GPT = "gpt"


class DataError(UserError, ValueError):
    """Training data cannot be used as it is: the message names the file, record and what to do."""

    label = "data error"
    exit_status = EXIT_DATA


class ProblemKind:
    """Names of the problems a record can have (used as keys in counts and summaries)."""

    BAD_JSON = "bad_json"  # a JSON-lines line that does not parse, or a file that does not
    MALFORMED = "malformed"  # not the LLaVA record shape
    ROLE_ORDER = "role_order"  # turns do not go human, gpt, human, gpt, ...
    MISSING_IMAGE_TOKEN = "missing_image_token"  # an "image" field but fewer <image> than images
    UNEXPECTED_IMAGE_TOKEN = "unexpected_image_token"  # <image> without (enough) images
    MISSING_IMAGE = "missing_image"  # the image file does not exist
    UNREADABLE_IMAGE = "unreadable_image"  # the image file exists but does not decode
    IMAGE_OUTSIDE_FOLDER = "image_outside_folder"  # the path leaves the image folder (.., absolute, link)
    IMAGE_ASPECT_RATIO = "image_aspect_ratio"  # too elongated: padding it to a square would be huge
    TOO_LONG = "too_long"  # tokenised sample longer than max_length
    NO_SUPERVISION = "no_supervision"  # nothing left in the loss (e.g. every answer truncated)
    TOKENIZE_FAILED = "tokenize_failed"  # the template/tokenizer refused the record

    ALL = (
        BAD_JSON,
        MALFORMED,
        ROLE_ORDER,
        MISSING_IMAGE_TOKEN,
        UNEXPECTED_IMAGE_TOKEN,
        MISSING_IMAGE,
        UNREADABLE_IMAGE,
        IMAGE_OUTSIDE_FOLDER,
        IMAGE_ASPECT_RATIO,
        TOO_LONG,
        NO_SUPERVISION,
        TOKENIZE_FAILED,
    )


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record (or with a whole file when ``index`` is None)."""

    kind: str
    source: str
    index: Optional[int]
    record_id: Optional[str]
    message: str
    line: Optional[int] = None

    @property
    def where(self) -> str:
        """``file record N (line L, id=X)`` -- enough to find the record with an editor."""
        if self.index is None:
            return self.source
        extra = []
        if self.line is not None:
            extra.append(f"line {self.line}")
        extra.append(f"id={self.record_id!r}" if self.record_id is not None else "no id")
        return f"{self.source} record {self.index} ({', '.join(extra)})"

    def __str__(self) -> str:
        return f"{self.where}: [{self.kind}] {self.message}"


@dataclass
class RawRecord:
    """A record as read from its file: the parsed object, or the reason it could not be parsed."""

    source: str
    index: int  # position among the file's records (JSON list index / non-blank JSONL line)
    data: Any = None
    error: Optional[str] = None  # set when the JSON line did not parse
    line: Optional[int] = None  # 1-based line number for JSON lines

    @property
    def record_id(self) -> Optional[str]:
        """The record's ``id`` as a string, or None when it has none."""
        if isinstance(self.data, dict) and self.data.get("id") is not None:
            value = self.data["id"]
            # reprlib bounds the text of a nested or huge id (it is only used to name the record).
            return str(value) if isinstance(value, (str, int, float, bool)) else reprlib.repr(value)
        return None

    @property
    def key(self) -> tuple[str, int]:
        """Unique key of the record across a mixture: (file, index)."""
        return (self.source, self.index)

    def problem(self, kind: str, message: str) -> Problem:
        """A `Problem` located at this record."""
        return Problem(kind, self.source, self.index, self.record_id, message, self.line)


@dataclass(frozen=True)
class DataSource:
    """One data file of a mixture, its weight, and optionally its own image folder."""

    path: str
    weight: float = 1.0
    image_folder: Optional[str] = None

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise DataError(f"{self.path}: weight {self.weight!r} must be a finite number >= 0")


def parse_source_spec(spec: str, image_folder: Optional[str] = None) -> DataSource:
    """``"FILE.json"`` or ``"FILE.json:WEIGHT"`` -> `DataSource`.

    Only a trailing ``:number`` is a weight, so paths that contain colons still work.
    """
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    return DataSource(path=path, weight=weight, image_folder=image_folder)


def _looks_like_json_lines(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) > 1 and lines[0].lstrip().startswith("{")


def _parse_error(exc: Exception) -> str:
    """What went wrong parsing JSON, in words (the decoder's position when it has one)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, RecursionError):
        return "nested too deeply (arrays/objects inside each other beyond Python's recursion limit)"
    return f"{type(exc).__name__}: {exc}"  # e.g. an integer of more than 4300 digits


# What the JSON parser raises on bad input: JSONDecodeError (a ValueError), other ValueErrors
# (over-long integers) and RecursionError (deep nesting); none of them must reach the user raw.
_PARSE_ERRORS = (ValueError, RecursionError)


def load_file(path) -> list[RawRecord]:
    """Read every record of a LLaVA ``.json`` (list) or ``.jsonl`` file.

    A JSON-lines line that does not parse becomes a `RawRecord` with ``error`` set (the file stays
    usable and the line is reported); a JSON list that does not parse, or a top-level value that is
    not a list, raises `DataError` since no record of it can be trusted. Parser failures of every
    kind (syntax, nesting deeper than the recursion limit, over-long numbers) are handled so.
    """
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{src}: data file not found; check data.files (or --data)") from None
    except IsADirectoryError:
        raise DataError(f"{src}: is a directory; give a LLaVA .json or .jsonl file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{src}: cannot read the data file ({exc})") from None
    if path.suffix.lower() != ".jsonl":
        try:
            obj = json.loads(text)
        except _PARSE_ERRORS as exc:
            if not _looks_like_json_lines(text):
                raise DataError(
                    f"{src}: not valid JSON ({_parse_error(exc)}); "
                    "a LLaVA data file is a JSON list of records or JSON lines (one record per line)"
                ) from None
        else:
            if isinstance(obj, dict):  # a JSON-lines file with a single record
                obj = [obj]
            if not isinstance(obj, list):
                raise DataError(f"{src}: the top-level JSON value is a {type(obj).__name__}; expected a list of records")
            return [RawRecord(src, i, rec) for i, rec in enumerate(obj)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        index = len(records)
        try:
            records.append(RawRecord(src, index, json.loads(line), line=lineno))
        except _PARSE_ERRORS as exc:
            reason = exc.msg + f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else _parse_error(exc)
            records.append(RawRecord(src, index, None, error=f"bad JSON line: {reason}", line=lineno))
    return records


def record_images(data: Any) -> list[str]:
    """Image file names of a record: ``[]`` without ``image``, one for a string, all of a list."""
    if not isinstance(data, dict) or data.get("image") is None:
        return []
    image = data["image"]
    if isinstance(image, str):
        return [image]
    # A malformed value (a number, a dict) counts as no image here; `check_record` reports it.
    return list(image) if isinstance(image, list) else []


def check_record(raw: RawRecord) -> list[Problem]:
    """Structural problems of one record (no file system, no tokenizer): empty when usable.

    Checks the LLaVA shape, the role order (human first, then alternating, ending with an answer)
    and that the number of ``<image>`` placeholders (all in human turns) equals the number of images.
    Never raises on bad data: a record too deeply nested even to inspect is ``malformed``.
    """
    try:
        return _check_record(raw)
    except RecursionError:
        return [raw.problem(ProblemKind.MALFORMED, "the record is nested too deeply to be a LLaVA record")]


def _check_record(raw: RawRecord) -> list[Problem]:
    if raw.error is not None:
        return [raw.problem(ProblemKind.BAD_JSON, raw.error)]
    data = raw.data
    if not isinstance(data, dict):
        return [raw.problem(ProblemKind.MALFORMED, f"a record must be a JSON object, got {type(data).__name__}")]
    image = data.get("image")
    if image is not None and not (
        (isinstance(image, str) and image) or (isinstance(image, list) and image and all(isinstance(x, str) and x for x in image))
    ):
        return [raw.problem(ProblemKind.MALFORMED, f"'image' must be a file name or a list of them, got {reprlib.repr(image)}")]
    convs = data.get("conversations")
    if not isinstance(convs, list) or not convs:
        return [raw.problem(ProblemKind.MALFORMED, "'conversations' must be a non-empty list of {from, value} turns")]
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            return [raw.problem(ProblemKind.MALFORMED, f"turn {t} must be an object with string 'from' and 'value', got {reprlib.repr(turn)}")]
        if turn["from"] not in (HUMAN, GPT):
            return [raw.problem(ProblemKind.MALFORMED, f"turn {t} has role {turn['from']!r}; LLaVA data uses 'human' and 'gpt'")]
    problems = []
    roles = [turn["from"] for turn in convs]
    expected = [HUMAN if t % 2 == 0 else GPT for t in range(len(roles))]
    if roles != expected or roles[-1] != GPT:
        problems.append(
            raw.problem(
                ProblemKind.ROLE_ORDER,
                f"roles are {roles}; expected human, gpt alternating, starting with human and ending with gpt",
            )
        )
    in_answers = [t for t, turn in enumerate(convs) if turn["from"] == GPT and IMAGE_PLACEHOLDER in turn["value"]]
    if in_answers:
        problems.append(
            raw.problem(ProblemKind.UNEXPECTED_IMAGE_TOKEN, f"{IMAGE_PLACEHOLDER} appears in answer turn(s) {in_answers}")
        )
    n_tokens = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in convs if turn["from"] == HUMAN)
    n_images = len(record_images(data))
    if n_tokens < n_images:
        problems.append(
            raw.problem(
                ProblemKind.MISSING_IMAGE_TOKEN,
                f"the record has {n_images} image(s) but {n_tokens} {IMAGE_PLACEHOLDER} placeholder(s); "
                f"put {IMAGE_PLACEHOLDER} in the human turn where each image belongs",
            )
        )
    elif n_tokens > n_images:
        problems.append(
            raw.problem(
                ProblemKind.UNEXPECTED_IMAGE_TOKEN,
                f"{n_tokens} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s); "
                "remove the placeholder or add the 'image' field",
            )
        )
    return problems


def approx_text_length(data: Any) -> int:
    """Whitespace word count of all turns (without placeholders), the reference's cheap length proxy."""
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        return 1
    words = 0
    for turn in data["conversations"]:
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            words += len(turn["value"].replace(IMAGE_PLACEHOLDER, " ").split())
    return max(words, 1)


@dataclass
class _LoadedSource:
    source: DataSource
    records: list[RawRecord]


@dataclass
class Mixture:
    """Several LLaVA files combined with weights into one indexable list of records.

    ``mixture[i]`` is a `RawRecord`; ``image_folder(i)`` the folder its images are relative to.
    ``lengths(tokens_per_image)`` and ``has_image()`` feed the length/modality-grouped sampler.
    """

    sources: list[DataSource]
    seed: int = 0
    default_image_folder: Optional[str] = None
    _loaded: list[_LoadedSource] = field(init=False, repr=False)
    _source_of: np.ndarray = field(init=False, repr=False)
    _record_of: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if not self.sources:
            raise DataError("no data files given")
        self._loaded = [_LoadedSource(s, load_file(s.path)) for s in self.sources]
        src_ids, rec_ids = [], []
        for k, loaded in enumerate(self._loaded):
            picks = _weighted_picks(len(loaded.records), loaded.source.weight, self.seed, k)
            src_ids.append(np.full(len(picks), k, dtype=np.int64))
            rec_ids.append(picks)
        self._source_of = np.concatenate(src_ids) if src_ids else np.zeros(0, np.int64)
        self._record_of = np.concatenate(rec_ids) if rec_ids else np.zeros(0, np.int64)
        if len(self._source_of) == 0:
            raise DataError(f"the mixture {[s.path for s in self.sources]} selects no records (empty files or zero weights)")

    @classmethod
    def from_specs(cls, specs: Sequence[str], image_folder: Optional[str] = None, seed: int = 0) -> "Mixture":
        """Build from ``FILE[:WEIGHT]`` strings (the CLI form)."""
        return cls([parse_source_spec(s) for s in specs], seed=seed, default_image_folder=image_folder)

    def __len__(self) -> int:
        return len(self._source_of)

    def __getitem__(self, i: int) -> RawRecord:
        return self._loaded[int(self._source_of[i])].records[int(self._record_of[i])]

    def image_folder(self, i: int) -> Optional[str]:
        """Folder the images of entry ``i`` are relative to (the source's own, else the default)."""
        return self._loaded[int(self._source_of[i])].source.image_folder or self.default_image_folder

    def file_records(self) -> Iterable[tuple[DataSource, list[RawRecord]]]:
        """Every file's records once each, whatever the weights (what a validator should check)."""
        return ((loaded.source, loaded.records) for loaded in self._loaded)

    def _per_entry(self, per_record) -> np.ndarray:
        """Evaluate ``per_record(data)`` once per file record, then gather it for every entry."""
        per_file = [np.array([per_record(raw.data) for raw in loaded.records]) for loaded in self._loaded]
        out = np.empty(len(self), dtype=per_file[0].dtype if per_file[0].size else np.int64)
        for k, values in enumerate(per_file):
            mask = self._source_of == k
            out[mask] = values[self._record_of[mask]]
        return out

    def has_image(self) -> np.ndarray:
        """bool [len]: whether each entry carries an image (the modality the sampler groups by)."""
        return self._per_entry(lambda data: bool(record_images(data))).astype(bool)

    def lengths(self, tokens_per_image: int) -> np.ndarray:
        """int64 [len]: approximate token length per entry (words + image tokens), as the reference."""
        return self._per_entry(lambda data: approx_text_length(data) + tokens_per_image * len(record_images(data))).astype(np.int64)


def _weighted_picks(n: int, weight: float, seed: int, source_number: int) -> np.ndarray:
    """Record positions a file of ``n`` records contributes at ``weight`` (see module docstring)."""
    whole = int(math.floor(weight))
    extra = int(round((weight - whole) * n))
    parts = [np.arange(n, dtype=np.int64)] * whole
    if extra:
        rng = np.random.Generator(np.random.PCG64([seed, source_number]))
        parts.append(np.sort(rng.permutation(n)[:extra]).astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
