"""One trainer per save directory (issue 10, fix 9): `training.lock`.

A second trainer on a directory in use is refused with a one-line message naming the directory,
the holder and what to do; a SIGKILLed holder leaves no stale lock, even when processes it forked
live on; a finished trainer lets the lock go. The refusal on every rank of a 2-process trainer is
tested in `test_resume` (it shares that module's launch).
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from cumo_megatron.training.lock import LOCK_NAME, SaveDirLock, SaveDirLocked
from cumo_megatron.training.loop import Trainer
from tests.training.workers import check, experiment, hold_lock, launch, write_config


def _stop(proc, child: int = 0) -> None:
    for pid in (proc.pid, child):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def test_second_trainer_is_refused_with_a_clear_message(dataset, tmp_path):
    save = tmp_path / "run"
    config = write_config(experiment(dataset, str(save), stage=2, train_steps=1), tmp_path / "config.yaml")
    holder, _ = hold_lock(save)
    try:
        proc = launch(config)
    finally:
        _stop(holder)
    check(proc, expect_rc=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("configuration error: "), proc.stderr[-3000:]
    message = lines[-1]
    for fragment in (f"train.save={save} is in use by another training", f"pid {holder.pid}@{socket.gethostname()}",
                     "since ", "wait for it to finish, kill it, or choose another train.save"):
        assert fragment in message, (fragment, message)
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in save.iterdir()) == [LOCK_NAME]  # the refused trainer wrote nothing


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    """The kernel drops the lock with its holder, though a child forked while holding it lives on."""
    holder, child = hold_lock(tmp_path, fork_child=True)
    try:
        assert child > 0
        with pytest.raises(SaveDirLocked, match=f"pid {holder.pid}@"):
            SaveDirLock.acquire(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child is still alive
        lock = SaveDirLock.acquire(tmp_path)
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        _stop(holder, child)


def test_lock_is_held_while_training_and_released_after(dataset, tmp_path):
    save = tmp_path / "run"
    trainer = Trainer(experiment(dataset, str(save), stage=2, train_steps=1, save_interval=0,
                                 global_batch_size=1)).setup()
    assert trainer.save_lock.held
    with pytest.raises(SaveDirLocked, match=f"pid {os.getpid()}@"):
        SaveDirLock.acquire(save)
    trainer.train()
    assert not trainer.save_lock.held
    SaveDirLock.acquire(save).release()
