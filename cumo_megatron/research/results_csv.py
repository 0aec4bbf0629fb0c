"""The scaling sweep's ``results.csv``: one row per (vision, llm, data size) cell.

Written by ``tools/scaling_sweep.py`` (a row appended as each cell finishes, so a crashed sweep
keeps what it did) and read by ``tools/fit_scaling_law.py``. Columns, in order: `COLUMNS`.
``compute_flops`` is ``2 * N_vit * D_img + 6 * N_llm * (D_img + D_txt)`` (`compute_flops`).
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

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


__all__ = ["SweepRow", "COLUMNS", "compute_flops", "read_rows", "append_row", "write_rows"]
