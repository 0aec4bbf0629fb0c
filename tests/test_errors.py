"""cumo_megatron.errors: user errors become a message and an exit status; bugs keep their traceback."""

import pytest

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.data.images import ImageError
from cumo_megatron.data.records import DataError
from cumo_megatron.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, run_cli
from cumo_megatron.training.loop import TrainingDiverged
from cumo_megatron.training.pointers import CheckpointError


def _raising(exc):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, status, label",
    [
        (ConfigError("train.lr must be > 0"), EXIT_CONFIG, "configuration error"),
        (DataError("a.json record 3 (id=x): not JSON"), EXIT_DATA, "data error"),
        (ImageError("b.png: missing", missing=True), EXIT_DATA, "image error"),
        (CheckpointError("no latest in runs/x"), EXIT_CHECKPOINT, "checkpoint error"),
        (TrainingDiverged("5 non-finite steps"), EXIT_DIVERGED, "training stopped"),
    ],
)
def test_user_error_is_one_line_and_its_status(exc, status, label, capsys, monkeypatch):
    monkeypatch.delenv("CUMO_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(_raising(exc), []) == status
    err = capsys.readouterr().err
    assert err == f"{label}: {exc}\n"
    assert "Traceback" not in err


def test_rank_is_named_under_a_multi_process_launch(capsys, monkeypatch):
    monkeypatch.delenv("CUMO_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_cli(_raising(DataError("bad")), []) == EXIT_DATA
    assert capsys.readouterr().err == "[rank 1] data error: bad\n"


def test_debug_switch_brings_the_traceback_back(capsys, monkeypatch):
    monkeypatch.setenv("CUMO_DEBUG", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(_raising(ConfigError("bad key")), []) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("configuration error: bad key\n")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(_raising(ZeroDivisionError("bug")), [])
