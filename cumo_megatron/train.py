"""Entry point: train one CuMo stage with megatron-core.

    python -m cumo_megatron.train --config FILE.yaml [dotted.overrides=...]
    torchrun --nproc_per_node 8 -m cumo_megatron.train --config FILE.yaml parallel.tp=2

Writes ``<train.save>/config.yaml`` (the resolved configuration), ``metrics.jsonl``, TensorBoard
logs (when ``tensorboard`` is installed) and checkpoints. Re-running the same command continues
from ``<train.save>/latest``.
"""

from __future__ import annotations

import sys


def _train(argv: list[str] | None, events=None) -> int:
    from cumo_megatron.config.loader import parse_cli
    from cumo_megatron.config.schema import ExperimentConfig
    from cumo_megatron.training.loop import run

    run(parse_cli(ExperimentConfig, sys.argv[1:] if argv is None else argv), events)
    return 0


def main(argv: list[str] | None = None, events=None) -> int:
    """Parse the command line, train, return the exit status (see ``cumo_megatron.errors`` for the
    statuses of user errors: configuration 2, diverged 3, data 4, checkpoint 5).

    ``events``: a `cumo_megatron.training.events.TrainingEvents` for a script that wraps this
    entry point and acts at points of the run (a profiler, an uploader; the tests' faults).
    """
    from cumo_megatron.errors import run_cli

    return run_cli(lambda args: _train(args, events), argv)


# megatron's checkpoint writer starts processes that re-import __main__: keep this guard.
if __name__ == "__main__":
    sys.exit(main())
