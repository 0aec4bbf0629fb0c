"""Entry point of one rank launched by `tests.helpers.distributed.run_distributed`."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main() -> None:
    """Initialise gloo, call the target with its arguments, save its result for the parent."""
    # Imported here, not at module level: megatron's checkpoint writer spawns a process that
    # re-imports this file as __main__, and should not pay for torch there.
    import torch

    target, args_file, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    from cumo_megatron.platform.distributed import destroy, init_process_group

    init_process_group("gloo")
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**json.loads(Path(args_file).read_text()))
    rank = torch.distributed.get_rank()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    destroy()


if __name__ == "__main__":
    main()
