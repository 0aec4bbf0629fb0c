"""Scored benchmarks to one results table in the layout of the CuMo paper's table.

One row per model, one column per benchmark in the paper's order, each cell the benchmark's
published figure (its registry ``headline``: POPE's mean F1, MME's perception score, SEED's image
accuracy, ...) to one decimal; a benchmark not scored is ``-``. Written as Markdown (for reading)
and JSON (for tools), from the ``score_benchmark`` results of each model. GPT-judged benchmarks
(MM-Vet, LLaVA-W) fill their column when a result dict with their headline metric is supplied
(from their judge's output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.registry import BENCHMARKS

# The CuMo paper's column order.
ORDER = ("scienceqa", "textvqa", "gqa", "pope", "mme", "mmbench", "seed", "mmvet", "vqav2", "vizwiz", "llava_wild", "mmmu")
# (benchmark, column title, headline metric) per column.
COLUMNS: tuple[tuple[str, str, str], ...] = tuple((name, BENCHMARKS[name].title, BENCHMARKS[name].headline) for name in ORDER)
MISSING = "-"


def _headline(result: dict, metric: str) -> Optional[float]:
    """The headline figure of one result, or None when it lacks it."""
    value = (result.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def table_rows(runs: Mapping[str, Iterable[dict]]) -> list[dict]:
    """One row per model: ``{"model": name, "values": {column title: figure or None}}``.

    ``runs`` maps a model name to its ``score_benchmark`` results; a benchmark outside the table
    is left out, and two results for one benchmark of one model are refused.
    """
    known = {name: (title, metric) for name, title, metric in COLUMNS}
    rows = []
    for model, results in runs.items():
        values: dict[str, Optional[float]] = {title: None for _, title, _ in COLUMNS}
        seen = set()
        for result in results:
            name = result.get("benchmark")
            if name not in known:
                continue
            if name in seen:
                raise ScoringInputError(f"two results for {name} of model {model!r}; keep one")
            seen.add(name)
            title, metric = known[name]
            values[title] = _headline(result, metric)
        rows.append({"model": model, "values": values})
    return rows


def _cell(value: Optional[float]) -> str:
    """A figure to one decimal, or the missing mark."""
    return MISSING if value is None else f"{value:.1f}"


def render_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table: Model, then the benchmarks in the paper's order."""
    titles = [title for _, title, _ in COLUMNS]
    lines = [
        "| Model | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row["values"][t]) for t in titles) + " |")
    return "\n".join(lines) + "\n"


def render_json(rows: list[dict]) -> dict:
    """The rows as JSON: the columns (title, benchmark, metric) and each model's figures (null
    where missing, full precision)."""
    return {
        "columns": [{"title": title, "benchmark": name, "metric": metric} for name, title, metric in COLUMNS],
        "rows": rows,
    }


def write_results_table(runs: Mapping[str, Iterable[dict]], markdown_path: str | Path, json_path: str | Path) -> list[dict]:
    """Write the table of ``runs`` as Markdown and JSON; return its rows."""
    rows = table_rows(runs)
    Path(markdown_path).write_text(render_markdown(rows), encoding="utf-8")
    Path(json_path).write_text(json.dumps(render_json(rows), indent=2) + "\n", encoding="utf-8")
    return rows


__all__ = ["COLUMNS", "MISSING", "ORDER", "render_json", "render_markdown", "table_rows", "write_results_table"]
