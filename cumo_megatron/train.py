"""Entry point: train one CuMo stage with megatron-core.

    python -m cumo_megatron.train --config FILE.yaml [dotted.overrides=...]
    torchrun --nproc_per_node 8 -m cumo_megatron.train --config FILE.yaml parallel.tp=2

Writes ``<train.save>/config.yaml`` (the resolved configuration), ``metrics.jsonl``, TensorBoard
logs (when ``tensorboard`` is installed) and checkpoints. Re-running the same command continues
from ``<train.save>/latest``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, return the exit status."""
    from cumo_megatron.config.loader import ConfigError, parse_cli
    from cumo_megatron.config.schema import ExperimentConfig
    from cumo_megatron.training.loop import TrainingDiverged, run

    try:
        cfg = parse_cli(ExperimentConfig, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except ConfigError as exc:  # found while setting up (e.g. the save directory is locked)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 3
    return 0


# megatron's checkpoint writer starts processes that re-import __main__: keep this guard.
if __name__ == "__main__":
    sys.exit(main())
