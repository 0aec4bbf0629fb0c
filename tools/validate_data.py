"""Check a LLaVA dataset before training; exit 1 when any problem is found.

    python tools/validate_data.py --data llava_v1_5_mix665k.json:1 allava.jsonl:0.5 \\
        --images /data/images --tokenizer /models/mistral --template mistral_instruct \\
        --max-length 4096 --tokens-per-image 576

Without ``--tokenizer`` the length checks are skipped (records and images are still checked).
"""

from __future__ import annotations

import argparse
import sys

from cumo_megatron.data.records import parse_source_spec
from cumo_megatron.data.validate import TokenizerCheck, validate_sources


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE[:WEIGHT]", help="LLaVA .json / .jsonl files")
    p.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (enables the length checks)")
    p.add_argument("--template", default=None, help="prompt template: plain, vicuna_v1, mistral_instruct")
    p.add_argument("--max-length", type=int, default=None, help="longest allowed sample in tokens")
    p.add_argument("--tokens-per-image", type=int, default=576, help="tokens one image expands to")
    p.add_argument("--image-token-id", type=int, default=-200)
    p.add_argument("--no-decode", action="store_true", help="only check that image files exist (faster)")
    p.add_argument("--workers", type=int, default=4, help="threads checking records")
    p.add_argument("--show", type=int, default=20, help="how many offending records to print")
    args = p.parse_args(argv)
    if args.tokenizer and (args.template is None or args.max_length is None):
        p.error("--tokenizer needs --template and --max-length")
    if args.template is not None:
        from cumo_megatron.data.templates import get_template

        try:
            get_template(args.template)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv=None) -> int:
    """Run the checks, print the report, return the exit status."""
    args = parse_args(argv)
    sources = [parse_source_spec(spec) for spec in args.data]
    tokens = None
    if args.tokenizer:
        from cumo_megatron.data.tokenizer import load_tokenizer

        tokens = TokenizerCheck(
            tokenizer=load_tokenizer(args.tokenizer),
            template=args.template,
            max_length=args.max_length,
            tokens_per_image=args.tokens_per_image,
            image_token_id=args.image_token_id,
        )
    report = validate_sources(sources, args.images, tokens, decode_images=not args.no_decode, workers=args.workers)
    print(report.format(show=args.show))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
