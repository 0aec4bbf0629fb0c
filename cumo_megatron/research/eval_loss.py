"""Held-out LM loss of a finished training run, from its latest checkpoint.

The trainer itself validates on ``data.eval_files`` during training (every ``train.eval_interval``
steps and at the end: `cumo_megatron.training.validation`, rows with ``"split": "validation"`` in
``metrics.jsonl``). This tool measures a finished run's checkpoint afterwards, on any held-out
files, in one process; the scaling sweep takes each cell's final eval loss from it:

    python -m cumo_megatron.research.eval_loss --run RUN_DIR [--data held_out.json ...] [--out eval.json]

``RUN_DIR`` is a trainer output (``<train.save>``: ``config.yaml`` + ``latest``). The held-out files
default to the run's ``data.eval_files``. Samples go through the training data pipeline with the
run's own settings (template, tokens per image, ``max_length``, image preprocessing, ``data.policy``),
so the held-out loss is the training loss's twin: the token-weighted mean of the per-token LM loss
over every supervised token of the held-out set (not a mean of per-batch means, which would weigh
the tokens of a short last batch more). Runs in one process (a world of one, PP = 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["HeldOutLoss", "heldout_dataset", "heldout_loss", "evaluate_run", "main"]


@dataclass(frozen=True)
class HeldOutLoss:
    """The LM loss over a held-out set, and what it was computed on."""

    loss: float  # token-weighted mean of the per-token LM loss (nats)
    tokens: int  # supervised tokens counted
    samples: int  # samples that contributed
    skipped: int  # samples the data pipeline could not use (data.policy=skip)

    def as_dict(self) -> dict:
        """Plain dict (for JSON)."""
        return asdict(self)


def heldout_dataset(cfg, files: Sequence[str], image_folder: Optional[str] = None):
    """A `LlavaDataset` of ``files`` prepared exactly as the run ``cfg`` prepared its training data
    (the trainer's validation builds its held-out data with the same function)."""
    from cumo_megatron.training.validation import heldout_dataset as build

    return build(cfg, files, image_folder)


def heldout_loss(model, dataset, micro_batch_size: int = 8) -> HeldOutLoss:
    """Token-weighted mean LM loss of ``model`` (a world-of-one `CuMoModel`) over ``dataset``.

    Samples are taken in dataset order, ``micro_batch_size`` at a time, right-padded by the
    training collator; padding and unsupervised positions carry no weight.
    """
    import torch

    from cumo_megatron.data.batching import Collator
    from cumo_megatron.data.dataset import Skipped

    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    collate = Collator(pad_id=dataset.tokenizer.pad_id)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    loss_sum, tokens, samples, skipped = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), micro_batch_size):
                items = [dataset[i] for i in range(start, min(start + micro_batch_size, len(dataset)))]
                n_bad = sum(isinstance(it, Skipped) for it in items)
                skipped += n_bad
                if n_bad == len(items):
                    continue
                batch = collate(items)
                images = batch["images"]
                if images is not None:
                    images = images.to(device=param.device, dtype=param.dtype)
                per_token = model(
                    input_ids=batch["input_ids"].to(param.device),
                    images=images,
                    labels=batch["labels"].to(param.device),
                )
                mask = batch["loss_mask"].to(per_token.device, torch.float64)
                loss_sum += float((per_token.double() * mask).sum())
                tokens += int(mask.sum())
                samples += len(items) - n_bad
    finally:
        model.train(was_training)
    loss = loss_sum / tokens if tokens else math.nan
    return HeldOutLoss(loss=loss, tokens=tokens, samples=samples, skipped=skipped)


def evaluate_run(
    run_dir,
    files: Optional[Sequence[str]] = None,
    image_folder: Optional[str] = None,
    micro_batch_size: Optional[int] = None,
) -> HeldOutLoss:
    """Held-out loss of the latest checkpoint in the trainer output ``run_dir``.

    ``files`` default to the run's ``data.eval_files``; ``micro_batch_size`` to its
    ``train.micro_batch_size``. Brings up (and tears down) a world-of-one process group.
    """
    from cumo_megatron.config.loader import load_config
    from cumo_megatron.config.schema import ExperimentConfig

    # Checked before megatron is imported: a wrong path fails in a second, not after the import.
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {run_dir} is not a training output directory")
    if not (run_dir / "latest").is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint (no 'latest'); the run did not finish a save")
    cfg = load_config(ExperimentConfig, config)
    files = list(files) if files else list(cfg.data.eval_files)
    if not files:
        raise ValueError(f"no held-out files: {config} has an empty data.eval_files; pass --data")

    import cumo_megatron.platform as platform
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.models.parallelize import place_for_inference, placement_for
    from cumo_megatron.training.checkpointing import load_weights

    platform.initialize(platform.ParallelSizes(), seed=cfg.seed)
    try:
        model = build_model(cfg.model, ParallelConfig())
        report = load_weights(model, run_dir, cfg.model, ParallelConfig(), seed=cfg.seed)
        if report["upcycled"]:
            raise RuntimeError(f"{run_dir}: its checkpoint does not match its config.yaml (dense {report['upcycled']})")
        model = place_for_inference(model, placement_for(cfg.model))  # the run's device and dtype
        dataset = heldout_dataset(cfg, files, image_folder)
        return heldout_loss(model, dataset, micro_batch_size or cfg.train.micro_batch_size)
    finally:
        platform.destroy()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: print (and with ``--out`` write) the held-out loss as JSON; 1 on failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="trainer output directory (<train.save>)")
    parser.add_argument("--data", nargs="+", help="held-out LLaVA JSON/JSONL files (default: the run's data.eval_files)")
    parser.add_argument("--image-folder", help="folder the held-out images are relative to (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, help="samples per forward pass (default: the run's)")
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run, args.data, args.image_folder, args.micro_batch_size)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"eval_loss: {err}", file=sys.stderr)
        return 1
    text = json.dumps(result.as_dict(), indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    print(text)
    return 0


# megatron's checkpoint reader may start processes that re-import __main__: keep this guard.
if __name__ == "__main__":
    sys.exit(main())
