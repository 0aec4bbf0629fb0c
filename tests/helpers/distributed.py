"""Run a test function in N gloo worker processes under ``torchrun``.

One launch costs 15-30 s on the 2-core CI machine (two interpreters importing torch and
megatron-core), so a worker function should check many things and return what it measured;
the calling test asserts on the returned values. `run_distributed_many` runs several functions
in one launch; `tests.helpers.shared_launch` shares one launch between test modules.

    results = run_distributed("tests.models.parallel_workers:check_tp", world_size=2, args={...})
    # results[rank] is whatever the worker returned on that rank (saved with torch.save)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(target: str, world_size: int = 2, args: dict | None = None, timeout: int = 300) -> list:
    """Run ``module:function(**args)`` on ``world_size`` ranks; return each rank's return value.

    The function runs after torch.distributed is initialised (gloo); it brings up megatron's
    parallel state itself with the sizes it tests. A failing rank fails the call with its output.
    """
    with tempfile.TemporaryDirectory(prefix="cumo-dist-") as tmp:
        args_file = Path(tmp) / "args.json"
        args_file.write_text(json.dumps(args or {}))
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(world_size),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            str(Path(__file__).with_name("worker.py")), target, str(args_file), tmp,
        ]
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"distributed worker {target} failed (exit {proc.returncode}):\n"
                f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}"
            )
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_distributed_many(calls: list[tuple[str, dict]], world_size: int = 2, timeout: int = 600) -> list[list]:
    """Run each ``(target, args)`` of ``calls`` in turn, in one launch; per call, each rank's result."""
    ranks = run_distributed("tests.helpers.worker:run_many", world_size,
                            {"calls": [[target, args] for target, args in calls]}, timeout)
    return [[rank[i] for rank in ranks] for i in range(len(calls))]
