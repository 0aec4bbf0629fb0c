"""Collate samples into a padded micro-batch.

Right padding to the longest sample of the micro-batch (the reference's collator), or to a fixed
length when asked (pipeline parallelism sends activations of one fixed shape between stages).
Padding positions hold ``pad_id`` in ``input_ids`` and 0 in ``labels`` and ``loss_mask``; since
attention is causal and padding sits on the right, real tokens never see it. Images of all samples
are concatenated in sample order, matching the order of the image-token runs in ``input_ids``.

A `Skipped` entry becomes an all-padding row (no loss), so the micro-batch keeps its size; the
markers travel in ``batch["skipped"]`` for `DataHealth`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cumo_megatron.data.dataset import Sample, Skipped
from cumo_megatron.data.records import DataError

__all__ = ["Collator", "collate"]


def collate(
    items: Sequence[Sample | Skipped],
    pad_id: int = 0,
    fixed_length: Optional[int] = None,
    pad_to_multiple_of: int = 1,
) -> dict:
    """Stack ``items`` into a batch dict.

    Keys: ``input_ids`` [b, s] int64, ``labels`` [b, s] int64, ``loss_mask`` [b, s] float32,
    ``padding_mask`` [b, s] bool (True = padding: the LLM's MoE routers leave it out of their aux
    losses and load counts; a skipped row is all padding), ``images`` [n, 3, H, W] float32 or None, ``indices`` (dataset index per row), ``record_ids``,
    ``skipped`` (list of `Skipped`), ``truncated`` (list of `Problem`).
    """
    samples = [it for it in items if isinstance(it, Sample)]
    longest = max((len(s.input_ids) for s in samples), default=1)
    if fixed_length is not None:
        if longest > fixed_length:
            worst = max(samples, key=lambda s: len(s.input_ids))
            raise DataError(
                f"sample {worst.index} (id={worst.record_id!r}) has {longest} tokens > fixed length {fixed_length}; "
                "set the dataset's max_length to at most the fixed sequence length"
            )
        length = fixed_length
    else:
        length = -(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of
    b = len(items)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.zeros((b, length), dtype=torch.long)
    loss_mask = torch.zeros((b, length), dtype=torch.float32)
    padding_mask = torch.ones((b, length), dtype=torch.bool)
    images = []
    for row, it in enumerate(items):
        if isinstance(it, Skipped):
            continue
        n = len(it.input_ids)
        input_ids[row, :n] = it.input_ids
        labels[row, :n] = it.labels
        loss_mask[row, :n] = it.loss_mask
        padding_mask[row, :n] = False
        if it.images is not None:
            images.append(it.images)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "padding_mask": padding_mask,
        "images": torch.cat(images) if images else None,
        "indices": [it.index for it in items],
        "record_ids": [it.record_id if isinstance(it, Sample) else it.problem.record_id for it in items],
        "skipped": [it for it in items if isinstance(it, Skipped)],
        "truncated": [it.truncated for it in samples if it.truncated is not None],
    }


@dataclass
class Collator:
    """A picklable `collate` with fixed options (DataLoader workers need a picklable callable)."""

    pad_id: int = 0
    fixed_length: Optional[int] = None
    pad_to_multiple_of: int = 1

    def __call__(self, items: Sequence[Sample | Skipped]) -> dict:
        """Collate ``items`` (see `collate`)."""
        return collate(items, self.pad_id, self.fixed_length, self.pad_to_multiple_of)
