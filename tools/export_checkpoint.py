"""Export a cumo-megatron model checkpoint (written at any TP x PP x EP layout) to HF / CuMo layouts.

    python tools/export_checkpoint.py --checkpoint ckpt/stage3 --out export/stage3

``--format split`` (default unless the checkpoint came from a CuMo release): ``language/`` is a HF
``*ForCausalLM`` directory (``from_pretrained`` loads it); a dense vision tower goes to ``vision/``
(a HF ``CLIPVisionModel``, or the CLIP layout it was imported from) and a dense connector to
``mm_projector.bin`` (LLaVA); an MoE vision tower / connector go to ``multimodal.safetensors`` in
the original CuMo release names, with the release ``config.json``. ``--format release`` writes one
original CuMo release directory. The LLM's tokenizer goes with it (into ``language/``, or the
release directory), written so ``transformers.AutoTokenizer.from_pretrained`` loads it. The output
appears complete or not at all. Exit status: 5 for an unusable checkpoint or output, 2 for bad
arguments, 1 when interrupted; one line with the reason, no traceback (``CUMO_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="our model checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--format", choices=("auto", "split", "release"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the export; return the exit status (user errors: `cumo_megatron.errors.run_cli`)."""
    from cumo_megatron.errors import run_cli

    return run_cli(_export, argv)


def _export(argv) -> int:
    args = parse_args(argv)
    from cumo_megatron.checkpoint.convert import export_checkpoint, run_with_progress

    return run_with_progress(
        "exporting", args.quiet,
        lambda progress: export_checkpoint(args.checkpoint, args.out, args.format, args.overwrite, progress),
    )


if __name__ == "__main__":  # megatron's checkpoint writer may re-import __main__ in workers
    sys.exit(main())
