"""Check a LLaVA dataset before training: the library behind ``tools/validate_data.py``.

Every record of every file is checked once (mixture weights do not matter here) for: JSON that
does not parse, records that are not the LLaVA shape, wrong role order, ``<image>`` placeholders
that do not match the ``image`` field, missing or undecodable image files and, with a tokenizer,
samples longer than ``max_length`` or with nothing in the loss. The report counts each kind and
lists the first offending records as ``file record N (id=...)``.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cumo_megatron.config.schema import IMAGE_TOKEN_ID
from cumo_megatron.data.dataset import EncodeFailure, encode_conversation
from cumo_megatron.data.images import ImageError, load_rgb
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

__all__ = ["FileStats", "ValidationReport", "TokenizerCheck", "check_one", "validate_sources"]


_AT_TRAIN_TIME = {
    ProblemKind.BAD_JSON: "skipped (a JSON list that does not parse stops training at start)",
    ProblemKind.TOO_LONG: "truncated to max_length, or skipped when the cut would split an image",
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
    decode_images: bool = True,
) -> tuple[list[Problem], int]:
    """All problems of one record, and its token count (0 when not tokenised)."""
    structural = check_record(raw)
    problems = list(structural)
    if any(p.kind in (ProblemKind.BAD_JSON, ProblemKind.MALFORMED) for p in problems):
        return problems, 0
    for name in record_images(raw.data):
        path = Path(name) if image_folder is None else Path(image_folder) / name
        if not path.is_file():
            problems.append(raw.problem(ProblemKind.MISSING_IMAGE, f"image file not found: {path}"))
        elif decode_images:
            try:
                load_rgb(path)
            except ImageError as exc:
                problems.append(raw.problem(ProblemKind.UNREADABLE_IMAGE, str(exc)))
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


def validate_sources(
    sources: Sequence[DataSource],
    image_folder: Optional[str] = None,
    tokens: Optional[TokenizerCheck] = None,
    decode_images: bool = True,
    workers: int = 1,
) -> ValidationReport:
    """Check every record of every source once; never raises on bad data (it reports it)."""
    report = ValidationReport()
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
        check = lambda raw: check_one(raw, folder, tokens, decode_images)  # noqa: E731
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
