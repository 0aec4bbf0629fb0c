"""Asynchronous checkpoint saves (`train.async_save`, `training.async_save`) on CPU with gloo.

- On 2 ranks (one `run_distributed` launch): a synchronous and an asynchronous run of the same
  config, and a run restarted from the asynchronous run's checkpoint 2. The asynchronous
  checkpoints hold the synchronous ones' tensors and per-rank states, and the restarted run
  repeats the *synchronous* run's steps 3-4 bit for bit.
- A run whose checkpoint-4 writer is stalled (`async_workers`, test-side) trains on to step 6 and
  is SIGKILLed while the write is still going: ``latest`` names checkpoint 2, and a resume from
  it repeats steps 3-6 bit for bit.
- In this process (world of one): one save in flight, an exception while a write is stalled
  (abandoned: writer processes killed, ``latest`` unmoved), and where the kill hooks fire.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import torch

from cumo_megatron.config.loader import load_config
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ExperimentConfig
from cumo_megatron.platform.distributed import set_cpu_threads
from cumo_megatron.training.checkpointing import iteration_dir, list_checkpoints, read_latest
from cumo_megatron.training.loop import Trainer
from cumo_megatron.training.metrics import is_training_row
from cumo_megatron.training.performance import throughput_settings
from tests.helpers.distributed import run_distributed
from tests.training import faults
from tests.training.async_workers import stalled_writer, stalled_writers
from tests.training.faults import FaultInjection
from tests.training.test_resume import _same_rows
from tests.training.workers import (
    ROOT, _kill_marked, _LAUNCH_MARK, checkpoint_rows, experiment, read_metrics, write_config,
)

STEPS = dict(train_steps=4, save_interval=2, keep_last=2, global_batch_size=2)


# --------------------------------------------------------------------------- 2 ranks


@pytest.fixture(scope="module")
def two_ranks(dataset, init_weights, tmp_path_factory) -> dict:
    """Synchronous and asynchronous runs on 2 ranks (DP = 2, distributed optimizer), then a run
    restarted from what a kill right after the asynchronous checkpoint 2 would have left."""
    root = tmp_path_factory.mktemp("async2")
    config = write_config(experiment(dataset, "", load=init_weights, **STEPS), root / "config.yaml")
    runs = [{"config": str(config), "overrides": [f"train.save={root / 'sync'}", "train.async_save=false"]},
            {"config": str(config), "overrides": [f"train.save={root / 'async'}", "train.async_save=true"]},
            {"config": str(config), "restart_from": {"dir": str(root / "async"), "iteration": 2},
             "overrides": [f"train.save={root / 'restarted'}", "train.async_save=true"]}]
    ranks = run_distributed("tests.training.workers:train_in_process", world_size=2, args={"runs": runs})
    return {"root": root, "runs": [[rank[i] for rank in ranks] for i in range(len(runs))]}


def _tensors(directory) -> dict:
    """Every entry of a distributed checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(directory), f"{tmp}/all.pt")
        return torch.load(f"{tmp}/all.pt", weights_only=False)


def _same(a, b) -> bool:
    """Deep equality of per-rank states (tensors, numpy arrays, containers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy
        return bool((a == b).all()) and a.dtype == b.dtype
    return a == b


def test_async_checkpoints_equal_the_synchronous_ones(two_ranks):
    root = two_ranks["root"]
    _same_rows(read_metrics(root / "async"), read_metrics(root / "sync"))  # the saves leave training alone
    for name in ("sync", "async"):
        assert list_checkpoints(root / name) == [2, 4] and read_latest(root / name).name == "iter_0000004"
    sync_dir, async_dir = iteration_dir(root / "sync", 4), iteration_dir(root / "async", 4)
    sync, done = _tensors(sync_dir), _tensors(async_dir)
    assert sync.keys() == done.keys()
    # The distributed optimizer's flat buckets hold uninitialised padding (different in any two
    # saves); the restart below checks the optimizer state through its losses.
    padded = [k for k in sync if k.startswith("optimizer.distributed.") and ".bucket_idx_" in k]
    assert padded and len(padded) < len(sync)
    for key in sync.keys() - set(padded):
        assert _same(done[key], sync[key]), key
    for rank in (0, 1):
        name = f"ranks/rank{rank:05d}.pt"
        assert _same(torch.load(async_dir / name, weights_only=False), torch.load(sync_dir / name, weights_only=False))
    state = [json.loads((d / "train_state.json").read_text()) for d in (async_dir, sync_dir)]
    assert state[0] == state[1] and state[0]["iteration"] == 4


def test_resume_from_an_async_checkpoint_repeats_the_synchronous_run(two_ranks):
    root = two_ranks["root"]
    sync_run, _, restarted = two_ranks["runs"]
    assert [r["resumed_from"].name for r in restarted] == ["iter_0000002"] * 2
    rows = read_metrics(root / "restarted")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    _same_rows(rows[2:], read_metrics(root / "sync")[2:])  # the other run's steps, bit for bit
    for got, want in zip(restarted, sync_run):  # per rank: the final weights
        for (key, _, where, data), (key2, _, where2, data2) in zip(got["shards"], want["shards"]):
            assert (key, where) == (key2, where2) and torch.equal(data, data2), key


def test_checkpoint_rows_say_how_long_the_loop_waited(two_ranks):
    root = two_ranks["root"]
    sync, done = checkpoint_rows(root / "sync"), checkpoint_rows(root / "async")
    assert [(r["step"], r["checkpoint"], r["async"]) for r in sync] == [(2, "iter_0000002", False),
                                                                       (4, "iter_0000004", False)]
    assert [(r["step"], r["checkpoint"], r["async"]) for r in done] == [(2, "iter_0000002", True),
                                                                       (4, "iter_0000004", True)]
    assert all(r["blocked_s"] == r["save_s"] > 0 for r in sync)
    assert all(0 < r["blocked_s"] <= r["save_s"] for r in done)
    assert not any(is_training_row(r) for r in sync + done)  # readers of training rows skip them


# --------------------------------------------------------------------------- SIGKILL mid-write


def _rows_so_far(save) -> list[dict]:
    """The complete training rows of a metrics.jsonl being written."""
    path = save / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in rows if "split" not in r]


@pytest.fixture(scope="module")
def killed(dataset, init_weights, tmp_path_factory) -> dict:
    """World of one, checkpoint 4's files stalled for 2 minutes: SIGKILLed once step 6 is logged
    (the loop went on past the save and now waits for it), then resumed here."""
    root = tmp_path_factory.mktemp("async-kill")
    save, markers = root / "run", root / "markers"
    cfg = experiment(dataset, str(save), load=init_weights, async_save=True,
                     **dict(STEPS, train_steps=6))
    config = write_config(cfg, root / "config.yaml")
    mark = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", **{_LAUNCH_MARK: mark})
    cmd = [sys.executable, "-m", "tests.training.async_workers", "--stall", "4:120", "--markers", str(markers),
           "--", "--config", str(config)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not ([r["step"] for r in _rows_so_far(save)][-1:] == [6] and stalled_writers(markers, 4)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    out.seek(0)
                    raise AssertionError(f"the run ended or hung (exit {proc.poll()}):\n{out.read()[-6000:]}")
                time.sleep(0.1)
            state = {"latest": (save / "latest").read_text().strip(), "dirs": sorted(p.name for p in save.iterdir())}
            os.kill(proc.pid, signal.SIGKILL)
            state["returncode"] = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _kill_marked(mark)  # the orphaned writer and its helpers
    state.update(straight=read_metrics(save), checkpoint_rows=checkpoint_rows(save),
                 dirs_after=sorted(p.name for p in save.iterdir()))
    set_cpu_threads()  # the threads the entry point gives a world of one (results depend on them)
    trainer = Trainer(load_config(ExperimentConfig, config))
    trainer.train()
    state.update(resumed_from=trainer.resume_from, resumed=read_metrics(save), save=save)
    return state


def test_sigkill_during_a_write_leaves_latest_on_the_previous_checkpoint(killed):
    assert killed["returncode"] == -signal.SIGKILL
    # Steps 5 and 6 ran while checkpoint 4 was being written; `latest` never left checkpoint 2.
    assert [r["step"] for r in killed["straight"]] == [1, 2, 3, 4, 5, 6]
    assert killed["latest"] == "iter_0000002"
    for dirs in (killed["dirs"], killed["dirs_after"]):
        assert "iter_0000002" in dirs and "iter_0000004.tmp" in dirs
        assert "iter_0000004" not in dirs and not any(d.startswith("iter_0000006") for d in dirs)
    assert [r["step"] for r in killed["checkpoint_rows"]] == [2]


def test_resume_after_a_kill_mid_write_is_bit_exact(killed):
    assert killed["resumed_from"].name == "iter_0000002"
    _same_rows(killed["resumed"], killed["straight"])
    save = killed["save"]
    assert read_latest(save).name == "iter_0000006" and list_checkpoints(save) == [4, 6]
    assert not (save / "iter_0000004.tmp").exists()  # the resumed run wrote checkpoint 4 afresh


# --------------------------------------------------------------------------- in this process


def _stall(monkeypatch, stalls: dict[int, float], markers) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data", stalled_writer(stalls, markers))


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_one_save_in_flight(dataset, tmp_path, monkeypatch):
    """Saves every step, each write stalled 1 s: a save starts only after the previous one is
    committed, and the wait is counted in the previous save's blocked time."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from cumo_megatron.training import checkpointing

    _stall(monkeypatch, {1: 1.0, 2: 1.0, 3: 1.0}, tmp_path / "markers")
    events = []
    schedule, commit = AsyncCallsQueue.schedule_async_request, checkpointing.commit_save

    def scheduled(queue, request):
        events.append(("schedule", queue.get_num_unfinalized_calls(), (tmp_path / "run" / "latest").is_file()
                       and (tmp_path / "run" / "latest").read_text().strip()))
        return schedule(queue, request)

    def committed(staged, *args, **kwargs):
        events.append(("commit", staged.iteration))
        return commit(staged, *args, **kwargs)

    monkeypatch.setattr(AsyncCallsQueue, "schedule_async_request", scheduled)
    monkeypatch.setattr(checkpointing, "commit_save", committed)
    cfg = experiment(dataset, str(tmp_path / "run"), stage=2, train_steps=3, save_interval=1, keep_last=3,
                     global_batch_size=1, async_save=True)
    Trainer(cfg).train()
    assert events == [("schedule", 0, False), ("commit", 1), ("schedule", 0, "iter_0000001"), ("commit", 2),
                      ("schedule", 0, "iter_0000002"), ("commit", 3)]
    rows = checkpoint_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["save_s"] >= 1.0 and 0 < r["blocked_s"] <= r["save_s"] for r in rows)
    # Each write outlasts a step: the next save (or the end) waited for most of it.
    assert all(r["blocked_s"] > 0.3 for r in rows)


def test_an_exception_abandons_the_write_in_flight(dataset, tmp_path, monkeypatch):
    """Checkpoint 4's files stalled for 60 s, and step 5 fails: the error comes out at once, the
    writer and its helpers are killed, ``latest`` stays on checkpoint 2, nothing is committed."""
    markers = tmp_path / "markers"
    _stall(monkeypatch, {4: 60.0}, markers)
    cfg = experiment(dataset, str(tmp_path / "run"), stage=2, train_steps=6, save_interval=2, keep_last=2,
                     global_batch_size=1, async_save=True)
    trainer = Trainer(cfg).setup()
    step = trainer.train_step

    def failing(microbatches):
        if trainer.iteration == 4:  # step 5, while checkpoint 4 is being written
            deadline = time.monotonic() + 30
            while not stalled_writers(markers, 4) and time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError("step 5 failed")
        return step(microbatches)

    trainer.train_step = failing
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="step 5 failed"):
        trainer.train()
    assert time.monotonic() - start < 30  # not waiting for the stalled write
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "iter_0000002" and read_latest(run).name == "iter_0000002"
    assert list_checkpoints(run) == [2]
    assert (run / "iter_0000004.tmp").is_dir() and not (run / "iter_0000004.tmp" / "metadata.json").exists()
    writers = stalled_writers(markers, 4)
    assert writers and not any(_running(pid) or _running(ppid) for pid, ppid in writers)
    assert trainer.saver.in_flight is None
    assert [r["step"] for r in checkpoint_rows(run)] == [2]


def test_kill_hooks_fire_when_the_checkpoint_is_finalized(dataset, tmp_path, monkeypatch):
    """``kill_after_save=2`` fires once checkpoint 2 is committed (here when save 4 waits for
    it, after steps 3-4); ``kill_during_save=4`` when checkpoint 4 is complete on disk and not
    yet ``latest``. The kill is replaced by a note of what the run had done at that moment."""
    run = tmp_path / "run"
    _stall(monkeypatch, {2: 1.5}, tmp_path / "markers")
    fired = []

    def note() -> None:
        tmp4 = run / "iter_0000004.tmp"
        fired.append({"latest": (run / "latest").read_text().strip(), "steps": [r["step"] for r in read_metrics(run)],
                      "rows": [r["step"] for r in checkpoint_rows(run)],
                      "tmp4_complete": (tmp4 / "metadata.json").is_file() and (tmp4 / ".metadata").is_file()})

    monkeypatch.setattr(faults, "kill_self", note)
    cfg = experiment(dataset, str(run), stage=2, train_steps=5, save_interval=2, keep_last=3, global_batch_size=1,
                     async_save=True)
    Trainer(cfg, events=FaultInjection(kill_after_save=2, kill_during_save=4)).train()
    after, during = fired
    # After later steps (the poll of step 3 or 4, or save 4's wait), with checkpoint 2 committed.
    assert after["latest"] == "iter_0000002" and after["rows"] == [2] and after["steps"][:3] == [1, 2, 3]
    assert during["latest"] == "iter_0000002" and during["tmp4_complete"] and during["rows"] == [2]
    assert read_latest(run).name == "iter_0000005" and list_checkpoints(run) == [2, 4, 5]


def test_automatic_choice_follows_cuda():
    cfg = ExperimentConfig(model=tiny(moe=True))
    assert throughput_settings(cfg, cuda=True, te=False).async_save
    assert not throughput_settings(cfg, cuda=False, te=False).async_save
    cfg.train.async_save = True  # how the tests run it on CPU
    assert throughput_settings(cfg, cuda=False, te=False).async_save
    cfg.train.async_save = False
    assert not throughput_settings(cfg, cuda=True, te=True).async_save
