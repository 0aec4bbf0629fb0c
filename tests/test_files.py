"""cumo_megatron.files: a file written atomically is complete or untouched."""

from __future__ import annotations

import os
import stat

import pytest

from cumo_megatron.files import current_umask, default_file_mode, write_text_atomic


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


@pytest.fixture
def umask_027():
    """The process umask set to 027 for one test (group may read, others nothing), then restored."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_current_umask_reads_the_mask_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # reading twice: still set
    assert default_file_mode() == 0o640


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_the_umask_says(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = write_text_atomic(tmp_path / f"model_config-{mask:o}.yaml", "a: 1\n")
        plain = tmp_path / f"plain-{mask:o}.txt"
        plain.write_text("x")  # what open() gives: the independent reference
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
