"""Ask a CuMo checkpoint about an image: ``python -m cumo_megatron.generate``.

    python -m cumo_megatron.generate --load CKPT --image cat.png --prompt "What is this?"
    torchrun --nproc_per_node 2 -m cumo_megatron.generate --load CKPT ...   # TP = 2
    python -m cumo_megatron.generate --load CKPT --batch questions.json --out answers.jsonl

Single mode prints the answer alone on stdout (everything else goes to stderr). Batch mode reads a
LLaVA-format ``.json``/``.jsonl`` (``id``, ``image``, ``conversations``; the first human turn is
the question, a following gpt turn is kept as ``reference``; LLaVA's evaluation lines
``{question_id, image, text}`` work too) and writes one JSON line per record to ``--out``:
``{"id", "question_id", "prompt", "text", "reference", "model_id"}``, ``--batch-size`` questions
at a time (left-padded into one batch; greedy answers are those of each question asked alone).

``--load`` takes our checkpoint directory (or a trainer's save directory: its latest checkpoint) or
an original CuMo release directory (converted on the fly, TP = 1; ``--clip-dir`` gives the local
CLIP a release names by hub id). The tokenizer, the template and the image aspect handling are
those the checkpoint carries (`cumo_megatron.checkpoint.assets`); ``--tokenizer``, ``--template``
and ``--aspect`` override them. Exit status: 2 for bad options, 4 for a bad batch file or image,
5 for an unusable checkpoint or tokenizer; one line with the reason, no traceback.

Greedy decoding when ``--temperature`` is 0 (the default), else temperature + top-p sampling
seeded by ``--seed``. Under ``torchrun`` the world is split into ``--pp`` pipeline stages
(default 1) of ``--tp`` ranks (default: all the rest); only rank 0 prints and writes.

``--contrast-weak-topk K --contrast-alpha A`` turn on self-contrast decoding of an MoE model (SCMoE,
Shi et al. 2024, with contrastive decoding's plausibility constraint ``--contrast-beta``, Li et al.
2023): each token is chosen from ``log p + A * (log p - log p_weak)``, ``p_weak`` the same model with
every MoE router weakened (``--contrast-weak-routing``: top-K, bottom-K or the K-th expert); see
`cumo_megatron.inference.contrast`. A model without MoE modules is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("cumo_megatron.generate")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m cumo_megatron.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="our checkpoint directory or an original CuMo release directory")
    p.add_argument("--clip-dir", default=None, help="with a release --load: the local CLIP checkpoint directory "
                   "its config.json names (mm_vision_tower)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several <image>)")
    p.add_argument("--prompt", help="the question (single mode); '<image>\\n' is prepended when absent")
    p.add_argument("--batch", help="LLaVA-format .json/.jsonl of questions (batch mode)")
    p.add_argument("--out", help="answers .jsonl (batch mode)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="questions generated together in batch mode (left-padded; default 8). Greedy answers "
                   "do not depend on it; sampled ones do (one generator per batch)")
    p.add_argument("--image-folder", help="folder the batch file's image names are relative to "
                   "(default: the batch file's folder)")
    p.add_argument("--template", default=None, help="vicuna_v1 | mistral_instruct | plain (default: the one the "
                   "checkpoint carries, else mistral_instruct for Mistral/Mixtral and vicuna_v1 otherwise)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer directory "
                   "(default: the one --load carries, or tokenizer.model in or beside it)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aspect", choices=("pad", "crop"), default=None,
                   help="image aspect handling (default: the checkpoint's, else pad)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world size / --pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1; not with --contrast-*)")
    c = p.add_argument_group("self-contrast decoding (MoE models)")
    c.add_argument("--contrast-weak-topk", type=int, default=None, metavar="K",
                   help="experts per token of the weak routing (top/bottom), or the rank of its one expert (rank)")
    c.add_argument("--contrast-alpha", type=float, default=None, metavar="A",
                   help="contrast strength: score = log p + A * (log p - log p_weak); 0 = plain scores (cut by B)")
    c.add_argument("--contrast-beta", type=float, default=0.1, metavar="B",
                   help="plausibility: only tokens with p >= B * max p may be chosen (default 0.1; 0 = off)")
    c.add_argument("--contrast-weak-routing", choices=("top", "bottom", "rank"), default="top",
                   help="weak routing: the K best experts (default), the K worst, or the K-th best alone")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if (args.batch is None) == (args.prompt is None):
        p.error("give either --prompt (single mode) or --batch with --out (batch mode)")
    if args.batch is not None and not args.out:
        p.error("--batch needs --out answers.jsonl")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.pp < 1 or (args.tp is not None and args.tp < 1):
        p.error("--tp and --pp must be >= 1")
    if args.pp > 1 and args.contrast_weak_topk is not None:
        p.error("self-contrast decoding runs with --pp 1 (use --tp to split the model)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if (args.contrast_weak_topk is None) != (args.contrast_alpha is None):
        p.error("self-contrast decoding needs both --contrast-weak-topk and --contrast-alpha")
    try:
        _contrast_settings(args)
    except ValueError as err:
        p.error(f"--contrast-*: {err}")


def _contrast_settings(args):
    """The `ContrastSettings` the options ask for, or None (plain decoding)."""
    if args.contrast_weak_topk is None:
        return None
    from cumo_megatron.inference.contrast import ContrastSettings

    return ContrastSettings(args.contrast_weak_topk, args.contrast_alpha, args.contrast_beta,
                            args.contrast_weak_routing)


def batch_items(path: Path, image_folder: Path):
    """(record id, question, image paths, reference answer) for each record of a batch file;
    `DataError` naming the record for one that is not a question."""
    from cumo_megatron.data.records import DataError, load_file, record_images
    from cumo_megatron.inference.prompts import first_question

    for raw in load_file(path):
        if raw.error is not None:
            raise DataError(f"{path} line {raw.line}: {raw.error}")
        data = raw.data
        if not isinstance(data, dict):
            raise DataError(f"{path} record {raw.index}: expected a JSON object, got {type(data).__name__}")
        rid = data.get("id", data.get("question_id", raw.index))
        if "conversations" in data:
            try:
                question, reference = first_question(data["conversations"], str(rid))
            except ValueError as err:
                raise DataError(f"{path} record {raw.index}: {err}") from err
        elif isinstance(data.get("text"), str):  # LLaVA evaluation question files
            question, reference = data["text"], data.get("answer")
        else:
            raise DataError(f"{path} record {raw.index} (id={rid!r}): needs 'conversations' or 'text'")
        images = [image_folder / name for name in record_images(data)]
        yield rid, question, images, reference


def run(args) -> int:
    """Load, answer, print / write. Returns the exit status."""
    import torch

    import cumo_megatron.platform as platform
    from cumo_megatron.checkpoint.assets import load_checked_tokenizer
    from cumo_megatron.config.loader import ConfigError
    from cumo_megatron.inference.contrast import check_contrast
    from cumo_megatron.inference.session import (
        InferenceSession, default_tokenizer_path, generation_settings, load_model,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tp or max(1, world // args.pp)
    platform.initialize(platform.ParallelSizes(tp=tp, pp=args.pp), seed=args.seed)
    rank = torch.distributed.get_rank()
    model, cfg = load_model(args.load, clip_dir=args.clip_dir)
    tokenizer = load_checked_tokenizer(args.tokenizer or default_tokenizer_path(args.load), cfg.language.vocab_size,
                                       "--tokenizer")
    carried = generation_settings(args.load, cfg)
    session = InferenceSession(model, cfg, tokenizer, template=args.template or carried.template,
                               aspect=args.aspect or carried.aspect)
    log.info("loaded %s (tp=%d, pp=%d, template %s, tokenizer %r)", args.load, tp, args.pp, session.template, tokenizer)
    contrast = _contrast_settings(args)
    if contrast is not None:
        try:
            check_contrast(model, contrast)
        except ValueError as err:
            raise ConfigError(f"--contrast-weak-topk/--contrast-alpha: {args.load}: {err}") from err
        log.info("self-contrast decoding: %s", contrast)
    return _answer_all(args, session, rank, contrast)


def _answer_all(args, session, rank: int, contrast) -> int:
    """Single mode: print the answer; batch mode: write one JSON line per record."""
    from cumo_megatron.config.loader import ConfigError
    from cumo_megatron.data.records import DataError
    from cumo_megatron.errors import UserError

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, contrast=contrast)
    if args.prompt is not None:
        try:
            answer = session.answer(args.prompt, args.image, **sampling)
        except ValueError as err:  # the prompt's <image> count or template does not fit the images
            if isinstance(err, UserError):
                raise
            raise ConfigError(f"--prompt/--image: {err}") from err
        return 0 if rank != 0 else _emit(answer.text)

    batch = Path(args.batch)
    folder = Path(args.image_folder) if args.image_folder else batch.parent
    out = Path(args.out)
    n = 0
    with contextlib.ExitStack() as stack:
        sink = None
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            sink = stack.enter_context(out.open("w", encoding="utf-8"))
        for chunk in _chunks(batch_items(batch, folder), args.batch_size):
            try:
                answers = session.answer_many([(question, images) for _, question, images, _ in chunk], **sampling)
            except ValueError as err:
                if isinstance(err, UserError):
                    raise
                ids = ", ".join(repr(rid) for rid, _, _, _ in chunk)
                raise DataError(f"{batch} (records {ids}): {err}") from err
            for (rid, _, _, reference), answer in zip(chunk, answers):
                n += 1
                if sink is not None:
                    row = {"id": rid, "question_id": rid, "prompt": answer.prompt, "text": answer.text,
                           "reference": reference, "model_id": Path(args.load).name}
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            if sink is not None:
                sink.flush()
            log.info("answered %d questions", n)
    log.info("wrote %d answers to %s", n, out)
    return 0


def _chunks(items, size: int):
    """Lists of up to ``size`` consecutive items."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_REAL_STDOUT = sys.stdout


def _emit(text: str) -> int:
    _REAL_STDOUT.write(text + "\n")
    _REAL_STDOUT.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: user errors become one line and their exit status (`cumo_megatron.errors.run_cli`)."""
    from cumo_megatron.errors import run_cli

    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    """Parse, check, run; library prints are sent to stderr so stdout carries only the answer."""
    global _REAL_STDOUT
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    _REAL_STDOUT = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
