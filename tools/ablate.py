"""Ablations in miniature on the quickstart's shapes task: matched stage-3 variants, one table.

    python tools/ablate.py --out runs/ablate
    python tools/ablate.py --out runs/ablate --variants dense,upcycled_aux --steps 20

Builds the quickstart's assets and trains its stages 1-2 once (``OUT/base``), then runs stage 3 once
per variant from that shared stage-2 checkpoint, with the same data, steps and seeds:

  stage2_start        no stage 3: the shared stage-2 checkpoint itself (the starting point)
  dense               no MoE (dense stage 3)
  upcycled_aux        reference: co-upcycled CLIP-MoE + MLP-MoE, top-2 of 4, aux losses (the quickstart's)
  upcycled_noaux      the same without aux losses (balance and z-loss coefficients 0)
  scratch_aux         experts freshly initialised instead of copied from the dense MLPs
  clip_moe_only       CLIP-MoE, dense connector
  connector_moe_only  MLP-MoE connector, dense ViT
  top2_of_8           top-2 of 8 experts (vs top-2 of 4: upcycled_aux)

Each variant answers the held-out questions. Writes OUT/config.json (the resolved settings),
OUT/table.md, OUT/table.csv and OUT/table.json: held-out exact-match accuracy (overall and per
question type), final LM loss and vision / connector MaxVio (busiest expert / mean load, 1.0 =
balanced) over the last --last-steps steps. Prints the Markdown table, then one JSON line with it.
Re-running skips finished variants and continues an interrupted one. Exit status 1 with an
``error:`` line when a step fails (its log is named), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (defaults: `cumo_megatron.research.ablate.Settings`)."""
    from cumo_megatron.research.ablate import VARIANTS, Settings

    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablate"), help="output directory (default runs/ablate)")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(v.name for v in VARIANTS)} (default all)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"stage-3 steps of every variant (default {d.steps})")
    p.add_argument("--stage2-steps", type=int, default=d.stage2_steps,
                   help=f"steps of the shared stage 2 (default {d.stage2_steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of data, models and routers (default {d.seed})")
    p.add_argument("--n-train", type=int, default=d.n_train, help=f"training images (default {d.n_train})")
    p.add_argument("--n-eval", type=int, default=d.n_eval,
                   help=f"held-out images, 2 questions each (default {d.n_eval})")
    p.add_argument("--last-steps", type=int, default=d.last_steps,
                   help=f"steps averaged for the final loss and MaxVio (default {d.last_steps})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the ablation; print the table and a JSON line; return the exit status."""
    args = parse_args(argv)
    from cumo_megatron.research.ablate import Settings, format_markdown, run_ablation

    settings = Settings(steps=args.steps, seed=args.seed, stage2_steps=args.stage2_steps, n_train=args.n_train,
                        n_eval=args.n_eval, last_steps=args.last_steps)
    names = args.variants.split(",") if args.variants else None
    try:
        # The quickstart's progress lines go to stderr with the bar: stdout is the table and the JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            rows = run_ablation(args.out, names, settings, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_markdown(rows, settings))
    print(json.dumps({"out": str(args.out.resolve()), "settings": dataclasses.asdict(settings), "rows": rows}))
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer may re-import __main__ in workers
    sys.exit(main())
