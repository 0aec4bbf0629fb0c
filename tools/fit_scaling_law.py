"""Fit power laws to a scaling results table; print tables, write a PNG and a JSON.

    python tools/fit_scaling_law.py runs/sweep/results.csv --epsilon 0.01 --bootstrap 200
    python tools/fit_scaling_law.py published.csv --group-by data

The CSV needs columns ``vision``, ``llm``, ``data_size``, ``final_eval_loss`` (``vision_params``
for the joint fit, ``llm_params`` to order the LLMs); other columns are ignored, except that every
other text column with more than one value (a data set, say) separates curves; ``--group-by``
names those columns instead. Per curve ``L(D) = E + B / D^beta``; per llm (and group), jointly
over its encoders, ``L(N, D) = E + A / N^alpha + B / D^beta`` (N = vision parameters). Huber loss
on log residuals, scipy's L-BFGS-B from a grid of starts, percentile bootstrap intervals, and per
fit the data size beyond which doubling D gains less than ``--epsilon`` in loss. Outputs default to ``<csv stem>_fit.png``
and ``<csv stem>_fit.json`` next to the CSV; the last line printed is the JSON on one line.
Fits run in ``--workers`` processes (default: one per available CPU); the
results do not depend on it. Exit status 1 with one ``error:`` line on a bad CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Set before numpy loads its BLAS: scipy's L-BFGS-B calls BLAS on 3-5 numbers per step, where a
# threaded BLAS only adds hand-offs; on a busy machine they made the whole fit 5x slower.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="results table: the scaling sweep's results.csv or any CSV with the columns above")
    p.add_argument("--group-by", default=None, metavar="COLS",
                   help="comma-separated columns that separate curves besides llm and vision ('' for none; "
                        "default: every other text column with more than one value)")
    p.add_argument("--epsilon", type=float, default=0.01, help="loss gain per doubling of D below which data stops paying")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples per fit (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--confidence", type=float, default=0.95, help="bootstrap interval coverage")
    p.add_argument("--huber-delta", type=float, default=1e-3, help="Huber threshold on log residuals")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: <csv stem>_fit.png next to the CSV)")
    p.add_argument("--json", type=Path, default=None, help="JSON path (default: <csv stem>_fit.json next to the CSV)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes fitting in parallel (default: the CPUs this process may use; 1: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.epsilon > 0:
        p.error("--epsilon must be > 0")
    if args.bootstrap < 0:
        p.error("--bootstrap must be >= 0")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")
    if not args.huber_delta > 0:
        p.error("--huber-delta must be > 0")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    return args


class _Progress:
    """tqdm bar over bootstrap refits on stderr, made on the first update."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="refit", desc="bootstrap", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    """Fit, print the tables, write PNG and JSON, print the JSON line; return the exit status."""
    args = parse_args(argv)
    from cumo_megatron.research.results_csv import read_fit_rows
    from cumo_megatron.research.scaling_law import available_cpus, default_output, fit_sweep
    from cumo_megatron.research.scaling_plot import plot_scaling

    if not args.csv.is_file():
        print(f"error: {args.csv}: no such results CSV; run the scaling sweep first", file=sys.stderr)
        return 1
    group_by = None if args.group_by is None else [c.strip() for c in args.group_by.split(",") if c.strip()]
    progress = _Progress(args.quiet)
    try:
        report = fit_sweep(
            read_fit_rows(args.csv, group_by), epsilon=args.epsilon, resamples=args.bootstrap, seed=args.seed,
            confidence=args.confidence, delta=args.huber_delta, source=str(args.csv), progress=progress,
            workers=args.workers or available_cpus(),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    png_path = plot_scaling(report, args.plot or default_output(args.csv, ".png"))
    json_path = args.json or default_output(args.csv, ".json")
    summary = {"csv": str(args.csv), "plot": str(png_path), "json": str(json_path), **report.to_dict()}
    text = json.dumps(summary, allow_nan=False)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    print(report.format())
    print(f"\nplot: {png_path}\njson: {json_path}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
