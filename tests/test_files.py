"""cumo_megatron.files: a file written atomically is complete or untouched."""

from __future__ import annotations

import pytest

from cumo_megatron.files import write_text_atomic


def test_write_text_atomic_writes_verbatim_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "rows.csv"
    assert write_text_atomic(path, "a,b\r\n1,2\r\n") == path
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"  # no newline translation (csv writes \r\n)
    write_text_atomic(path, "replaced\n")
    assert path.read_text() == "replaced\n"
    assert [p.name for p in path.parent.iterdir()] == ["rows.csv"]


def test_write_text_atomic_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # fails while writing the temporary file
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
