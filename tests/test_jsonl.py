"""cumo_megatron.jsonl: every non-blank line parsed, a line that is not JSON reported, not raised."""

from __future__ import annotations

from cumo_megatron.jsonl import read_json_lines


def test_read_json_lines_numbers_lines_and_reports_a_cut_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n   \nnull\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo\n')
    lines = read_json_lines(path)
    assert [line.number for line in lines] == [1, 4, 5, 6]
    assert [line.value for line in lines[:3]] == [{"step": 1}, None, {"step": 2, "loss": 0.5}]
    assert [line.error is None for line in lines] == [True, True, True, False]  # JSON null is not an error
    assert lines[3].value is None and "line 1" in lines[3].error and lines[3].text == '{"step": 3, "lo'
