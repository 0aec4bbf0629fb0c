"""The scaling sweep's ``results.csv``: one row per (vision, llm, data size) cell.

Written by ``tools/scaling_sweep.py`` (a row appended as each cell finishes, so a crashed sweep
keeps what it did) and read back by it (`read_rows`). Columns, in order: `COLUMNS`.
``compute_flops`` is ``2 * N_vit * D_img + 6 * N_llm * (D_img + D_txt)`` (`compute_flops`).

``tools/fit_scaling_law.py`` reads any results table through `read_fit_rows`: the sweep's, or a
published one with fewer columns and more (a data set column, no compute or wall time).
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from cumo_megatron.files import write_text_atomic

PathLike = Union[str, Path]


@dataclass(frozen=True)
class SweepRow:
    """One finished sweep cell (stage-1 connector pre-training from scratch)."""

    vision: str  # encoder name from the grid
    vision_params: int  # parameters of the vision encoder (the built layers)
    llm: str
    llm_params: int
    data_size: int  # training samples
    final_eval_loss: float  # LM loss on the data size's fixed held-out set
    compute_flops: float
    wall_time_s: float

    @property
    def cell(self) -> tuple[str, str, int]:
        """The grid cell this row answers: (vision, llm, data_size)."""
        return (self.vision, self.llm, self.data_size)


COLUMNS = tuple(f.name for f in dataclasses.fields(SweepRow))
_TYPES = {f.name: f.type for f in dataclasses.fields(SweepRow)}
_CAST = {"str": str, "int": int, "float": float}


def compute_flops(vision_params: int, llm_params: int, image_tokens: int, text_tokens: int) -> float:
    """Training compute of a cell: ``2 * N_vit * D_img + 6 * N_llm * (D_img + D_txt)``.

    The ViT is frozen in stage 1 (forward only: 2 FLOPs per parameter per token); the LLM is
    frozen too but gradients flow through it to the connector (forward + backward: 6).
    ``image_tokens`` / ``text_tokens`` are the tokens seen over the whole run.
    """
    return 2.0 * vision_params * image_tokens + 6.0 * llm_params * (image_tokens + text_tokens)


def _cells(row: SweepRow) -> list:
    """CSV cells of a row; floats round-trip exactly (numpy floats are written as plain floats)."""
    out = []
    for field in dataclasses.fields(SweepRow):
        value = getattr(row, field.name)
        out.append(repr(float(value)) if field.type == "float" else (int(value) if field.type == "int" else value))
    return out


def read_rows(path: PathLike) -> list[SweepRow]:
    """The rows of a results CSV ([] when the file does not exist).

    Raises ``ValueError`` naming the file and line for a wrong header or a malformed value.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} is not the sweep's columns {list(COLUMNS)}")
        for line, record in enumerate(reader, start=2):
            try:
                values = {k: _CAST[_TYPES[k]](record[k]) for k in COLUMNS}
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path} line {line}: malformed value ({err}); fix or delete that row") from None
            rows.append(SweepRow(**values))
    return rows


def append_row(path: PathLike, row: SweepRow) -> None:
    """Append ``row`` to the CSV at ``path`` (header first when new).

    Safe for several sweep processes sharing one file: the append holds an exclusive lock and
    writes one whole line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0, os.SEEK_END)
            writer = csv.writer(handle)
            if handle.tell() == 0:
                writer.writerow(COLUMNS)
            writer.writerow(_cells(row))
            handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_rows(path: PathLike, rows: list[SweepRow]) -> None:
    """Write ``rows`` as a complete CSV at ``path`` (replacing it atomically)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(_cells(row))
    write_text_atomic(path, text.getvalue())


# The fitter's columns: the four it cannot do without, and the sizes it reads when present
# (``vision_params`` for the joint fit, ``llm_params`` to order the LLMs).
FIT_REQUIRED = ("vision", "llm", "data_size", "final_eval_loss")
FIT_OPTIONAL = ("vision_params", "llm_params")


@dataclass(frozen=True)
class FitRow:
    """One point of a results table as the fitter sees it.

    ``group`` holds the (column, value) pairs that, besides the LLM and the encoder, tell curves
    apart (e.g. ``(("data", "laion"),)``): one LLM trained on two data sets gives two curves.
    """

    vision: str
    llm: str
    data_size: float
    final_eval_loss: float
    vision_params: Optional[float] = None
    llm_params: Optional[float] = None
    group: tuple[tuple[str, str], ...] = ()


def as_fit_row(row: Union[SweepRow, FitRow]) -> FitRow:
    """A sweep row (or a fit row, unchanged) as a `FitRow` with no group."""
    if isinstance(row, FitRow):
        return row
    return FitRow(row.vision, row.llm, float(row.data_size), float(row.final_eval_loss),
                  float(row.vision_params), float(row.llm_params))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def group_columns(header: Sequence[str], records: list[dict]) -> list[str]:
    """The columns that separate curves by default: every text column, other than the fitter's
    own, with more than one value. Numeric columns (compute, wall time, seeds) never do."""
    own = set(FIT_REQUIRED) | set(FIT_OPTIONAL)
    out = []
    for name in header:
        values = {r[name] for r in records}
        if name not in own and len(values) > 1 and not all(_is_number(v) for v in values if v != ""):
            out.append(name)
    return out


def read_fit_rows(path: PathLike, group_by: Optional[Sequence[str]] = None) -> list[FitRow]:
    """The rows of any results CSV with at least the `FIT_REQUIRED` columns, in file order.

    Other columns are ignored except those that separate curves: ``group_by`` when given (an
    empty list: none), else `group_columns`. Raises ``ValueError`` naming the file and line for a
    missing column or a malformed value.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or ())]
        reader.fieldnames = header
        records = list(reader)
    missing = [name for name in FIT_REQUIRED if name not in header]
    if missing:
        raise ValueError(
            f"{path}: no column {', '.join(missing)}; a results table needs {', '.join(FIT_REQUIRED)} "
            f"(and vision_params for the joint fit), found {', '.join(header) or 'no header'}"
        )
    if group_by is None:
        group_by = group_columns(header, records)
    unknown = [name for name in group_by if name not in header]
    if unknown:
        raise ValueError(f"{path}: --group-by column {', '.join(unknown)} is not in the header ({', '.join(header)})")
    optional = [name for name in FIT_OPTIONAL if name in header]
    rows = []
    for line, record in enumerate(records, start=2):
        if None in record or any(record[name] is None for name in header):
            raise ValueError(f"{path} line {line}: {len(header)} columns expected; fix or delete that row")
        try:
            sizes = {name: float(record[name]) for name in optional}
            rows.append(FitRow(
                vision=record["vision"], llm=record["llm"], data_size=float(record["data_size"]),
                final_eval_loss=float(record["final_eval_loss"]),
                group=tuple((name, record[name]) for name in group_by), **sizes,
            ))
        except ValueError as err:
            raise ValueError(f"{path} line {line}: malformed value ({err}); fix or delete that row") from None
    return rows


__all__ = [
    "SweepRow", "COLUMNS", "compute_flops", "read_rows", "append_row", "write_rows",
    "FIT_REQUIRED", "FIT_OPTIONAL", "FitRow", "as_fit_row", "group_columns", "read_fit_rows",
]
