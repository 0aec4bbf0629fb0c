"""Deterministic, length/modality-grouped, data-parallel batch sampler with exact resume.

Order of one epoch (all ranks compute the same global order from ``(seed, epoch)``):

1. ``megabatch = dp_size * micro_batch_size`` samples, the samples of one micro-step on all ranks.
2. ``grouping="modality_length"`` (the reference's ``group_by_modality_length``): image samples and
   text-only samples are shuffled separately and cut into megabatches; within a megabatch samples
   are sorted by length (longest first) and dealt to the ranks so each rank's micro-batch has a
   similar total length (the reference's ``split_to_even_chunks``). The full megabatches of both
   modalities are shuffled together; the two incomplete last ones are merged, sorted, and placed at
   the end (so only the tail mixes modalities). ``"length"`` does the same ignoring modality;
   ``"none"`` is a plain shuffle.
3. A final incomplete megabatch is filled with samples from the start of the epoch's order (as
   ``DistributedSampler`` / accelerate do), so every rank gets the same number of micro-batches.

Rank ``r`` takes slice ``[r * mbs, (r + 1) * mbs)`` of every megabatch. Differences from the
reference, on purpose: every random choice uses one seeded generator (the reference shuffles the
per-modality lists with the global torch RNG), so the order is a pure function of
``(seed, epoch, lengths, has_image, micro_batch_size, dp_size)``.

Resume: the sampler's ``epoch`` and ``position`` (micro-batches of this epoch already delivered)
are its whole state; `ResumableLoader` advances them as it *hands out* batches (not as DataLoader
workers prefetch them), so a checkpoint records exactly what the training loop consumed.

Every DataLoader iterator draws a base seed (for its workers' ``random``/numpy/torch streams);
`ResumableLoader` gives each epoch's DataLoader its own generator seeded from
``(seed, epoch, dp_rank)``, so iterating never advances torch's default generator (which dropout
draws from: a run resumed mid-epoch would otherwise be one draw ahead of the uninterrupted run) and
the workers of an epoch get the same seeds however often the run was resumed.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from cumo_megatron.data.records import DataError

__all__ = ["Grouping", "LengthGroupedBatchSampler", "ResumableLoader", "split_to_even_chunks"]

Grouping = Literal["modality_length", "length", "none"]
_GROUPINGS = ("modality_length", "length", "none")


def split_to_even_chunks(indices: Sequence[int], lengths: np.ndarray, num_chunks: int) -> list[list[int]]:
    """Deal ``indices`` (longest first) into ``num_chunks`` equal-count chunks of similar total length.

    Greedy: each index goes to the chunk with the smallest total so far among those not yet full.
    When the count does not divide, chunks are strided slices (only the padded tail can hit this).
    """
    indices = list(indices)
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        k = totals.index(min(totals))
        chunks[k].append(index)
        totals[k] += float(lengths[index])
        if len(chunks[k]) == per_chunk:
            totals[k] = float("inf")
    return chunks


class LengthGroupedBatchSampler:
    """Yields this data-parallel rank's micro-batches (lists of dataset indices) for one epoch.

    Use as a DataLoader ``batch_sampler``. ``epoch`` and ``position`` select where iteration
    starts; `state_dict` / `load_state_dict` save and restore them (with a fingerprint of the data
    and the layout, so resuming on different data or a different batch layout fails loudly).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        micro_batch_size: int,
        dp_size: int = 1,
        dp_rank: int = 0,
        seed: int = 0,
        grouping: Grouping = "modality_length",
    ):
        if grouping not in _GROUPINGS:
            raise ValueError(f"grouping={grouping!r} is unknown; choose one of {', '.join(_GROUPINGS)}")
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad layout: micro_batch_size={micro_batch_size} dp_size={dp_size} dp_rank={dp_rank}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_image = np.asarray(has_image, dtype=bool)
        if self.lengths.shape != self.has_image.shape or self.lengths.ndim != 1:
            raise ValueError(f"lengths {self.lengths.shape} and has_image {self.has_image.shape} must be equal 1-D")
        if len(self.lengths) == 0:
            raise DataError("the dataset is empty: nothing to sample")
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.grouping = grouping
        self.epoch = 0
        self.position = 0  # micro-batches of `epoch` already consumed
        self._cache: tuple[int, list[list[int]]] | None = None

    # ------------------------------------------------------------------ order
    @property
    def megabatch_size(self) -> int:
        """Samples per micro-step over all data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank."""
        return -(-len(self.lengths) // self.megabatch_size)

    def _length_grouped(self, indices: np.ndarray, rng: np.random.Generator, sort: bool) -> list[list[int]]:
        perm = indices[rng.permutation(len(indices))]
        size = self.megabatch_size
        out = []
        for start in range(0, len(perm), size):
            mb = perm[start : start + size].tolist()
            if sort:
                mb.sort(key=lambda i: self.lengths[i], reverse=True)
                mb = [i for chunk in split_to_even_chunks(mb, self.lengths, self.dp_size) for i in chunk]
            out.append(mb)
        return out

    def megabatches(self, epoch: int) -> list[list[int]]:
        """The global order of ``epoch``: full megabatches, rank r's part at ``[r*mbs:(r+1)*mbs]``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        all_idx = np.arange(len(self.lengths))
        if self.grouping == "none":
            mbs = self._length_grouped(all_idx, rng, sort=False)
        elif self.grouping == "length" or self.has_image.all() or not self.has_image.any():
            mbs = self._length_grouped(all_idx, rng, sort=True)
        else:
            mm = self._length_grouped(all_idx[self.has_image], rng, sort=True)
            lang = self._length_grouped(all_idx[~self.has_image], rng, sort=True)
            full = mm[:-1] + lang[:-1]
            full = [full[i] for i in rng.permutation(len(full))]
            tail = sorted(mm[-1] + lang[-1])
            mbs = full + [tail[i : i + self.megabatch_size] for i in range(0, len(tail), self.megabatch_size)]
        mbs = self._fill_last(mbs)
        self._cache = (epoch, mbs)
        return mbs

    def _fill_last(self, mbs: list[list[int]]) -> list[list[int]]:
        missing = self.megabatch_size - len(mbs[-1])
        if missing:
            flat = [i for mb in mbs for i in mb]
            fill = [flat[k % len(flat)] for k in range(missing)]
            mbs[-1] = mbs[-1] + fill
        return mbs

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of ``epoch``, in order."""
        lo, hi = self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size
        return [mb[lo:hi] for mb in self.megabatches(epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        # Snapshot now: a DataLoader calls iter() once and prefetches ahead of the consumer.
        return iter(self.micro_batches(self.epoch)[self.position :])

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.lengths.tobytes())
        h.update(self.has_image.tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """Position plus what the order depends on (checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "grouping": self.grouping,
            "num_samples": int(len(self.lengths)),
            "data_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; refuse if the data or batch layout differ from the saved run."""
        mine = self.state_dict()
        for key in ("seed", "micro_batch_size", "dp_size", "grouping", "num_samples", "data_fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data order: the checkpoint has {key}={state.get(key)!r} but this run has "
                    f"{mine[key]!r}; the sample order depends on it, so a resumed run would not see the samples the "
                    "interrupted run would have seen (restore the original data/batch settings to resume exactly)"
                )
        if not 0 <= int(state["position"]) <= len(self):
            raise DataError(f"saved sampler position {state['position']} is outside the epoch's {len(self)} micro-batches")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class ResumableLoader:
    """Iterates micro-batches over epochs and remembers exactly how many it handed out.

    Wraps a DataLoader built on ``sampler`` (as ``batch_sampler``) and ``collate_fn``. Every batch
    may carry ``batch["skipped"]`` (samples the dataset could not use): they are recorded in
    ``health`` here, in the main process, so counts are right with worker processes too.
    """

    def __init__(
        self,
        dataset,
        sampler: LengthGroupedBatchSampler,
        collate_fn: Callable,
        health=None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.health = health
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    @classmethod
    def build(
        cls,
        dataset,
        micro_batch_size: int,
        dp_size: int = 1,
        dp_rank: int = 0,
        seed: int = 0,
        grouping: Grouping = "modality_length",
        pad_id: int = 0,
        fixed_length: int | None = None,
        health=None,
        num_workers: int = 0,
    ) -> "ResumableLoader":
        """The usual wiring: a `LlavaDataset`-like ``dataset`` (``lengths()``, ``has_image()``),
        its sampler for this data-parallel rank, and the padding collator."""
        from cumo_megatron.data.batching import Collator

        sampler = LengthGroupedBatchSampler(
            dataset.lengths(), dataset.has_image(), micro_batch_size, dp_size, dp_rank, seed, grouping
        )
        return cls(dataset, sampler, Collator(pad_id=pad_id, fixed_length=fixed_length), health, num_workers)

    def _generator(self) -> torch.Generator:
        """The DataLoader's own generator for the current epoch (see the module docstring)."""
        entropy = [self.sampler.seed, self.sampler.epoch, self.sampler.dp_rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
        return torch.Generator().manual_seed(seed)

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=self._generator(),
        )

    def epoch(self) -> Iterator[dict]:
        """The rest of the current epoch; when it ends, the sampler moves to the next epoch."""
        if self.sampler.position < len(self.sampler):
            for batch in self._loader():
                for skipped in batch.get("skipped", ()):
                    if getattr(skipped, "fatal", False):  # policy fail, met in a worker process
                        from cumo_megatron.data.dataset import fail_error

                        raise fail_error(skipped.problem)
                if self.health is not None:
                    for skipped in batch.get("skipped", ()):
                        self.health.record(skipped)
                    for problem in batch.get("truncated", ()):
                        self.health.record_truncated(problem)
                # Count before yielding: a checkpoint taken after using this batch resumes after it.
                self.sampler.position += 1
                yield batch
        self.sampler.epoch += 1
        self.sampler.position = 0

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch (a training loop stops on its own count)."""
        while True:
            yield from self.epoch()

    def state_dict(self) -> dict:
        """Sampler position and health counts, for the training checkpoint."""
        out = {"sampler": self.sampler.state_dict()}
        if self.health is not None:
            out["health"] = self.health.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        self.sampler.load_state_dict(state["sampler"])
        if self.health is not None and "health" in state:
            self.health.load_state_dict(state["health"])
