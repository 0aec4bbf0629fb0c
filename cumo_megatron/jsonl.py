"""Reading JSON-lines files (metrics, answers) line by line, a cut or damaged line included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional


class JsonLine(NamedTuple):
    """One non-blank line: its 1-based number, its text, its value, and why it is not JSON (None
    when it is)."""

    number: int
    text: str
    value: Any
    error: Optional[str] = None


def read_json_lines(path: str | Path) -> list[JsonLine]:
    """The non-blank lines of ``path``, each parsed; a line that is not JSON (one cut by a kill)
    comes with its ``error`` (and ``value`` None), and what to do about it is the caller's choice."""
    lines = []
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            lines.append(JsonLine(number, text, json.loads(text)))
        except json.JSONDecodeError as err:
            lines.append(JsonLine(number, text, None, str(err)))
    return lines


__all__ = ["JsonLine", "read_json_lines"]
