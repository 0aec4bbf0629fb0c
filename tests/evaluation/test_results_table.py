"""The results table: the CuMo paper's column order, headline figures, '-' for the missing."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.evaluation.results_table import COLUMNS, table_rows, write_results_table
from cumo_megatron.evaluation.scoring import ScoringInputError


def test_columns_follow_the_paper():
    assert [title for _, title, _ in COLUMNS] == [
        "SQA-IMG", "TextVQA", "GQA", "POPE", "MME", "MMBench", "SEED", "MM-Vet", "VQAv2", "VizWiz", "LLaVA-W", "MMMU",
    ]  # fmt: skip


def test_markdown_and_json(tmp_path):
    runs = {
        "cumo-7b": [
            {"benchmark": "pope", "metrics": {"f1": 85.93, "accuracy": 87.0}, "counts": {}},
            {"benchmark": "mme", "metrics": {"perception": 1548.63, "cognition": 300.0}, "counts": {}},
            {"benchmark": "scienceqa", "metrics": {"accuracy_img": 77.94, "accuracy": 70.0}, "counts": {}},
            {"benchmark": "mmvet", "metrics": {"total": 51.0}},  # from MM-Vet's GPT judge
            {"benchmark": "not_in_the_paper", "metrics": {"accuracy": 1.0}},  # left out
        ],
        "baseline": [{"benchmark": "gqa", "metrics": {"accuracy": 62.04}, "counts": {}}],
    }
    rows = write_results_table(runs, tmp_path / "results.md", tmp_path / "results.json")
    assert (tmp_path / "results.md").read_text() == (
        "| Model | SQA-IMG | TextVQA | GQA | POPE | MME | MMBench | SEED | MM-Vet | VQAv2 | VizWiz | LLaVA-W | MMMU |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| cumo-7b | 77.9 | - | - | 85.9 | 1548.6 | - | - | 51.0 | - | - | - | - |\n"
        "| baseline | - | - | 62.0 | - | - | - | - | - | - | - | - | - |\n"
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["columns"][3] == {"title": "POPE", "benchmark": "pope", "metric": "f1"}
    assert data["rows"][0]["values"]["POPE"] == pytest.approx(85.93)  # full precision in JSON
    assert data["rows"][0]["values"]["TextVQA"] is None
    assert data["rows"] == rows


def test_two_results_for_one_benchmark_are_refused():
    with pytest.raises(ScoringInputError, match="two results for pope of model 'm'"):
        table_rows({"m": [{"benchmark": "pope", "metrics": {"f1": 1.0}}] * 2})
