"""Time of the scaling-law fitter against its torch predecessor on a 120-cell table, same process.

    python bench/fit_scaling_law_speed.py [--resamples 200] [--revision c732944]

The table has the seed paper's shape (OpenCLIP ViT-B/16, L/14, H/14, g/14 x LLM 7B, 13B x three
data sets x five data sizes 1M..10M = 120 cells), drawn from known joint power laws with 0.3%
log-normal noise. The new fitter reads it as a CSV (a ``data`` column, no compute or wall time)
and makes 24 curves and 6 joint fits. The old one (``cumo_megatron/research/scaling_law.py`` at
``--revision``, written by ``git show`` into a temporary module) cannot read that CSV nor group
by data set, so it gets the same rows as sweep rows with the data set folded into the LLM name:
the same 30 fits, the same bootstrap draws. Both run with the default bootstrap (200 resamples
per fit) one after the other, as each ships: the new one in the tool's default worker processes
(one per available CPU; ``--workers`` to change), the old one in this process with torch's
default threads. The new one also runs in one process, for its CPU seconds (the workers are
children of multiprocessing's fork server, which this process's CPU clock does not see).

Prints each fitter's wall and CPU seconds, the ratio, and how far the two agree (largest relative
difference of E and the exponents over the fits); the last line is one JSON object.
"""

from __future__ import annotations

import os

# As tools/fit_scaling_law.py does, before numpy loads its BLAS (torch's own threads are left as
# they are, so the old fitter runs as it shipped).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cumo_megatron.research.results_csv import SweepRow, read_fit_rows  # noqa: E402
from cumo_megatron.research.scaling_law import available_cpus, fit_sweep  # noqa: E402

VISIONS = {"ViT-B/16": 86_192_640, "ViT-L/14": 303_966_208, "ViT-H/14": 632_076_800, "ViT-g/14": 1_012_657_920}
LLMS = {"7B": 7_000_000_000, "13B": 13_000_000_000}
# Per data set: E, A, alpha, B, beta of L(N, D) = E + A / N^alpha + B / D^beta (the 13B LLM: E - 0.1).
DATA = {"laion": (1.9, 30.0, 0.25, 400.0, 0.35), "coyo": (2.1, 20.0, 0.22, 900.0, 0.40), "cc": (1.7, 40.0, 0.30, 250.0, 0.30)}
SIZES = (1_000_000, 2_000_000, 4_000_000, 6_000_000, 10_000_000)
NOISE = 0.003


def table(seed: int = 0) -> list[dict]:
    """The 120 cells as CSV records."""
    rng = np.random.default_rng(seed)
    rows = []
    for llm, llm_params in LLMS.items():
        for data, (e, a, alpha, b, beta) in DATA.items():
            e = e - (0.1 if llm == "13B" else 0.0)
            for vision, n in VISIONS.items():
                for d in SIZES:
                    loss = (e + a * n**-alpha + b * d**-beta) * np.exp(rng.normal(0.0, NOISE))
                    rows.append({"vision": vision, "vision_params": n, "llm": llm, "llm_params": llm_params,
                                 "data": data, "data_size": d, "final_eval_loss": repr(float(loss)), "source": "synthetic"})
    return rows


def old_module(revision: str, folder: Path):
    """The fitter module as it was at ``revision``, imported from a temporary file."""
    text = subprocess.run(
        ["git", "show", f"{revision}:cumo_megatron/research/scaling_law.py"], cwd=REPO, check=True,
        stdout=subprocess.PIPE, text=True,
    ).stdout
    path = folder / "old_scaling_law.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_scaling_law", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed(fn):
    """fn's result, wall seconds and CPU seconds (all threads of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def disagreement(new, old) -> tuple[float, float]:
    """Over the fits both made, matched by (llm, data set, vision): the largest relative excess of
    the new fit's objective over the old one's, and the largest relative difference of E, alpha, beta."""
    old_fits = {(r.llm, r.vision): r.fit for r in old.curves + old.joints}
    excess, worst = 0.0, 0.0
    for r in new.curves + new.joints:
        key = ("|".join([r.llm] + [value for _, value in r.group]), r.vision)
        a, b = r.fit, old_fits.get(key)
        if a is None or b is None:
            continue
        excess = max(excess, (a.objective - b.objective) / b.objective)
        for name in ("E", "alpha", "beta"):
            if name in a.params:
                worst = max(worst, abs(a.params[name] / b.params[name] - 1.0))
    return excess, worst


def main() -> int:
    """Run both fitters, print the figures and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per fit (the tool's default: 200)")
    p.add_argument("--revision", default="c732944", help="git revision of the old torch fitter")
    p.add_argument("--workers", type=int, default=available_cpus(),
                   help="the new fitter's processes (default: as tools/fit_scaling_law.py, one per available CPU)")
    args = p.parse_args()

    records = table()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv_path = folder / "published.csv"
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        old = old_module(args.revision, folder)

        def new_fit(workers: int):
            return fit_sweep(read_fit_rows(csv_path), resamples=args.resamples, source=str(csv_path), workers=workers)

        new_report, new_wall, _ = timed(lambda: new_fit(args.workers))
        print(f"new (scipy L-BFGS-B, {args.workers} worker process(es)): {new_wall:.1f} s wall, "
              f"{len(new_report.curves)} curves + {len(new_report.joints)} joint fits, {args.resamples} resamples each")
        single_report, single_wall, new_cpu = timed(lambda: new_fit(1))
        assert single_report.to_dict() == new_report.to_dict(), "worker processes changed the fits"
        print(f"new (scipy L-BFGS-B, this process only): {single_wall:.1f} s wall, {new_cpu:.1f} s CPU")
        sweep_rows = [
            SweepRow(r["vision"], r["vision_params"], f"{r['llm']}|{r['data']}", r["llm_params"], r["data_size"],
                     float(r["final_eval_loss"]), 0.0, 0.0)
            for r in records
        ]
        old_report, old_wall, old_cpu = timed(lambda: old.fit_sweep(sweep_rows, resamples=args.resamples))
        print(f"old (torch L-BFGS, {args.revision}): {old_wall:.1f} s wall, {old_cpu:.1f} s CPU, "
              f"{len(old_report.curves)} curves + {len(old_report.joints)} joint fits")

    excess, worst = disagreement(new_report, old_report)
    print(f"speed-up: {old_wall / new_wall:.1f}x wall ({old_wall / single_wall:.1f}x in one process), "
          f"{old_cpu / new_cpu:.1f}x CPU")
    print(f"same fits: new objective at most {excess:.2g} (relative) above the old one's; "
          f"largest relative difference of E / alpha / beta: {worst:.2g}")
    print(json.dumps({
        "cells": len(records), "fits": len(new_report.curves) + len(new_report.joints), "resamples": args.resamples,
        "old_revision": args.revision, "old_wall_s": round(old_wall, 2), "old_cpu_s": round(old_cpu, 2),
        "new_wall_s": round(new_wall, 2), "new_one_process_wall_s": round(single_wall, 2),
        "new_cpu_s": round(new_cpu, 2), "ratio_wall": round(old_wall / new_wall, 2),
        "ratio_wall_one_process": round(old_wall / single_wall, 2), "ratio_cpu": round(old_cpu / new_cpu, 2),
        "max_objective_excess": excess, "max_rel_diff_E_alpha_beta": worst, "cpu_count": os.cpu_count(), "workers": args.workers,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
