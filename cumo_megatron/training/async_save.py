"""Asynchronous checkpoint saves: megatron's forked writer, with our commit as its last step.

One save, on every rank, in the same order (`AsyncCheckpointSaver`):

1. ``save``: wait for the previous save (at most one in flight), then stage the checkpoint
   (`checkpointing.stage_save` with ``asynchronous=True``: ``iter_N.tmp`` with everything but the
   sharded tensors, whose write megatron returns as an `AsyncRequest`), append the commit
   (`checkpointing.commit_save`: barrier, rename to ``iter_N``, ``latest``, prune, barrier) as the
   request's LAST finalize function, and fork the writer.
2. ``poll`` (every step, non-blocking): once the writers of all ranks are done (megatron agrees on
   that with an all-reduce), every rank runs the finalize functions in order: megatron's
   ``.metadata`` and ``metadata.json``, then our commit. ``latest`` moves only there, so it never
   names a checkpoint whose tensors are still being written.
3. ``wait`` (blocking): before the next save, before divergence is reported, at the end.
4. ``abandon`` (any other exception): the writer and its helper processes are killed and no
   finalize function runs: ``iter_N.tmp`` stays behind, never loaded, and ``latest`` keeps naming
   the previous complete checkpoint.

The writer is megatron's `TemporalAsyncCaller` (a process forked per save), not its
`PersistentAsyncCaller`: the persistent worker is a *spawned* process that receives each request
through a queue, which on a CPU host would move the live tensors into shared memory (so the next
step's in-place updates would reach a write in progress) and which calls
``torch.cuda.set_device(rank % device_count())`` (a division by zero without CUDA). A fork gives
the writer a copy-on-write snapshot of this process as it is when the save starts: on CPU (where
megatron's "device to host" staging returns the live tensors themselves) that snapshot is what
keeps the checkpoint at its iteration; with CUDA the tensors were copied to host memory first.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from cumo_megatron.training.checkpointing import StagedSave


@dataclass
class SaveTiming:
    """How long one save kept the training loop waiting, and how long it took in all."""

    iteration: int
    blocked_s: float  # staging, then every poll and wait while it was in flight (commit included)
    total_s: float  # from the start of staging to the end of the commit


@dataclass
class _InFlight:
    staged: StagedSave
    on_committed: Callable[[Path, SaveTiming], None]
    started: float
    blocked_s: float


class AsyncCheckpointSaver:
    """At most one asynchronous checkpoint save in flight (module docstring: the protocol).

    ``save``, ``poll`` and ``wait`` are collective while a save is in flight (every rank calls them
    at the same point); ``abandon`` is not.
    """

    def __init__(self):
        self._queue = AsyncCallsQueue(persistent=False)  # a TemporalAsyncCaller per save
        self._in_flight: Optional[_InFlight] = None

    @property
    def in_flight(self) -> Optional[int]:
        """The iteration whose save is being written, or None."""
        return self._in_flight.staged.iteration if self._in_flight is not None else None

    def save(self, stage: Callable[[], StagedSave], commit: Callable[[StagedSave], Path],
             on_committed: Callable[[Path, SaveTiming], None]) -> Path:
        """Start a save once the previous one is committed; return the directory it commits to.

        ``stage()`` writes what it can now (`checkpointing.stage_save` with ``asynchronous=True``);
        ``commit(staged)`` runs on every rank once every rank's write is done, as the request's
        last finalize function (`checkpointing.commit_save`); ``on_committed(path, timing)`` runs
        after it, on every rank.
        """
        self.wait()
        start = time.perf_counter()
        staged = stage()
        staged.request.add_finalize_fn(lambda: commit(staged))  # after megatron's own: `latest` moves last
        self._queue.schedule_async_request(staged.request)
        self._in_flight = _InFlight(staged, on_committed, start, time.perf_counter() - start)
        return staged.final

    def poll(self) -> None:
        """Commit the save in flight if every rank's writer is done; return at once otherwise."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self._in_flight is None:
            return
        start = time.perf_counter()
        done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        end = time.perf_counter()
        in_flight = self._in_flight
        in_flight.blocked_s += end - start
        if done:
            self._in_flight = None
            staged = in_flight.staged
            in_flight.on_committed(staged.final, SaveTiming(staged.iteration, in_flight.blocked_s,
                                                            end - in_flight.started))

    def abandon(self) -> None:
        """Drop the save in flight without committing it: its writer processes are killed.

        For the way out of a failed run (this rank only, no collective): ``latest`` keeps naming
        the last committed checkpoint, and the ``.tmp`` directory is left to the next save of that
        iteration, which starts it afresh.
        """
        while self._queue.async_calls:
            caller = self._queue.async_calls.popleft().async_caller
            process = getattr(caller, "process", None)
            if process is not None:
                _kill_tree(process.pid)
                process.join()
            caller.close(abort=True)
        self._in_flight = None
        _drain_write_results()


def _kill_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL ``pid`` and its descendants (megatron's writer forks one helper per file); return
    once the descendants are gone, so that nothing writes into the checkpoint afterwards (the
    caller joins ``pid`` itself, its child)."""
    try:
        os.kill(pid, signal.SIGSTOP)  # no new helper while we look for them
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    # A signal takes effect asynchronously: until the writer is seen stopped it may still fork a
    # helper, which a look at its children made now would miss.
    while _state(pid) not in (None, "T", "t", "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.005)
    helpers: set[int] = set()
    while True:  # helpers first, while the stopped writer still parents them
        found = set(_descendants(pid)) - helpers
        if not found:
            break
        for child in found:
            _kill(child)
        helpers |= found
    _kill(pid)
    # Not our children: we cannot wait for them, only watch them die (a kill is delivered
    # asynchronously).
    while any(_state(child) not in (None, "Z", "X") for child in helpers) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _state(pid: int) -> Optional[str]:
    """``pid``'s state letter (``R``, ``S``, ``T`` stopped, ``Z`` zombie, ...), None when it is
    gone (Linux ``/proc``)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; none found elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # "pid (comm) state ppid ...": the command may hold spaces and parentheses.
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _drain_write_results() -> None:
    """Empty megatron's process-wide queue of write results.

    A writer that finished before it was abandoned has left its results there, and the next save
    in this process would take them for its own (megatron reads the queue with ``get_nowait``).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = getattr(filesystem_async, "_results_queue", None)
    if results is None:
        return
    while True:
        try:
            results.get_nowait()
        except queue.Empty:
            return
