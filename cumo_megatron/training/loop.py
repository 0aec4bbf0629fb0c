"""The CuMo trainer: megatron-core DDP, optimizer, scheduler and schedules around `CuMoModel`.

One `Trainer` runs one stage (`train.stage`) of one experiment:

1. bring up the process groups (`platform.initialize`), build this rank's pipeline stage of the
   model, load initial weights (``train.load``, resharded; a dense checkpoint into an MoE model is
   co-upcycled), freeze per stage (before DDP, so frozen parameters get no buffers and no state);
2. wrap in megatron DDP, build megatron's optimizer (Adam(W), optional distributed optimizer, grad
   clipping, fp32 main params for bf16) and `OptimizerParamScheduler` (linear warmup over
   ``warmup_fraction`` of the steps, cosine decay to ``min_lr``);
3. data: `LlavaDataset` + `ResumableLoader` sharded by the data-parallel rank; a step is
   ``global_batch_size / (micro_batch_size * dp)`` micro-batches through megatron's schedule;
   each micro-batch is padded to its longest sample, rounded up to `models.fp8.sequence_multiple`
   (or, under pipeline parallelism without variable sequence lengths, to ``data.max_length``);
   fusions and overlaps follow `performance.throughput_settings`;
4. resume from ``<train.save>/latest`` when it exists (model, optimizer, scheduler, data position,
   RNG: the continued run is bit-identical to an uninterrupted one);
5. per step: non-finite loss or gradient -> the update is skipped and counted; ``max_bad_steps``
   in a row stop the run (`TrainingDiverged`), the last good checkpoint stays ``latest``;
   metrics (JSONL, TensorBoard, console) from one reporting rank; checkpoints every
   ``save_interval`` steps and at the end, each also a model checkpoint the tools open
   (`checkpointing`), written while training goes on with ``train.async_save`` (`async_save`:
   polled every step, waited for before the next save, a divergence stop and the end; abandoned,
   ``latest`` unmoved, on any other error); how long each save blocked the loop goes to
   ``metrics.jsonl`` (``split: "checkpoint"``); the held-out loss over ``data.eval_files`` every
   ``eval_interval`` steps and at the end, before that step's checkpoint (`validation`).

Code outside the trainer acts at defined points of the run through `events.TrainingEvents`
(gradients ready, checkpoint written but not committed, checkpoint committed); the tests inject
their faults there (tests/training/faults.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from cumo_megatron.config.loader import ConfigError, save_config
from cumo_megatron.config.schema import ExperimentConfig, check_sequence_length
from cumo_megatron.errors import EXIT_DIVERGED, UserError
from cumo_megatron.models.parallelize import comm_device
from cumo_megatron.training import checkpointing, data_failures, performance, skipped_report, stages, validation
from cumo_megatron.training.async_save import AsyncCheckpointSaver, SaveTiming
from cumo_megatron.training.events import TrainingEvents
from cumo_megatron.training.lock import SaveDirLock
from cumo_megatron.training.metrics import MetricsWriter, model_flops_per_step, real_and_padded_tokens


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""

    label = "training stopped"
    exit_status = EXIT_DIVERGED


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


class Trainer:
    """Builds everything from an `ExperimentConfig` and trains (`train()`)."""

    def __init__(self, cfg: ExperimentConfig, events: Optional[TrainingEvents] = None):
        self.cfg = cfg
        self.events = events if events is not None else TrainingEvents()
        self.iteration = 0
        self.consumed_samples = 0
        self.bad_in_a_row = 0
        self.skipped_steps = 0  # non-finite loss or gradient (bad steps)
        self.overflow_steps = 0  # fp16 loss-scale overflows (skipped by the scaler)
        self._built = False
        self.save_lock: Optional[SaveDirLock] = None
        self.validation_rows: list[dict] = []  # on every rank (each gets the same figures)
        self.saver: Optional[AsyncCheckpointSaver] = None  # with train.async_save

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Process groups, model, stage freezing, DDP, optimizer, scheduler, data, resume."""
        import cumo_megatron.platform as platform
        from megatron.core import parallel_state

        from cumo_megatron.models import parallelize
        from cumo_megatron.models.cumo import build_model
        from cumo_megatron.models.params import hand_count
        from cumo_megatron.training.optimizer import LossScaling, build_optimizer

        cfg, train, par = self.cfg, self.cfg.train, self.cfg.parallel
        stages.check_stage_config(train.stage, cfg.model)
        platform.initialize(platform.ParallelSizes(tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp), seed=cfg.seed)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.out = Path(train.save)
        # Before anything is written: a second trainer on this directory stops here (`lock`).
        self.save_lock = SaveDirLock.acquire(self.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        per_step = train.micro_batch_size * self.dp_size
        if train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} is not divisible by "
                f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {self.dp_size}"
            )
        self.num_microbatches = train.global_batch_size // per_step
        self.resume_from = checkpointing.load_latest(self.out)

        self.model = build_model(cfg.model, par)
        self.load_report = None
        if train.load and self.resume_from is None:
            self.load_report = checkpointing.load_weights(self.model, train.load, cfg.model, par, seed=cfg.seed)
        # Conversion records (passthrough tensors, source configs) travel from checkpoint to
        # checkpoint; a resumed run finds them in the checkpoint it resumes from.
        self.provenance = self.resume_from or (Path(self.load_report["path"]) if self.load_report else None)
        self.freeze_counts = stages.apply_stage(self.model, train.stage)
        self.throughput = performance.machine_throughput_settings(cfg)
        self.saver = AsyncCheckpointSaver() if self.throughput.async_save else None
        # Read by megatron's p2p communication only (it then sends each tensor's shape first); set
        # here rather than in the TransformerConfig, whose check refuses it for any config with
        # the all-gather dispatcher, the default of a dense LLM that has no dispatcher at all
        # (`throughput_settings` refuses the MoE case that matters).
        self.model.config.variable_seq_lengths = self.throughput.variable_seq_lengths
        # Device, training dtype and TP-replica rules: `models.parallelize` decides them all.
        self.placement = parallelize.placement_for(cfg.model)
        self.ddp = parallelize.wrap_ddp(
            parallelize.place(self.model, self.placement),
            use_distributed_optimizer=train.distributed_optimizer,
            overlap_grad_reduce=self.throughput.overlap_grad_reduce,
            overlap_param_gather=self.throughput.overlap_param_gather,
            bucket_size=train.ddp_bucket_size,
        )
        self.optimizer = build_optimizer(
            [self.ddp],
            lr=train.lr,
            weight_decay=train.weight_decay,
            clip_grad=train.clip_grad,
            use_distributed_optimizer=train.distributed_optimizer,
            overlap_param_gather=self.throughput.overlap_param_gather,
            precision=cfg.model.precision,
            betas=(train.adam_beta1, train.adam_beta2),
            min_lr=train.min_lr,
            loss_scaling=LossScaling(
                loss_scale=train.loss_scale, initial=train.initial_loss_scale, window=train.loss_scale_window,
                hysteresis=train.loss_scale_hysteresis, minimum=train.min_loss_scale,
            ),
        )
        self.loader = self._build_loader()
        self.total_steps = self._total_steps()
        self.scheduler = self._build_scheduler()
        if self.resume_from is not None:
            state = checkpointing.load_checkpoint(
                self.resume_from, self.model, self.optimizer, self.scheduler, self.loader
            )
            self.iteration = int(state["iteration"])
            self.consumed_samples = int(state["consumed_samples"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
            self.overflow_steps = int(state.get("overflow_steps", 0))
        # Taken once the weights are final: a resumed run loads its checkpoint only now.
        self.frozen_fingerprint = stages.frozen_fingerprint(self.model) or None
        self.reporter = (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and self.dp_rank == 0
        )
        self.metrics = MetricsWriter(self.out, enabled=self.reporter, resume_step=self.iteration)
        self.validator = validation.Validator.for_trainer(self)  # None without data.eval_files
        self.param_counts = hand_count(cfg.model)
        self._built = True
        if self.rank == 0:
            where = f"resumed from {self.resume_from}" if self.resume_from else "fresh start"
            loaded = f", weights from {self.load_report['path']}" if self.load_report else ""
            upcycled = (
                f" (upcycled {', '.join(self.load_report['upcycled'])})"
                if self.load_report and self.load_report["upcycled"] else ""
            )
            print(
                f"stage {train.stage}: {self.total_steps} steps x {self.num_microbatches} micro-batches of "
                f"{train.micro_batch_size} on {self.dp_size} data-parallel ranks; {where}{loaded}{upcycled}; "
                f"trainable {self.freeze_counts['trainable']:,} frozen {self.freeze_counts['frozen']:,} (rank 0)",
                flush=True,
            )
        return self

    def _build_loader(self):
        from cumo_megatron.data.batching import Collator
        from cumo_megatron.data.dataset import DataHealth, dataset_for_run
        from cumo_megatron.data.sampler import LengthGroupedBatchSampler, ResumableLoader
        from cumo_megatron.data.tokenizer import load_tokenizer
        from cumo_megatron.models.fp8 import sequence_multiple

        cfg, data = self.cfg, self.cfg.data
        if not data.files:
            raise ConfigError("data.files is empty: give at least one LLaVA JSON/JSONL file")
        if data.tokenizer is None:
            raise ConfigError("data.tokenizer is not set: give a tokenizer.model file or a tokenizer directory")
        tokenizer = load_tokenizer(data.tokenizer)
        if tokenizer.vocab_size > cfg.model.language.vocab_size:
            raise ConfigError(
                f"the tokenizer {data.tokenizer} has {tokenizer.vocab_size} ids but "
                f"model.language.vocab_size={cfg.model.language.vocab_size}"
            )
        dataset = dataset_for_run(cfg, data.files, tokenizer)
        # Pipeline stages exchange fixed-length activations unless megatron sends shapes first.
        fixed = self.cfg.parallel.pp > 1 and not self.throughput.variable_seq_lengths
        self.fixed_length = data.max_length if fixed else None
        check_sequence_length(cfg.model, cfg.parallel, data)  # also for configs built in code
        sampler = LengthGroupedBatchSampler(
            dataset.lengths(), dataset.has_image(), self.cfg.train.micro_batch_size,
            self.dp_size, self.dp_rank, self.cfg.seed, data.grouping,
        )
        # Sequence parallelism splits the sequence over TP ranks, FP8 GEMMs need 16/32 tokens a rank.
        collator = Collator(pad_id=tokenizer.pad_id, fixed_length=self.fixed_length,
                            pad_to_multiple_of=sequence_multiple(cfg.model, cfg.parallel))
        return ResumableLoader(dataset, sampler, collator, DataHealth(), data.num_workers)

    def _total_steps(self) -> int:
        train = self.cfg.train
        if train.train_steps is not None:
            return int(train.train_steps)
        steps = train.epochs * len(self.loader.sampler) // self.num_microbatches
        if steps < 1:
            raise ConfigError(
                f"one epoch has {len(self.loader.sampler)} micro-batches per rank, fewer than one step's "
                f"{self.num_microbatches}; lower train.global_batch_size or set train.train_steps"
            )
        return steps

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        train = self.cfg.train
        warmup = int(math.ceil(train.warmup_fraction * self.total_steps))
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=train.lr,
            min_lr=train.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(self.total_steps, warmup + 1),
            lr_decay_style="cosine",
            start_wd=train.weight_decay,
            end_wd=train.weight_decay,
            wd_incr_steps=max(self.total_steps, 1),
            wd_incr_style="constant",
        )

    # ------------------------------------------------------------------ one step
    def _grads_finite(self) -> bool:
        """Local check of every gradient buffer (DDP's ``main_grad`` storage)."""
        for buffer in list(self.ddp.buffers) + list(self.ddp.expert_parallel_buffers):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                return False
        return True

    def train_step(self, microbatches: list[dict]) -> dict:
        """One optimizer step over ``microbatches``; returns this rank's raw step results.

        A non-finite loss, aux loss or gradient skips the update as a *bad* step (``max_bad_steps``
        in a row stop the run). Under fp16 an overflowing gradient is the dynamic loss scaler's
        business: megatron's optimizer skips that update and lowers the scale; it is counted as an
        *overflow* step (normal while the scale settles), not as a bad one.
        """
        from cumo_megatron.moe.stats import collect_moe_stats
        from cumo_megatron.training.optimizer import current_loss_scale
        from cumo_megatron.training.step import forward_backward

        train = self.cfg.train
        fp16 = self.cfg.model.precision == "fp16"
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_scale = current_loss_scale(self.optimizer)
        seq_length = self.fixed_length or max(mb["input_ids"].shape[1] for mb in microbatches)
        lm_loss = forward_backward(
            self.ddp, microbatches, self.num_microbatches, seq_length, train.micro_batch_size,
            device=self.placement.device,
        )
        moe = collect_moe_stats(self.model, self.num_microbatches)
        self.events.gradients_ready(self, self.iteration + 1)
        local_bad = (lm_loss is not None and not math.isfinite(lm_loss)) or any(
            not math.isfinite(v) for module in moe["modules"].values() for v in module.values()
        ) or (not fp16 and not self._grads_finite())
        flag = torch.tensor([1.0 if local_bad else 0.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        grad_norm, lr = float("nan"), self.optimizer.param_groups[0]["lr"]
        overflow = False
        if flag.item() == 0.0:
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if ok:
                self.scheduler.step(increment=1)
                self.bad_in_a_row = 0
            else:  # fp16: the loss scaler found inf/nan, skipped the update and lowered the scale
                overflow = True
                self.overflow_steps += 1
        else:
            self.ddp.zero_grad_buffer()
            self.bad_in_a_row += 1
            self.skipped_steps += 1
        return {"lm_loss": lm_loss, "moe": moe, "grad_norm": grad_norm, "lr": lr,
                "skipped": bool(flag.item()) or overflow, "overflow": overflow, "loss_scale": loss_scale}

    def _reduce_report(self, result: dict, tokens: int, images: int, tokens_padded: int = 0) -> dict:
        """Combine per-rank results into the reporting rank's row (collective on every rank)."""
        from megatron.core import parallel_state

        # MoE stats live on the stage that holds the routers: gather over the pipeline group.
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        gathered = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(gathered, result["moe"], group=pp_group)
        modules: dict[str, dict[str, float]] = {}
        layers: dict[str, list[int]] = {}
        for part in gathered:
            for name, values in part["modules"].items():
                entry = modules.setdefault(name, {"balance": 0.0, "z_loss": 0.0})
                for key in entry:
                    entry[key] += values[key]
            layers.update(part["layers"])
        # Average losses / sum counts over data-parallel replicas (same keys on each: same model).
        module_keys = sorted(modules)
        layer_keys = sorted(layers)
        lm = result["lm_loss"] if result["lm_loss"] is not None else 0.0
        flat = [lm, float(tokens), float(images), float(tokens_padded)]
        flat += [modules[m][k] for m in module_keys for k in ("balance", "z_loss")]
        flat += [float(c) for key in layer_keys for c in layers[key]]
        vec = torch.tensor(flat, dtype=torch.float64, device=comm_device())
        dist.all_reduce(vec, group=_dp_group())
        values = vec.tolist()
        dp = self.dp_size
        row = {"lm_loss": values[0] / dp if result["lm_loss"] is not None else None}
        tokens_all, images_all = values[1], values[2]
        pos = 4
        total_aux = 0.0
        coeffs = {"vision": self.cfg.model.vision.moe, "connector": self.cfg.model.connector.moe,
                  "language": self.cfg.model.language.moe}
        for m in module_keys:
            balance, z = values[pos] / dp, values[pos + 1] / dp
            pos += 2
            row[f"{m}_balance"] = balance
            row[f"{m}_z_loss"] = z
            moe_cfg = coeffs.get(m)
            if moe_cfg is not None:
                total_aux += moe_cfg.balance_coeff * balance + moe_cfg.z_loss_coeff * z
        expert_load = {}
        for key in layer_keys:
            n = len(layers[key])
            expert_load[key] = [int(round(v)) for v in values[pos:pos + n]]
            pos += n
        row["loss"] = row["lm_loss"] + total_aux if row["lm_loss"] is not None else None
        row["expert_load"] = expert_load
        row["tokens"] = int(tokens_all)  # real tokens (no padding): what tokens/s and TFLOP/s count
        row["tokens_padded"] = int(values[3])  # sequence positions processed, padding included
        row["images"] = int(images_all)
        return row

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        """Train to ``total_steps``; return the metrics rows (on the reporting rank; [] elsewhere)."""
        if not self._built:
            self.setup()
        train = self.cfg.train
        rows: list[dict] = []
        data_iter = iter(self.loader)
        try:
            while self.iteration < self.total_steps:
                start = time.perf_counter()
                microbatches = data_failures.next_microbatches(data_iter, self.num_microbatches)
                tokens, tokens_padded = real_and_padded_tokens(microbatches)
                images = sum(0 if mb["images"] is None else int(mb["images"].shape[0]) for mb in microbatches)
                result = self.train_step(microbatches)
                self.iteration += 1
                self.consumed_samples += train.global_batch_size
                if self.frozen_fingerprint is not None:
                    self._check_frozen()  # once per run: a frozen weight must never move
                    self.frozen_fingerprint = None
                row = self._reduce_report(result, tokens, images, tokens_padded)
                elapsed = time.perf_counter() - start
                flops = model_flops_per_step(self.param_counts, self.cfg.model, train.stage,
                                             row["tokens"], row["images"])
                row = {
                    "step": self.iteration,
                    "loss": row.pop("loss"),
                    "lm_loss": row.pop("lm_loss"),
                    **row,
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "skipped": result["skipped"],
                    "bad_steps": self.bad_in_a_row,
                    "skipped_total": self.skipped_steps,
                    "overflow": result["overflow"],
                    "overflow_total": self.overflow_steps,
                    "loss_scale": result["loss_scale"],
                    "consumed_samples": self.consumed_samples,
                    "step_time_s": elapsed,
                    "tokens_per_s": row["tokens"] / elapsed,
                    "tflops": flops / elapsed / 1e12,
                    "tflops_per_rank": flops / elapsed / 1e12 / self.world,
                }
                if self.loader.health is not None and self.loader.health.events:
                    row["data_skipped_events"] = self.loader.health.events
                if self.reporter:
                    rows.append(row)
                    self.metrics.write(row, console=self.iteration % max(train.log_interval, 1) == 0)
                if self.saver is not None:
                    self.saver.poll()  # commits a save in flight once every rank's writer is done
                if self.bad_in_a_row >= train.max_bad_steps:
                    if self.saver is not None:
                        self.saver.wait()  # the message names the newest complete checkpoint
                    last = checkpointing.read_latest(self.out)
                    raise TrainingDiverged(
                        f"{self.bad_in_a_row} consecutive steps (up to step {self.iteration}) had a non-finite loss "
                        f"or gradient (train.max_bad_steps={train.max_bad_steps}); stopping. The last good "
                        f"checkpoint is {last or 'none (no checkpoint was written yet)'}: lower train.lr, check "
                        "the data, or raise train.max_bad_steps"
                    )
                # Before the checkpoint: a run resumed from it has already written this validation.
                # A save in flight goes on meanwhile: validation evaluates the live model and
                # reads no checkpoint.
                if self.validator is not None and validation.due(self.iteration, self.total_steps,
                                                                 train.eval_interval):
                    self.validation_rows.append(self.validator.run(self.iteration))
                    self.metrics.write(self.validation_rows[-1])
                due = (train.save_interval and self.iteration % train.save_interval == 0) or (
                    self.iteration == self.total_steps
                )
                # Never checkpoint in the middle of a run of bad steps: `latest` stays the last
                # checkpoint written after a good update.
                if due and self.bad_in_a_row == 0:
                    self.save()
            if self.saver is not None:
                self.saver.wait()  # the last checkpoint is committed before the run reports success
            self._write_skipped_report(final=True)
        except BaseException:
            # A failed run (or ^C) must not commit a checkpoint later, from a state nobody checked:
            # the write in flight is killed and `latest` keeps naming the last complete one.
            if self.saver is not None:
                self.saver.abandon()
            raise
        finally:
            self.metrics.close()
            self.save_lock.release()
        return rows

    def _check_frozen(self) -> None:
        changed = stages.verify_fingerprint(self.model, self.frozen_fingerprint)
        if changed:
            raise RuntimeError(
                f"stage {self.cfg.train.stage}: frozen parameters changed after a step: {changed[:5]}"
            )

    def save(self) -> Path:
        """Write the checkpoint of the current iteration (collective); with ``train.async_save``
        start writing it (`async_save`) and return the directory it will be committed to."""
        iteration = self.iteration  # an asynchronous save commits after later steps

        def before_commit(tmp: Path) -> None:
            self.events.checkpoint_written(self, iteration, tmp)

        if self.saver is not None:
            return self._save_async(before_commit)
        from cumo_megatron.models.parallelize import params_gathered

        start = time.perf_counter()
        # With overlapped parameter gathers the last step's updated weights reach the model only in
        # the next forward: gather them now (megatron-LM does the same around its saves).
        with params_gathered(self.ddp):
            path = checkpointing.commit_save(self._stage_checkpoint(asynchronous=False),
                                             self.cfg.train.keep_last, before_commit)
        blocked = time.perf_counter() - start
        self.provenance = path  # carries the same records; the older checkpoint may be pruned
        self._write_skipped_report()
        self._log_save(path, SaveTiming(self.iteration, blocked, blocked), asynchronous=False)
        self.events.checkpoint_committed(self, self.iteration, path)
        return path

    def _save_async(self, before_commit) -> Path:
        """Start the asynchronous save of the current iteration; its commit (and the events of
        `checkpoint_written` and `checkpoint_committed`) come later."""
        from cumo_megatron.models.parallelize import params_gathered

        keep_last = self.cfg.train.keep_last

        def committed(path: Path, timing: SaveTiming) -> None:
            self.provenance = path  # as after a synchronous save
            self._log_save(path, timing, asynchronous=True)
            self.events.checkpoint_committed(self, timing.iteration, path)

        # Staged and handed to the writer inside the gather: with CUDA megatron copies the tensors
        # to host memory as the writer starts; on CPU the fork is the snapshot.
        with params_gathered(self.ddp):
            path = self.saver.save(lambda: self._stage_checkpoint(asynchronous=True),
                                   lambda staged: checkpointing.commit_save(staged, keep_last, before_commit),
                                   committed)
        # This iteration's counts, as a synchronous save writes them (the report is not part of
        # the checkpoint).
        self._write_skipped_report()
        return path

    def _log_save(self, path: Path, timing: SaveTiming, asynchronous: bool) -> None:
        """The checkpoint's row in ``metrics.jsonl``: how long the loop waited for this save."""
        self.metrics.write({"step": timing.iteration, "split": "checkpoint", "checkpoint": path.name,
                            "async": asynchronous, "blocked_s": timing.blocked_s, "save_s": timing.total_s})

    def _write_skipped_report(self, final: bool = False) -> None:
        """``skipped_records.json`` merged over data-parallel ranks (collective); totals printed at the end."""
        report, path = skipped_report.write_report(
            self.out, self.loader.health, self.iteration, write=self.rank == 0, group=_dp_group()
        )
        if final and self.rank == 0:
            print(skipped_report.summary_line(report, path), flush=True)

    def _stage_checkpoint(self, asynchronous: bool) -> checkpointing.StagedSave:
        """Everything of this iteration's checkpoint under ``iter_N.tmp`` (`checkpointing.stage_save`)."""
        from cumo_megatron.checkpoint.assets import GenerationSettings, write_generation_assets

        data = self.cfg.data
        settings = GenerationSettings(template=data.template, aspect=data.aspect)
        return checkpointing.stage_save(
            self.out, self.iteration, self.model, self.optimizer, self.scheduler, self.loader,
            self._train_state(), model_cfg=self.cfg.model, provenance=self.provenance,
            # What generation needs: the tokenizer, template and aspect this run's data used.
            generation_assets=lambda path: write_generation_assets(path, data.tokenizer, settings),
            asynchronous=asynchronous,
        )

    def _train_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "overflow_steps": self.overflow_steps,
            "stage": self.cfg.train.stage,
        }


def run(cfg: ExperimentConfig, events: Optional[TrainingEvents] = None) -> list[dict]:
    """Train one stage as configured (``events``: see `Trainer`); tear the process groups down afterwards."""
    import cumo_megatron.platform as platform

    trainer = Trainer(cfg, events)
    try:
        return trainer.train()
    finally:
        if trainer.save_lock is not None:  # setup failed after taking it
            trainer.save_lock.release()
        platform.destroy()
