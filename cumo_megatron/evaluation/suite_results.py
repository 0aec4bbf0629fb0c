"""Score every benchmark of a suite run and write its results table (``results.md``, ``results.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cumo_megatron.evaluation.results_table import render_markdown, write_results_table
from cumo_megatron.evaluation.scoring import NotScorable, score_benchmark
from cumo_megatron.evaluation.suite import Suite

__all__ = ["ScoredBenchmark", "ResultsTable", "score_suite", "write_results"]


@dataclass(frozen=True)
class ScoredBenchmark:
    """One benchmark of a suite: its scoring result, or why it was not scored (a GPT judge, ...)."""

    name: str
    result: Optional[dict]
    reason: Optional[str] = None


@dataclass(frozen=True)
class ResultsTable:
    """The written table: its Markdown text and both files."""

    markdown: str
    markdown_path: Path
    json_path: Path


def score_suite(suite: Suite, out: Path) -> list[ScoredBenchmark]:
    """Score each benchmark's ``out/<name>.jsonl``; a benchmark that is not scored here (NotScorable)
    keeps its reason, and any other scoring error stops the suite with its message."""
    scored = []
    for bench in suite.benchmarks:
        try:
            result = score_benchmark(bench.name, bench.questions, Path(out) / f"{bench.name}.jsonl", bench.annotations)
        except NotScorable as reason:
            scored.append(ScoredBenchmark(bench.name, None, str(reason)))
            continue
        scored.append(ScoredBenchmark(bench.name, result))
    return scored


def write_results(scored: list[ScoredBenchmark], out: Path, model_name: str) -> ResultsTable:
    """Write ``out/results.md`` and ``out/results.json`` (one row, the CuMo paper's columns)."""
    out = Path(out)
    md, js = out / "results.md", out / "results.json"
    rows = write_results_table({model_name: [s.result for s in scored if s.result is not None]}, md, js)
    return ResultsTable(render_markdown(rows), md, js)
