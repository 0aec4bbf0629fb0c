"""A tiny end-to-end CuMo run on megatron-core: build, train a few steps, report.

    python -m cumo_megatron.demo [--config FILE.yaml] [dotted.overrides=...]
    torchrun --nproc_per_node 2 -m cumo_megatron.demo parallel.tp=2

It builds the model from the config (the built-in tiny CuMo by default: CLIP-MoE, MoE connector,
LLaMA-style LLM), trains it with megatron's DDP, distributed optimizer and schedules on a fixed
synthetic image-text batch, and writes ``<out>/config.yaml`` (the resolved config) and
``<out>/metrics.jsonl`` (one JSON line per step: LM loss, MoE aux losses, expert loads). The
three-stage training pipeline with real data arrives with the training issue.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cumo_megatron.config.loader import parse_cli, save_config
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ModelConfig, ParallelConfig, check_parallel_layout


@dataclass
class DemoConfig:
    """Settings of the demo run (a subset of what the trainer will take)."""

    model: ModelConfig = field(default_factory=lambda: tiny(moe=True))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 30
    lr: float = 3e-3
    micro_batch_size: int = 2
    num_microbatches: int = 2
    seq_length: int = 24
    seed: int = 1234
    out: str = "runs/demo"

    def validate(self) -> None:
        """Layout checks before anything is allocated."""
        check_parallel_layout(self.model, self.parallel)


def synthetic_microbatches(cfg: DemoConfig, count: int) -> list[dict]:
    """Image-text micro-batches where each caption token depends on the image's colour.

    Enough structure for the loss to fall, none of the data pipeline's machinery.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    model, tokens = cfg.model, cfg.model.vision.tokens_per_image
    vocab, seq, size = model.language.vocab_size, cfg.seq_length, model.vision.image_size
    batches = []
    for _ in range(count):
        colour = torch.randint(0, 3, (cfg.micro_batch_size,), generator=gen)
        images = torch.zeros(cfg.micro_batch_size, 3, size, size)
        images[torch.arange(cfg.micro_batch_size), colour] = 1.0
        ids = torch.randint(3, vocab, (cfg.micro_batch_size, seq), generator=gen)
        ids[:, 1:1 + tokens] = model.image_token_id
        ids[:, 1 + tokens:] = (10 + colour).unsqueeze(1)  # the "caption": a colour word, repeated
        labels = torch.roll(ids, -1, dims=1).clamp(min=0)
        loss_mask = torch.zeros(cfg.micro_batch_size, seq)
        loss_mask[:, tokens:-1] = 1.0
        batches.append(dict(input_ids=ids, images=images - 0.5, labels=labels, loss_mask=loss_mask))
    return batches


def run(cfg: DemoConfig) -> list[dict]:
    """Train for ``cfg.steps`` steps; return the metrics rows (rank 0 writes them)."""
    import cumo_megatron.platform as platform
    from megatron.core import parallel_state

    from cumo_megatron.models import parallelize
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.models.params import count_parameters
    from cumo_megatron.moe.stats import collect_moe_stats
    from cumo_megatron.training.optimizer import build_optimizer, current_loss_scale
    from cumo_megatron.training.step import forward_backward

    par = cfg.parallel
    platform.initialize(platform.ParallelSizes(tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp), seed=cfg.seed)
    rank0 = torch.distributed.get_rank() == 0
    out = Path(cfg.out)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    model = build_model(cfg.model, par)
    counts = count_parameters(model)
    placement = parallelize.placement_for(cfg.model)
    ddp = parallelize.wrap_ddp(parallelize.place(model, placement), use_distributed_optimizer=True)
    optimizer = build_optimizer([ddp], lr=cfg.lr, precision=cfg.model.precision, use_distributed_optimizer=True)
    dp = parallel_state.get_data_parallel_world_size()
    data = synthetic_microbatches(cfg, cfg.num_microbatches * dp)
    mine = data[parallel_state.get_data_parallel_rank()::dp]
    rows = []
    # One rank that sees the loss reports: the last pipeline stage's first TP/DP rank.
    reporter = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    if rank0:
        print(f"parameters (this rank): total {counts.total.total:,}, active {counts.total.active:,}", file=sys.stderr)
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss_scale = current_loss_scale(optimizer)
        loss = forward_backward(ddp, mine, cfg.num_microbatches, cfg.seq_length, cfg.micro_batch_size,
                                device=placement.device)
        ok, grad_norm, _ = optimizer.step()  # not ok: an fp16 overflow, the update was skipped
        moe = collect_moe_stats(model, num_microbatches=cfg.num_microbatches)
        row = {"step": step, "lm_loss": loss, "grad_norm": grad_norm, "skipped": not ok,
               "loss_scale": loss_scale, "step_s": time.perf_counter() - start}
        row.update({f"{name}_balance": v["balance"] for name, v in moe["modules"].items()})
        row.update({f"{name}_z_loss": v["z_loss"] for name, v in moe["modules"].items()})
        row["tokens_per_expert"] = moe["layers"]
        rows.append(row)
        if reporter:
            aux = "  ".join(
                f"{name} bal {v['balance']:.3f} z {v['z_loss']:.3f}" for name, v in moe["modules"].items()
            )
            norm = "skipped (fp16 overflow)" if grad_norm is None else f"grad_norm {grad_norm:.3f}"
            print(f"step {step:3d}  lm_loss {loss:.4f}  {norm}  {aux}", file=sys.stderr)
    if reporter:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    platform.destroy()
    return rows


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    run(parse_cli(DemoConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
