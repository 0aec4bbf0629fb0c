"""Expert load of every MoE layer (vision encoder, connector, LLM): heatmap, table, JSON summary.

    python tools/expert_load.py --load ckpt/stage3 --data eval.json --image-folder images --out runs/load/eval
    python tools/expert_load.py --load runs/stage3/iter_0001000 --data eval.json --limit 500 --out runs/load/it1000
    python tools/expert_load.py --metrics runs/stage3/metrics.jsonl --steps 900:1000 --out runs/load/train

``--load`` runs the model over the records of ``--data`` (LLaVA .json/.jsonl), one sample per
forward pass, and counts each expert's top-k choices of every token (image tokens in the vision
encoder and connector, the whole sequence in an MoE LLM). It takes our model checkpoint, an
original CuMo release, or a trainer's save directory / ``iter_N`` (then the run's
``config.yaml`` gives the template, tokenizer, max length and aspect unless set here). Whole
conversations go through the training data pipeline; ``--prompt-only`` feeds only the first
question as ``generate`` prompts it (for benchmark files without answers).

``--metrics`` sums the per-step ``expert_load`` of a training run's ``metrics.jsonl`` over
``--steps A:B`` (both included; default all steps).

Writes to ``--out``: ``config.json`` (the resolved options), ``expert_load.png`` (layers x experts,
share of tokens, one panel per module), ``expert_load.csv`` and ``expert_load.json`` (per layer:
shares, counts, MaxVio = busiest expert / mean, entropy / log(E)). Prints the table, then one JSON
line summarising it (mean MaxVio and entropy per module). Exit status 1 with an ``error:`` line on
bad input. Runs in one process (world of one, TP = 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint: ours, a CuMo release, or a trainer save dir / iter_N")
    source.add_argument("--metrics", help="a training run's metrics.jsonl")
    p.add_argument("--data", help="LLaVA .json/.jsonl whose records the model runs over (with --load)")
    p.add_argument("--image-folder", help="folder of the records' images (default: the data file's folder)")
    p.add_argument("--template", help="vicuna_v1 | mistral_instruct | plain (default: the run's, else by LLM family)")
    p.add_argument("--tokenizer", help="tokenizer.model or directory (default: the run's, else in/beside --load)")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--max-length", type=int, help="truncate conversations to this many tokens "
                   "(default: the run's data.max_length, else the LLM's position limit)")
    p.add_argument("--aspect", choices=("pad", "crop"), help="image aspect handling (default: the run's, else pad)")
    p.add_argument("--prompt-only", action="store_true", help="feed only the first question, as generate does")
    p.add_argument("--steps", help="A:B, the metrics steps to sum (both included; A: or :B open-ended)")
    p.add_argument("--title", help="heatmap title (default: names the source)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.load and not args.data:
        p.error("--load needs --data FILE.json (the records to run the model over)")
    if args.metrics and (args.data or args.limit or args.prompt_only):
        p.error("--data, --limit and --prompt-only go with --load, not --metrics")
    if args.steps and not args.metrics:
        p.error("--steps goes with --metrics")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def _from_model(args) -> tuple[dict, dict, str]:
    from tqdm import tqdm

    import cumo_megatron.platform as platform
    from cumo_megatron.data.records import load_file
    from cumo_megatron.research.expert_load import model_load

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("tools/expert_load.py runs in one process; start it without torchrun")
    records = len(load_file(args.data))
    platform.initialize(platform.ParallelSizes(), seed=0)
    with tqdm(total=min(records, args.limit or records), unit="record", desc="expert load", file=sys.stderr,
              disable=args.quiet) as bar:
        layers, settings = model_load(
            args.load, args.data, args.image_folder, args.template, args.tokenizer, args.limit, args.max_length,
            args.aspect, args.prompt_only, bar,
        )
    settings["source"] = "model"
    title = f"expert load: {Path(args.load).name} on {Path(args.data).name} ({settings['samples']} samples)"
    return layers, settings, title


def _from_metrics(args) -> tuple[dict, dict, str]:
    from cumo_megatron.research.expert_load import parse_steps, read_metrics_load

    lo, hi = parse_steps(args.steps)
    found = read_metrics_load(args.metrics, (lo, hi))
    if not found.steps:
        raise ValueError(f"{args.metrics}: no row with expert load in steps {args.steps or 'all'} "
                         "(a dense stage logs none); check --steps")
    settings = {"source": "metrics", "metrics": str(args.metrics), "steps": args.steps, "first_step": found.steps[0],
                "last_step": found.steps[-1], "num_steps": len(found.steps),
                "unreadable_lines": found.unreadable_lines}
    run = Path(args.metrics).parent.name or str(args.metrics)
    title = f"expert load: {run}, steps {found.steps[0]}-{found.steps[-1]} ({len(found.steps)} steps)"
    return found.layers, settings, title


def run(args) -> tuple[str, dict]:
    """Collect, write the outputs; return the printed table and the summary."""
    from cumo_megatron.research.expert_load import format_table, write_report

    layers, settings, title = (_from_model if args.load else _from_metrics)(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(settings, indent=1) + "\n")
    table, summary = write_report(layers, args.out, args.title or title, settings)
    summary = {"source": settings["source"], **{k: settings[k] for k in ("samples", "num_steps") if k in settings},
               **summary}
    return format_table(table), summary


def _expected_errors() -> tuple[type, ...]:
    errors: tuple[type, ...] = (ValueError, FileNotFoundError)
    checkpointing = sys.modules.get("cumo_megatron.training.checkpointing")  # imported only on that path
    return errors + ((checkpointing.CheckpointError,) if checkpointing else ())


def main(argv=None) -> int:
    """Run the analysis; return the exit status."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library prints must not mix with the table
            table, summary = run(args)
    except Exception as err:
        if not isinstance(err, _expected_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table, file=out)
    print(json.dumps(summary), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
