"""Check a LLaVA dataset before training: the library behind ``tools/validate_data.py``.

Every record of every file is checked once (mixture weights do not matter here) for: JSON that
does not parse, records that are not the LLaVA shape, wrong role order, ``<image>`` placeholders
that do not match the ``image`` field, missing or undecodable image files, image paths that leave
the image folder, images too elongated to pad to a square and, with a tokenizer, samples longer
than ``max_length`` or with nothing in the loss. The report counts each kind and lists the first
offending records as ``file record N (id=...)``; `ValidationReport.to_dict` is the same report
for machines (every bad record with file, index, id, kind and reason).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from cumo_megatron.config.schema import IMAGE_TOKEN_ID
from cumo_megatron.data.dataset import EncodeFailure, encode_conversation
from cumo_megatron.data.images import ImageError, image_path, is_image_file, load_rgb
from cumo_megatron.data.records import (
    DataError,
    DataSource,
    Problem,
    ProblemKind,
    RawRecord,
    check_record,
    load_file,
    record_images,
)

__all__ = ["FileStats", "ImageCheck", "ValidationReport", "TokenizerCheck", "check_one", "validate_sources"]

DEFAULT_MAX_ASPECT_RATIO = 20.0  # the default of data.max_aspect_ratio


_AT_TRAIN_TIME = {
    ProblemKind.BAD_JSON: "skipped (a JSON list that does not parse stops training at start)",
    ProblemKind.TOO_LONG: "truncated to max_length, or skipped when the cut would split an image",
    ProblemKind.IMAGE_OUTSIDE_FOLDER: "skipped (data.allow_images_outside=true reads it)",
    ProblemKind.IMAGE_ASPECT_RATIO: "skipped (data.max_aspect_ratio sets the bound)",
}


@dataclass
class TokenizerCheck:
    """What the length / supervision checks need (all optional together)."""

    tokenizer: Any
    template: Any
    max_length: int
    tokens_per_image: int
    image_token_id: int = IMAGE_TOKEN_ID


@dataclass
class ImageCheck:
    """How images are checked, as training reads them (``data.allow_images_outside`` and
    ``data.max_aspect_ratio``); ``decode`` false only checks that files exist (and their place)."""

    decode: bool = True
    allow_outside: bool = False
    max_aspect_ratio: Optional[float] = DEFAULT_MAX_ASPECT_RATIO


@dataclass
class FileStats:
    """Counts for one data file."""

    path: str
    weight: float
    records: int = 0
    with_image: int = 0
    bad_records: int = 0
    max_tokens: int = 0
    file_error: Optional[str] = None


@dataclass
class ValidationReport:
    """Result of `validate_sources`: per-file counts and every problem found."""

    files: list[FileStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what the checks used (max length, image rules)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    @property
    def counts(self) -> dict[str, int]:
        """Problems per kind."""
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def bad_ids(self) -> set[Optional[str]]:
        """Ids of the records with at least one problem."""
        return {p.record_id for p in self.problems if p.index is not None}

    def to_dict(self) -> dict:
        """The report as JSON-able data: settings, per-file counts, problems per kind, and every
        problem with ``file``, ``index`` (None for the whole file), ``line``, ``id``, ``kind``,
        ``reason`` and what training does with it."""
        return {
            "ok": self.ok,
            "settings": dict(self.settings),
            "files": [
                {"file": f.path, "weight": f.weight, "records": f.records, "with_image": f.with_image,
                 "text_only": f.records - f.with_image, "bad_records": f.bad_records,
                 "max_tokens": f.max_tokens or None, "error": f.file_error}
                for f in self.files
            ],
            "counts": dict(sorted(self.counts.items())),
            "bad_records": sum(f.bad_records for f in self.files),
            "problems": [
                {"file": p.source, "index": p.index, "line": p.line, "id": p.record_id, "kind": p.kind,
                 "reason": p.message, "at_train_time": _AT_TRAIN_TIME.get(p.kind, "skipped")}
                for p in self.problems
            ],
        }

    def format(self, show: int = 10) -> str:
        """Summary table, counts per kind, and the first ``show`` problems."""
        rows = [("file", "weight", "records", "image", "text", "bad", "max tokens")]
        for f in self.files:
            rows.append(
                (
                    f.path,
                    f"{f.weight:g}",
                    str(f.records),
                    str(f.with_image),
                    str(f.records - f.with_image),
                    "UNREADABLE" if f.file_error else str(f.bad_records),
                    str(f.max_tokens) if f.max_tokens else "-",
                )
            )
        total = lambda attr: sum(getattr(f, attr) for f in self.files)  # noqa: E731
        rows.append(
            (
                "TOTAL",
                "",
                str(total("records")),
                str(total("with_image")),
                str(total("records") - total("with_image")),
                str(total("bad_records")),
                str(max((f.max_tokens for f in self.files), default=0) or "-"),
            )
        )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        if self.ok:
            lines.append("\nno problems found")
            return "\n".join(lines)
        lines.append("\nproblems by kind (and what training does with them):")
        for kind in ProblemKind.ALL:
            if kind in self.counts:
                lines.append(f"  {kind:<24}{self.counts[kind]:>8}   {_AT_TRAIN_TIME.get(kind, 'skipped')}")
        lines.append(f"\nfirst {min(show, len(self.problems))} of {len(self.problems)} problem(s):")
        lines.extend(f"  {p}" for p in self.problems[:show])
        return "\n".join(lines)


def check_one(
    raw: RawRecord,
    image_folder: Optional[str],
    tokens: Optional[TokenizerCheck] = None,
    images: ImageCheck | bool = True,
) -> tuple[list[Problem], int]:
    """All problems of one record, and its token count (0 when not tokenised).

    ``images`` is an `ImageCheck` (a bool is read as ``ImageCheck(decode=images)``).
    """
    if isinstance(images, bool):
        images = ImageCheck(decode=images)
    structural = check_record(raw)
    problems = list(structural)
    if any(p.kind in (ProblemKind.BAD_JSON, ProblemKind.MALFORMED) for p in problems):
        return problems, 0
    for name in record_images(raw.data):
        problem = _image_problem(raw, image_folder, name, images)
        if problem is not None:
            problems.append(problem)
    if tokens is None or structural:
        # A record with the wrong role order or image placeholders does not tokenise meaningfully;
        # a missing image does not change the tokens, so those records are still length-checked.
        return problems, 0
    # Ask for the untruncated sample: the true length is what the over-length check reports.
    enc = encode_conversation(
        raw.data["conversations"],
        template=tokens.template,
        tokenizer=tokens.tokenizer,
        tokens_per_image=tokens.tokens_per_image,
        max_length=sys.maxsize,
        image_token_id=tokens.image_token_id,
        has_image=bool(record_images(raw.data)),
        sample_id=raw.record_id,
    )
    if isinstance(enc, EncodeFailure):
        problems.append(raw.problem(enc.kind, enc.message))
        return problems, 0
    n = len(enc.input_ids)
    if n > tokens.max_length:
        problems.append(raw.problem(ProblemKind.TOO_LONG, f"{n} tokens > max_length {tokens.max_length}"))
    return problems, n


def _image_problem(raw: RawRecord, folder: Optional[str], name: str, images: ImageCheck) -> Optional[Problem]:
    """The problem of one image of ``raw`` as training would meet it (`ImageProcessor.load`), or None."""
    try:
        path = image_path(folder, name, images.allow_outside)
        if images.decode:
            load_rgb(path, images.max_aspect_ratio)
        elif not is_image_file(path):
            return raw.problem(ProblemKind.MISSING_IMAGE, f"image file not found: {path}")
    except ImageError as exc:
        return raw.problem(exc.kind, str(exc))
    return None


def validate_sources(
    sources: Sequence[DataSource],
    image_folder: Optional[str] = None,
    tokens: Optional[TokenizerCheck] = None,
    decode_images: bool = True,
    workers: int = 1,
    allow_images_outside: bool = False,
    max_aspect_ratio: Optional[float] = DEFAULT_MAX_ASPECT_RATIO,
) -> ValidationReport:
    """Check every record of every source once; never raises on bad data (it reports it)."""
    images = ImageCheck(decode_images, allow_images_outside, max_aspect_ratio)
    report = ValidationReport(settings={
        "image_folder": image_folder, "decode_images": decode_images,
        "allow_images_outside": allow_images_outside, "max_aspect_ratio": max_aspect_ratio,
        "max_length": tokens.max_length if tokens else None,
        "template": getattr(tokens.template, "name", tokens.template) if tokens else None,
        "tokens_per_image": tokens.tokens_per_image if tokens else None,
    })
    for source in sources:
        stats = FileStats(source.path, source.weight)
        report.files.append(stats)
        try:
            records = load_file(source.path)
        except DataError as exc:
            stats.file_error = str(exc)
            report.problems.append(Problem(ProblemKind.BAD_JSON, source.path, None, None, str(exc)))
            continue
        folder = source.image_folder or image_folder
        check = lambda raw: check_one(raw, folder, tokens, images)  # noqa: E731
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(check, records, chunksize=64))
        else:
            results = [check(raw) for raw in records]
        stats.records = len(records)
        stats.with_image = sum(1 for raw in records if record_images(raw.data))
        for problems, n_tokens in results:
            stats.max_tokens = max(stats.max_tokens, n_tokens)
            if problems:
                stats.bad_records += 1
                report.problems.extend(problems)
    return report
