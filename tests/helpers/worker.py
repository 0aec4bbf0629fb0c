"""Entry point of one rank launched by `tests.helpers.distributed.run_distributed`."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path


def call(target: str, args: dict):
    """``module:function(**args)``."""
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)(**args)


def run_many(calls: list[list]) -> list:
    """Call each ``[target, args]`` in turn on this rank; their results (one launch, several checks)."""
    return [call(target, args) for target, args in calls]


def main() -> None:
    """Initialise gloo, call the target with its arguments, save its result for the parent."""
    # Imported here, not at module level: megatron's checkpoint writer spawns a process that
    # re-imports this file as __main__, and should not pay for torch there.
    import torch

    target, args_file, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    from cumo_megatron.platform.distributed import destroy, init_process_group

    init_process_group("gloo")
    result = call(target, json.loads(Path(args_file).read_text()))
    rank = torch.distributed.get_rank()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    destroy()
    _exit_now()


def _exit_now() -> None:
    """Exit at once, skipping the interpreter's teardown: with torch and megatron-core loaded it
    takes seconds per rank (measured 2-4 s), and the result is already saved."""
    import multiprocessing

    for child in multiprocessing.active_children():  # megatron's checkpoint-writer manager
        child.terminate()
        child.join(timeout=5)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
