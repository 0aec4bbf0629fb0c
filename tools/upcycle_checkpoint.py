"""Convert (and optionally co-upcycle) checkpoints into a cumo-megatron model checkpoint.

Stage 1 start (HF CLIP + HF LLM, fresh connector)::

    python tools/upcycle_checkpoint.py --vision clip-vit-large-patch14-336/ --language vicuna-7b-v1.5/ \\
        --out ckpt/stage1-init

Stage 3 start (co-upcycling a dense stage-2 checkpoint: CLIP-MoE + MLP-MoE, 4 experts, top-2)::

    python tools/upcycle_checkpoint.py --from-checkpoint ckpt/stage2 --vision-experts 4 \\
        --connector-experts 4 --top-k 2 --out ckpt/stage3-init --tp 2 --pp 2 --ep 2

An original CuMo release::

    python tools/upcycle_checkpoint.py --cumo CuMo-mistral-7b/ --clip-dir clip-vit-large-patch14-336/ --out ckpt/cumo

The output directory is what the trainer's ``train.load`` takes. It loads at any TP x PP x EP
layout the model config allows; ``--tp/--pp/--ep/--etp`` only check the layout you intend to
train at. It carries what generation needs (`cumo_megatron.checkpoint.assets`): the source's
tokenizer files (or ``--tokenizer``'s) and the chat template, so ``python -m cumo_megatron.generate
--load OUT`` needs no other flag. The directory appears complete or not at all. Exit status: 5 for
an unusable source or output (checkpoint error), 2 for a bad configuration or arguments, 1 when
interrupted; one line with the reason, no traceback (``CUMO_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vision-layers takes comma-separated layer indices, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("sources")
    src.add_argument("--vision", type=Path, help="HF CLIP(Vision)Model directory or OpenCLIP checkpoint directory")
    src.add_argument("--language", type=Path, help="HF LLaMA / Vicuna / Mistral / Mixtral directory")
    src.add_argument("--connector", type=Path, help="LLaVA mm_projector.bin (default: freshly initialised)")
    src.add_argument("--cumo", type=Path, help="an original CuMo release directory")
    src.add_argument("--clip-dir", type=Path, help="with --cumo: the CLIP checkpoint the release names")
    src.add_argument("--from-checkpoint", type=Path, help="one of our (dense, stage-2) checkpoints")
    src.add_argument("--tokenizer", type=Path, help="tokenizer.model or tokenizer directory to carry into --out "
                     "(default: the one in --language / --cumo / --from-checkpoint)")
    up = p.add_argument_group("upcycling (experts = copies of the dense MLP, routers fresh)")
    up.add_argument("--vision-experts", type=int, help="experts per CLIP-MoE layer (default: vision stays as is)")
    up.add_argument("--vision-layers", type=_layers, help="built ViT layers to make MoE, e.g. 0,1,2 (default: all)")
    up.add_argument("--connector-experts", type=int, help="experts of the MLP-MoE connector (default: as is)")
    up.add_argument("--llm-experts", type=int, help="upcycle the LLM too (CuMo keeps it dense)")
    up.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    up.add_argument("--router-seed", type=int, default=0, help="seed of the fresh routers (and a fresh connector)")
    lay = p.add_argument_group("target layout (checked against the model; the files load at any layout)")
    lay.add_argument("--tp", type=int, default=1)
    lay.add_argument("--pp", type=int, default=1)
    lay.add_argument("--ep", type=int, default=1)
    lay.add_argument("--etp", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model-config override, e.g. precision=bf16 or vision.s2_scales=[1,3] (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the conversion; return the exit status (user errors: `cumo_megatron.errors.run_cli`)."""
    from cumo_megatron.errors import run_cli

    return run_cli(_convert, argv)


def _convert(argv) -> int:
    args = parse_args(argv)
    from cumo_megatron.checkpoint.convert import (
        Sources,
        UpcycleOptions,
        import_checkpoint,
        run_with_progress,
    )
    from cumo_megatron.config.schema import ParallelConfig

    sources = Sources(
        vision=args.vision, language=args.language, connector=args.connector, cumo=args.cumo,
        from_checkpoint=args.from_checkpoint, clip_dir=args.clip_dir, tokenizer=args.tokenizer,
    )
    upcycle = UpcycleOptions(
        vision_experts=args.vision_experts, connector_experts=args.connector_experts, llm_experts=args.llm_experts,
        top_k=args.top_k, vision_layers=args.vision_layers, seed=args.router_seed,
    )
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    return run_with_progress(
        "converting", args.quiet,
        lambda progress: import_checkpoint(
            sources, args.out, upcycle, parallel, args.overrides, args.overwrite, progress
        ),
    )


if __name__ == "__main__":  # megatron's checkpoint writer may re-import __main__ in workers
    sys.exit(main())
