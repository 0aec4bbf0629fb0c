"""Scaling sweep of stage-1 connector pre-training over vision encoders x data sizes x LLMs.

    python tools/scaling_sweep.py --grid examples/configs/scaling/tiny_cpu.yaml --out runs/scaling
    python tools/scaling_sweep.py --grid GRID.yaml --out runs/scaling --shard 0/4   # and 1/4, 2/4, 3/4

Writes OUT/grid.yaml (the resolved grid), OUT/results.csv (one row per finished cell: vision,
vision_params, llm, llm_params, data_size, final_eval_loss, compute_flops, wall_time_s) and
OUT/cells/<cell>/ (config, logs, eval.json). Re-running skips the cells already in results.csv.
Exit status: 0 when every cell of this shard is done, 1 when a cell failed (each is listed with its
log; the others still ran), 2 for a bad grid or arguments. The grid format is documented in
cumo_megatron/research/sweep.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    """Parse the arguments, run the sweep, return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, type=Path, help="grid YAML file")
    parser.add_argument("--out", required=True, type=Path, help="output directory (shared by all shards)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from the i-th (default 0/1)")
    parser.add_argument("--launch", choices=("subprocess", "in_process"),
                        help="override the grid's launch.mode (results do not depend on it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import dataclasses

    from cumo_megatron.research.sweep import GridError, load_grid, parse_shard, run_sweep

    try:
        shard = parse_shard(args.shard)
        grid = load_grid(args.grid)
        if args.launch:
            grid = dataclasses.replace(grid, launch_mode=args.launch,
                                       launch_command=grid.launch_command if args.launch == "subprocess" else ())
        report = run_sweep(grid, args.out, shard, progress=not args.quiet)
    except (GridError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shard {shard[0]}/{shard[1]}: {report.planned} cells, {report.skipped} already done, "
          f"{len(report.finished)} finished, {len(report.failed)} failed; results in {args.out / 'results.csv'}")
    for failure in report.failed:
        print(f"FAILED {failure.cell}: {failure.error.splitlines()[0]} (log: {failure.log})", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":  # megatron's checkpoint writer may re-import __main__ in workers
    sys.exit(main())
