"""Check a LLaVA dataset before training.

    python tools/validate_data.py --data llava_v1_5_mix665k.json:1 allava.jsonl:0.5 \\
        --images /data/images --tokenizer /models/mistral --template mistral_instruct \\
        --max-length 4096 --tokens-per-image 576 --json report.json

Without ``--tokenizer`` the length checks are skipped (records and images are still checked); with
it, ``--max-length`` defaults to ``data.max_length``'s default (printed). Images are checked as
training reads them: paths must stay inside ``--images`` (``--allow-images-outside`` lifts that, as
``data.allow_images_outside=true`` does in training) and their long side may be at most
``--max-aspect-ratio`` times the short one (``data.max_aspect_ratio``, read from the header).

Exit status: 0 no problem, 1 problems found (the report lists them), 2 a bad option, 4 a data
error that stops the check itself. ``CUMO_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cumo_megatron.config.schema import DataConfig
from cumo_megatron.data.records import parse_source_spec
from cumo_megatron.data.validate import DEFAULT_MAX_ASPECT_RATIO, TokenizerCheck, validate_sources

DEFAULT_TOKENS_PER_IMAGE = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE[:WEIGHT]", help="LLaVA .json / .jsonl files")
    p.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (enables the length checks)")
    p.add_argument("--template", default=None, help="prompt template: plain, vicuna_v1, mistral_instruct")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"longest allowed sample in tokens (default {DataConfig.max_length}, data.max_length's)")
    p.add_argument("--tokens-per-image", type=int, default=DEFAULT_TOKENS_PER_IMAGE, help="tokens one image expands to")
    p.add_argument("--image-token-id", type=int, default=-200)
    p.add_argument("--allow-images-outside", action="store_true",
                   help="accept image paths outside --images (absolute, '..', links); as data.allow_images_outside")
    p.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO,
                   help="long side / short side above which an image is bad (as data.max_aspect_ratio)")
    p.add_argument("--no-decode", action="store_true", help="only check that image files exist (faster)")
    p.add_argument("--workers", type=int, default=4, help="threads checking records")
    p.add_argument("--show", type=int, default=20, help="how many offending records to print")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the report as JSON (counts per kind, every bad record); '-' for stdout")
    args = p.parse_args(argv)
    if args.tokenizer and args.template is None:
        p.error("--tokenizer needs --template (plain, vicuna_v1 or mistral_instruct)")
    if args.images is not None and not os.path.isdir(args.images):
        p.error(f"--images {args.images} is not a directory")
    if args.max_length is not None and args.max_length < 1:
        p.error(f"--max-length must be >= 1, got {args.max_length}")
    if not args.max_aspect_ratio >= 1:
        p.error(f"--max-aspect-ratio must be >= 1, got {args.max_aspect_ratio}")
    if args.template is not None:
        from cumo_megatron.data.templates import get_template

        try:
            get_template(args.template)
        except ValueError as exc:
            p.error(str(exc))
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)
    sources = [parse_source_spec(spec) for spec in args.data]
    tokens = None
    if args.tokenizer:
        from cumo_megatron.data.tokenizer import load_tokenizer

        if args.max_length is None:
            args.max_length = DataConfig.max_length
            # On stderr when stdout carries the JSON report.
            print(f"max length: {args.max_length} tokens (data.max_length's default; --max-length sets it)",
                  file=sys.stderr if args.json == "-" else sys.stdout)
        tokens = TokenizerCheck(
            tokenizer=load_tokenizer(args.tokenizer),
            template=args.template,
            max_length=args.max_length,
            tokens_per_image=args.tokens_per_image,
            image_token_id=args.image_token_id,
        )
    report = validate_sources(
        sources, args.images, tokens, decode_images=not args.no_decode, workers=args.workers,
        allow_images_outside=args.allow_images_outside, max_aspect_ratio=args.max_aspect_ratio,
    )
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format(show=args.show))
        if args.json:
            from cumo_megatron.files import write_text_atomic

            write_text_atomic(args.json, json.dumps(report.to_dict(), indent=1) + "\n")
    return 0 if report.ok else 1


def main(argv=None) -> int:
    """Run the checks, print the report, return the exit status (see the module docstring)."""
    from cumo_megatron.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
