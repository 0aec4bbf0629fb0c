"""Validation during training: the held-out loss over ``data.eval_files`` (issue 14).

`Validator.run` evaluates the *whole* held-out set every ``train.eval_interval`` steps and after the
last one (`due`), forward-only through megatron's pipeline schedule (so every TP/PP/EP/DP layout
works as in training), with dropout off, and leaves the training run exactly as it found it:

- its own dataset and loader over ``data.eval_files`` (the training data's template, tokenizer,
  image processing and collator: `heldout_dataset`), so the training data iterator and its
  checkpointed position are untouched;
- every random stream (python, numpy, torch CPU/CUDA, megatron's tracked model-parallel streams) is
  saved before and restored after, and each module's train/eval flag is put back as it was;
- router statistics it causes are drained per micro-batch, so the next training step logs its own.

Sharding (`eval_plan`): image records, then text-only records, each sorted longest first (less
padding), are cut into megabatches of ``micro_batch_size x dp`` and rank ``r`` takes slice
``[r * mbs, (r + 1) * mbs)`` of each (the layout of `data.sampler`, without the shuffle). The last
megabatch of each modality is filled with all-padding rows, so every rank runs the same number of
micro-batches (collectives stay in step) and each record counts exactly once. A megabatch holds one
modality, so its micro-batches run the vision tower on every rank or on none (its experts'
all-to-all under expert parallelism needs every rank); a rank whose slice of an image megabatch is
empty gets a *stand-in* row instead, an image record with no loss and not counted, in a micro-batch
that counts for nothing.

Figures (the same on every rank):

- ``lm_loss``: the token-weighted mean of the per-token LM loss over every supervised token of the
  held-out set, all ranks together (sum of token losses / number of supervised tokens);
- ``<module>_balance`` / ``<module>_z_loss``: each MoE module's aux losses as the training rows log
  them (the share-weighted sum over the module's routers for one micro-batch), averaged over the
  micro-batches that hold at least one record, on all data-parallel ranks;
- ``loss``: ``lm_loss`` plus the aux losses times their coefficients (the training objective's form);
- ``tokens`` (supervised tokens), ``records`` (evaluated), ``skipped`` (bad records, ``data.policy``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from cumo_megatron.data.dataset import Sample, Skipped
from cumo_megatron.data.records import Problem

__all__ = ["PADDING", "STAND_IN", "heldout_dataset", "eval_plan", "due", "Validator"]

SPLIT = "validation"
PADDING = -1  # plan entry of an all-padding row (fills the last megabatch)
STAND_IN = -2  # index of a stand-in row; the plan entry of a stand-in for record i is STAND_IN - i
_PADDING_ROW = Skipped(PADDING, Problem("padding", "<validation padding>", None, None, "all-padding row"))


def heldout_dataset(cfg, files: Sequence[str], image_folder: Optional[str] = None, tokenizer=None):
    """A `LlavaDataset` of ``files`` prepared exactly as the run ``cfg`` prepares its training data.

    ``tokenizer`` defaults to loading ``cfg.data.tokenizer`` (the trainer passes its own).
    """
    from cumo_megatron.data.dataset import dataset_for_run
    from cumo_megatron.data.tokenizer import load_tokenizer

    if tokenizer is None:
        if cfg.data.tokenizer is None:
            raise ValueError("the run's config has no data.tokenizer; the held-out text cannot be tokenised")
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    return dataset_for_run(cfg, files, tokenizer, image_folder)


def eval_plan(lengths: Sequence[int], has_image: Sequence[bool], micro_batch_size: int, dp_size: int,
              dp_rank: int) -> list[list[int]]:
    """This rank's micro-batches of dataset indices (see the module docstring).

    Entries: a record's index, `PADDING` (an all-padding row), or ``STAND_IN - i`` (a stand-in for
    image record ``i``, only in a micro-batch without records). Over all ranks every index appears
    exactly once as itself, and every rank gets the same number of micro-batches.
    """
    if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad layout: micro_batch_size={micro_batch_size} dp_size={dp_size} dp_rank={dp_rank}")
    size = micro_batch_size * dp_size
    lo = dp_rank * micro_batch_size
    plan = []
    for images in (True, False):
        # Stable sort: equal lengths keep dataset order, so the plan is a pure function of its inputs.
        order = sorted((i for i in range(len(lengths)) if bool(has_image[i]) == images), key=lambda i: -int(lengths[i]))
        for start in range(0, len(order), size):
            mine = order[start:start + size][lo:lo + micro_batch_size]
            if images and not mine:
                mine = [STAND_IN - order[start]]
            plan.append(mine + [PADDING] * (micro_batch_size - len(mine)))
    return plan


def due(iteration: int, total_steps: int, eval_interval: int) -> bool:
    """Whether validation runs after step ``iteration``: every ``eval_interval`` steps and at the end."""
    return iteration == total_steps or (eval_interval > 0 and iteration % eval_interval == 0)


class _WithPadding(torch.utils.data.Dataset):
    """``dataset`` with the plan's `PADDING` and stand-in rows (picklable for DataLoader workers)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index == PADDING:
            return _PADDING_ROW
        if index <= STAND_IN:
            item = self.dataset[STAND_IN - index]
            if isinstance(item, Skipped):  # its image does not load: no vision forward on this rank
                return _PADDING_ROW
            return replace(item, index=STAND_IN, loss_mask=torch.zeros_like(item.loss_mask), truncated=None)
        return self.dataset[index]


@dataclass
class _CountingCollate:
    """The training collator, plus how many rows are records and which real records were skipped."""

    collate: Callable

    def __call__(self, items):
        batch = self.collate(items)
        batch["records"] = sum(isinstance(it, Sample) and it.index >= 0 for it in items)
        batch["skipped"] = [it for it in batch["skipped"] if it.index != PADDING]
        return batch


@dataclass
class _Totals:
    """Sums of one rank's part of a validation pass."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    records: int = 0
    skipped: int = 0
    batches: int = 0  # micro-batches holding at least one record (the aux losses' denominator)
    modules: dict = field(default_factory=dict)  # module -> {"balance": sum over micro-batches, "z_loss": ...}

    def add_moe(self, stats: dict) -> None:
        """Add one micro-batch's module aux losses (`collect_moe_stats` of one forward)."""
        for name, values in stats["modules"].items():
            entry = self.modules.setdefault(name, {"balance": 0.0, "z_loss": 0.0})
            for key in entry:
                entry[key] += values[key]


def _module_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _rng_snapshot() -> dict:
    """Every random stream, copied (the tracker hands out references to its live states)."""
    from cumo_megatron.training.checkpointing import rng_state

    state = rng_state()
    state["tracker"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state["tracker"].items()}
    return state


class Validator:
    """The held-out evaluation of one trainer (see the module docstring).

    ``model`` is the DDP-wrapped model chunk the schedule runs; ``collate`` the training loader's
    collator (its padding rules: fixed length under PP, sequence multiples for SP/FP8).
    """

    def __init__(self, cfg, dataset, model, collate: Callable, dp_size: int, dp_rank: int,
                 num_microbatches: int, fixed_length: Optional[int], device: torch.device):
        self.cfg = cfg
        self.dataset = dataset
        self.model = model
        self.collate = _CountingCollate(collate)
        self.plan = eval_plan(dataset.lengths(), dataset.has_image(), cfg.train.micro_batch_size, dp_size, dp_rank)
        # Micro-batches per schedule call: a training step's worth (known to fit in memory).
        self.chunk = max(1, num_microbatches)
        self.fixed_length = fixed_length
        self.device = device

    @classmethod
    def for_trainer(cls, trainer) -> Optional["Validator"]:
        """The trainer's validator, or None when ``data.eval_files`` is empty."""
        cfg = trainer.cfg
        if not cfg.data.eval_files:
            return None
        loader = trainer.loader
        dataset = heldout_dataset(cfg, cfg.data.eval_files, tokenizer=loader.dataset.tokenizer)
        return cls(cfg, dataset, trainer.ddp, loader.collate_fn, trainer.dp_size, trainer.dp_rank,
                   trainer.num_microbatches, trainer.fixed_length, trainer.placement.device)

    def _batches(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        # An own generator: a DataLoader iterator otherwise draws its base seed from torch's default one.
        loader = DataLoader(_WithPadding(self.dataset), batch_sampler=self.plan, collate_fn=self.collate,
                            num_workers=self.cfg.data.num_workers, generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def run(self, step: int) -> dict:
        """Evaluate the held-out set now (collective on every rank); the metrics row of ``step``."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from cumo_megatron.models.parallelize import params_gathered
        from cumo_megatron.training.checkpointing import set_rng_state

        start = time.perf_counter()
        rng = _rng_snapshot()
        modes = _module_modes(self.model)
        # megatron's schedule sets the MoE aux-loss scale in place after each forward (language MoE).
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        scale = scale.clone() if isinstance(scale, torch.Tensor) else scale
        self.model.eval()
        try:
            with torch.no_grad(), params_gathered(self.model):
                totals = self._evaluate()
        finally:
            for module, training in modes:
                module.training = training
            MoEAuxLossAutoScaler.main_loss_backward_scale = scale
            set_rng_state(rng)
        row = self._reduce(totals)
        return {"step": step, "split": SPLIT, **row, "time_s": time.perf_counter() - start}

    def _evaluate(self) -> _Totals:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from cumo_megatron.moe.stats import collect_moe_stats

        totals = _Totals()
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        collect_moe_stats(self.model)  # start from clean router statistics
        batches = self._batches()
        for first in range(0, len(self.plan), self.chunk):
            chunk = [next(batches) for _ in range(min(self.chunk, len(self.plan) - first))]
            for batch in chunk:
                totals.records += batch["records"]
                totals.skipped += len(batch["skipped"])
                totals.batches += batch["records"] > 0
            reports = get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, totals),
                data_iterator=iter(chunk),
                model=[self.model],
                num_microbatches=len(chunk),
                seq_length=self.fixed_length or max(mb["input_ids"].shape[1] for mb in chunk),
                micro_batch_size=self.cfg.train.micro_batch_size,
                forward_only=True,
            )
            if last_stage:
                for report in reports:
                    totals.loss_sum += float(report["lm_loss"][0])
                    totals.tokens += float(report["lm_loss"][1])
        return totals

    def _forward_step(self, totals: _Totals, data_iterator, model):
        """megatron ``forward_step_func``: one micro-batch, then its router statistics drained."""
        from cumo_megatron.models.parallelize import move_batch
        from cumo_megatron.moe.stats import collect_moe_stats
        from cumo_megatron.training.step import masked_token_mean_loss

        batch = move_batch(next(data_iterator), self.device)
        output = model(input_ids=batch["input_ids"], images=batch.get("images"), labels=batch["labels"],
                       padding_mask=batch.get("padding_mask"))
        # This stage's routers ran this micro-batch only: its aux losses, per micro-batch as training
        # logs them. An all-padding micro-batch (the filled last megabatch) does not count.
        stats = collect_moe_stats(model)
        if batch["records"]:
            totals.add_moe(stats)
        return output, partial(masked_token_mean_loss, batch["loss_mask"])

    def _reduce(self, totals: _Totals) -> dict:
        """Combine the pipeline stages (LM loss on the last, routers anywhere), then the DP ranks."""
        from megatron.core import parallel_state

        from cumo_megatron.models.parallelize import comm_device

        pp_group = parallel_state.get_pipeline_model_parallel_group()
        parts = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, {"loss_sum": totals.loss_sum, "tokens": totals.tokens,
                                       "modules": totals.modules}, group=pp_group)
        modules: dict[str, dict[str, float]] = {}
        for part in parts:
            for name, values in part["modules"].items():
                entry = modules.setdefault(name, {"balance": 0.0, "z_loss": 0.0})
                for key in entry:
                    entry[key] += values[key]
        names = sorted(modules)  # the same on every DP replica (same model)
        flat = [sum(p["loss_sum"] for p in parts), sum(p["tokens"] for p in parts),
                float(totals.records), float(totals.skipped), float(totals.batches)]
        flat += [modules[m][k] for m in names for k in ("balance", "z_loss")]
        vec = torch.tensor(flat, dtype=torch.float64, device=comm_device())
        dist.all_reduce(vec, group=parallel_state.get_data_parallel_group())
        values = vec.tolist()
        loss_sum, tokens, records, skipped, batches = values[:5]
        row = {"lm_loss": loss_sum / tokens if tokens else math.nan}
        coeffs = {"vision": self.cfg.model.vision.moe, "connector": self.cfg.model.connector.moe,
                  "language": self.cfg.model.language.moe}
        aux_total = 0.0
        for i, name in enumerate(names):
            balance, z_loss = (v / batches if batches else math.nan for v in values[5 + 2 * i:7 + 2 * i])
            row[f"{name}_balance"], row[f"{name}_z_loss"] = balance, z_loss
            moe = coeffs.get(name)
            if moe is not None:
                aux_total += moe.balance_coeff * balance + moe.z_loss_coeff * z_loss
        row["loss"] = row["lm_loss"] + aux_total
        row.update(tokens=int(tokens), records=int(records), skipped=int(skipped))
        return row
