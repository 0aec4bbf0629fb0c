"""GPU smoke run: one command on one CUDA GPU proves the trainer computes, scales and checkpoints.

    python bench/gpu_smoke.py [--device cuda|cpu] [--steps N] [--shapes tiny,1b] [--out DIR]

A world of one (`cumo_megatron.platform.initialize`: nccl on CUDA, gloo on the CPU) runs:

1. **tiny vs fp32** (shape ``tiny``): `presets.tiny(moe=True)` in bf16 on the device against the
   same model in fp32 on the CPU, from the same initial weights on the same seeded synthetic
   micro-batches (`demo.synthetic_microbatches`). The fp32 run is a child process of this script
   (``--reference``, ``CUDA_VISIBLE_DEVICES=""``): in a process that sees CUDA megatron allocates
   on the GPU, so the CPU reference needs a process of its own. It writes the initial weights,
   which this process loads into its bf16 model. Check: the first `COMPARE_STEPS` LM losses agree
   within `FIRST_STEP_TOLERANCE` (step 1) and `TOLERANCE` (later steps), relative.
2. **save and reload** (tiny, bf16, on the device): 2 steps, `training.checkpointing.save_checkpoint`
   and an asynchronous save of the same state (`training.async_save`, as ``train.async_save``
   does it: staged, written by a forked process while steps 3-4 update the weights, committed
   after them), steps 3-4; a fresh model and optimizer `load_checkpoint` each save and run steps
   3-4 again, with deterministic algorithms on. Check: step 3 identical, step 4 within
   `RELOAD_TOLERANCE` (bit-exact is expected on one device and reported as ``bit_exact``; a lost
   optimizer state shows as ~0.5), for both saves.
3. **throughput** (shape ``1b``): a ~1B-parameter CuMo (`big_shape`: CLIP-B/16-like ViT with
   4-expert top-2 MoE MLPs, MoE connector, a 24-layer GQA LLM of width 1536), bf16, the local
   spec, and the Transformer Engine spec too when ``transformer_engine`` imports. Warm-up steps
   are not timed. Reported: tokens/s, model TFLOP/s (`training.metrics.model_flops_per_step`
   on `models.params.hand_count`: 6 x active parameters x tokens, attention scores not counted),
   MFU against the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, null for an unknown GPU), peak
   memory. Check: every loss finite. With ``--device cpu`` a scaled-down stand-in of the same
   structure runs instead (``"shape": "1b-cpu-standin"``), so the code path stays tested.

Human-readable lines go to stderr; the last line of stdout is one JSON object with every figure.
The exit status is 1 when a check fails. ``--device cpu --steps 3`` takes about half a minute
here (`tests/bench/test_gpu_smoke.py` runs it). On an H100 the default run is sized, by estimate
(not yet run on a GPU), to finish in a few minutes, imports and compiles included; a Transformer
Engine pass is skipped if it would end past `BUDGET_S`.

On an air-gapped GPU machine (the device machine: Python 3.12, PyTorch, no network, no
megatron-core), bring the project and a megatron-core wheel built for Python 3.12. Here::

    python -m pip download megatron-core==0.16.1 --no-deps --only-binary=:all: \\
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .wheels/

(``.wheels/`` is git-ignored: carry it with the working tree). There::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_smoke.py --out $OUT/smoke

``PYTHONPATH=$PWD`` rather than ``pip install -e .``: the package's requirements admit the image's
Python 3.12 and torch, but without a network pip cannot fetch the ones the image lacks, and the
smoke run needs none of them. megatron-core 0.16.1 needs only torch, numpy and
packaging, all on that image.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform as host_platform
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

STARTED = time.perf_counter()  # imports count in the wall time
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Relative tolerances of the bf16 run's LM losses against the fp32 run's: step 1, then steps 2-5.
# Step 1 sees only the forward's rounding (same weights up to their bf16 rounding): bf16 keeps 8
# significant bits (unit roundoff 2^-9 ~ 2e-3), and a loss averaged over many tokens averages its
# rounding errors. Later steps add the training's divergence: Adam's first updates are ~lr x
# sign(gradient), and bf16 gradients flip the sign of the near-zero ones. Measured on the CPU
# (bf16 vs fp32, this tiny model, lr 3e-3, 19 seeds): step 1 at most 1.7e-4; steps 2-5 at most
# 2.8e-2 (one seed; the next worst 8.4e-3, median of the per-seed maxima 2e-3); seed 1234: 1.5e-3.
FIRST_STEP_TOLERANCE = 2e-3
TOLERANCE = 5e-2
COMPARE_STEPS = 5
LR = 3e-3
SEED = 1234

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched in order against
# `torch.cuda.get_device_name()` (the PCIe and NVL H100s before the plain "H100" of the SXM part;
# "H200" also matches GH200, the same Hopper peak).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
# The whole run must end inside 8 minutes on the GPU machine: a further spec of the big shape (TE)
# is skipped when the time so far plus the last spec's duration would pass this.
BUDGET_S = 7 * 60


@dataclass
class RunShape:
    """The batch geometry and untimed warm-up of one shape (its model config travels beside it)."""

    name: str
    micro_batch_size: int
    num_microbatches: int
    seq_length: int
    warmup_steps: int


# --------------------------------------------------------------------------- CLI and environment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--reference`` is the child's internal mode)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=30, help="steps of each throughput shape (warm-up included)")
    parser.add_argument("--shapes", default="tiny,1b", help="comma-separated subset of tiny,1b")
    parser.add_argument("--out", default="runs/gpu_smoke", help="scratch folder (reference losses, checkpoint)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override the 1b shape's")
    parser.add_argument("--seq-length", type=int, default=None, help="override the 1b shape's")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(args.shapes) - {"tiny", "1b"}
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from tiny,1b")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (one warm-up, one timed)")
    return args


def hide_cuda_if_cpu(args: argparse.Namespace) -> None:
    """With ``--device cpu`` (or in the reference child) make CUDA invisible before torch looks.

    The package decides CPU vs GPU from `torch.cuda.is_available()`; hiding the GPU is the one
    switch that puts the whole stack (megatron allocations included) on the CPU.
    """
    if args.device == "cpu" or args.reference:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def log(message: str) -> None:
    """A human-readable progress line (stderr: stdout's last line is the JSON)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- shapes


def tiny_model(precision: str):
    """The built-in tiny CuMo (CLIP-MoE, MoE connector, LLaMA LLM) in ``precision``."""
    from cumo_megatron.config.presets import tiny

    model = tiny(moe=True)
    model.precision = precision
    return model


TINY = RunShape("tiny", micro_batch_size=2, num_microbatches=2, seq_length=24, warmup_steps=1)


def big_shape(on_gpu: bool, args: argparse.Namespace):
    """``(ModelConfig, RunShape)`` of the ~1B CuMo, or its CPU stand-in.

    GPU: CLIP-B/16-like ViT (width 768, 12 layers, 11 built, 224 px: 196 image tokens) with 4-expert
    top-2 MoE MLPs, MoE connector, LLaMA-style LLM (width 1536, 24 layers, 12 heads of 128, 4 KV
    heads, SwiGLU 4096, vocabulary 32000): 0.95B parameters, 0.84B active. 4 x 4 micro-batches of
    2048 tokens: ~35 GB on the GPU by estimate (weights, fp32 main copy and Adam ~17 GB, activations
    ~15 GB with SDPA attention, logits ~3 GB), inside an 80 GB H100.
    CPU: the same structure shrunk until a step takes a fraction of a second.
    """
    from cumo_megatron.config.schema import ConnectorConfig, LanguageConfig, ModelConfig, MoEConfig, VisionConfig

    if on_gpu:
        vision = VisionConfig(hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                              image_size=224, patch_size=16, moe=MoEConfig())
        language = LanguageConfig(vocab_size=32000, hidden_size=1536, num_layers=24, num_heads=12,
                                  num_kv_heads=4, ffn_hidden_size=4096, max_position_embeddings=4096)
        shape = RunShape("1b", micro_batch_size=4, num_microbatches=4, seq_length=2048, warmup_steps=3)
    else:
        vision = VisionConfig(hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=128,
                              image_size=56, patch_size=14, moe=MoEConfig())
        language = LanguageConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                                  num_kv_heads=2, ffn_hidden_size=256, max_position_embeddings=256)
        shape = RunShape("1b-cpu-standin", micro_batch_size=2, num_microbatches=2, seq_length=64,
                         warmup_steps=1)
    if args.micro_batch_size:
        shape.micro_batch_size = args.micro_batch_size
    if args.seq_length:
        shape.seq_length = args.seq_length
    model = ModelConfig(vision=vision, connector=ConnectorConfig(moe=MoEConfig()), language=language,
                        precision="bf16")
    return model, shape


def batches_for(model_cfg, shape: RunShape) -> list[dict]:
    """One step's seeded synthetic image-text micro-batches (the demo's), reused every step."""
    from cumo_megatron.demo import DemoConfig, synthetic_microbatches

    cfg = DemoConfig(model=model_cfg, micro_batch_size=shape.micro_batch_size, seq_length=shape.seq_length,
                     num_microbatches=shape.num_microbatches, seed=SEED)
    return synthetic_microbatches(cfg, shape.num_microbatches)


# --------------------------------------------------------------------------- model and steps


@dataclass
class Run:
    """A built model: the bare model (checkpointed), its DDP wrapper, optimizer and placement."""

    model: object
    ddp: object
    optimizer: object
    placement: object


def build_run(model_cfg, init_state: dict | None = None) -> Run:
    """Build, (optionally) load initial weights, place, wrap in DDP, make the optimizer.

    ``init_state`` (a state dict) is loaded before placement; ``load_state_dict`` casts it to the
    model's dtype, so fp32 weights seed a bf16 model with their bf16 roundings.
    """
    from cumo_megatron.models import parallelize
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.training.optimizer import build_optimizer

    model = build_model(model_cfg, ParallelConfig())
    if init_state is not None:
        model.load_state_dict(init_state)
    placement = parallelize.placement_for(model_cfg)
    ddp = parallelize.wrap_ddp(parallelize.place(model, placement), use_distributed_optimizer=True)
    optimizer = build_optimizer([ddp], lr=LR, use_distributed_optimizer=True, precision=model_cfg.precision)
    return Run(model, ddp, optimizer, placement)


def train_step(run: Run, batches: list[dict], shape: RunShape) -> float:
    """One optimizer step over ``batches``; returns the LM loss."""
    from cumo_megatron.moe.stats import collect_moe_stats
    from cumo_megatron.training.step import forward_backward

    run.ddp.zero_grad_buffer()
    run.optimizer.zero_grad()
    loss = forward_backward(run.ddp, batches, shape.num_microbatches, shape.seq_length, shape.micro_batch_size,
                            device=run.placement.device)
    run.optimizer.step()
    collect_moe_stats(run.model, num_microbatches=shape.num_microbatches)  # drains the routers' counters
    return loss


def train_steps(run: Run, batches: list[dict], shape: RunShape, steps: int) -> list[float]:
    """``steps`` optimizer steps; their LM losses."""
    return [train_step(run, batches, shape) for _ in range(steps)]


def release_memory() -> None:
    """Return the memory of dropped runs (callers ``del`` theirs first) before the next shape."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- tiny vs fp32


def reference_main(args: argparse.Namespace) -> None:
    """Child mode: the tiny model in fp32 on the CPU; writes initial weights and losses to ``--out``."""
    import torch

    import cumo_megatron.platform as platform

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    platform.initialize(seed=SEED)
    model_cfg = tiny_model("fp32")
    run = build_run(model_cfg)
    torch.save({k: v.detach().clone() for k, v in run.model.state_dict().items()
                if isinstance(v, torch.Tensor)}, out / "tiny_init.pt")
    losses = train_steps(run, batches_for(model_cfg, TINY), TINY, COMPARE_STEPS)
    (out / "reference.json").write_text(json.dumps({"lm_loss": losses}))
    platform.destroy()


# torchrun's variables: the child is a world of one of its own, whatever launched the parent.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def start_reference_child(out: Path) -> subprocess.Popen:
    """Start this script in ``--reference`` mode in a CPU-only child.

    Started first thing, so that its imports and fp32 steps overlap the parent's imports. Its
    output goes to ``reference.log`` (a pipe nobody reads until the end could fill and block it).
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("reference.json", "tiny_init.pt"):
        (out / stale).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference", "--out", str(out)]
    with open(out / "reference.log", "w") as log_file:
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def finish_reference_child(child: subprocess.Popen, out: Path) -> list[float]:
    """Wait for the child; its fp32 LM losses (its log's tail in the error if it failed)."""
    if child.wait() != 0:
        tail = (out / "reference.log").read_text()[-4000:]
        raise RuntimeError(f"the fp32 reference child failed ({child.returncode}):\n{tail}")
    return json.loads((out / "reference.json").read_text())["lm_loss"]


def relative_differences(values: list[float], reference: list[float]) -> list[float]:
    """``|v - r| / |r|`` per step (inf where a value is not finite)."""
    return [abs(v - r) / abs(r) if math.isfinite(v) else math.inf for v, r in zip(values, reference)]


def tiny_vs_fp32(child: subprocess.Popen, out: Path) -> dict:
    """The tiny model's first steps in bf16 on the device against the fp32 CPU child's."""
    import torch

    fp32 = finish_reference_child(child, out)
    init = torch.load(out / "tiny_init.pt", weights_only=True)
    model_cfg = tiny_model("bf16")
    run = build_run(model_cfg, init)
    bf16 = train_steps(run, batches_for(model_cfg, TINY), TINY, COMPARE_STEPS)
    del run
    release_memory()
    rel = relative_differences(bf16, fp32)
    tolerance = [FIRST_STEP_TOLERANCE] + [TOLERANCE] * (COMPARE_STEPS - 1)
    result = {"steps": COMPARE_STEPS, "lm_loss_bf16": bf16, "lm_loss_fp32": fp32, "rel_diff": rel,
              "max_rel_diff": max(rel), "tolerance": tolerance,
              "pass": all(r <= t for r, t in zip(rel, tolerance))}
    for step, (b, f, r, t) in enumerate(zip(bf16, fp32, rel, tolerance), start=1):
        log(f"tiny step {step}: bf16 {b:.5f}  fp32 {f:.5f}  rel diff {r:.2e} (tolerance {t:.0e})")
    return result


# --------------------------------------------------------------------------- save and reload


# Step 4 after a reload, relative to the uninterrupted run: the margin left for last-bit noise of
# GPU atomics that deterministic mode cannot remove. A reload that loses the optimizer state
# (fresh Adam moments) differs by 0.48 at step 4 (measured on the CPU); step 3 must be exact.
RELOAD_TOLERANCE = 1e-3


def save_reload(out: Path) -> dict:
    """2 steps, save, steps 3-4; a fresh model loads the save and reruns steps 3-4: same losses?

    Step 3's loss depends on the reloaded weights only, step 4's also on the reloaded optimizer
    state (Adam moments, fp32 main parameters). Deterministic algorithms are switched on for this
    part so that GPU kernels with atomics (scatter-add in the MoE, embedding backward) do not
    blur the comparison; `throughput` runs without them.
    """
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        path, async_path, continued, save_s, async_timing = _train_save_continue(out)
        reloaded, load_s = _reload_and_continue(path)
        reloaded_async, _ = _reload_and_continue(async_path)
    finally:
        torch.use_deterministic_algorithms(previous)
    sync, from_async = _reload_figures(continued, reloaded), _reload_figures(continued, reloaded_async)
    log(f"save/reload: steps 3-4 continued {continued}, reloaded {reloaded}, max |diff| {sync['max_abs_diff']:.3e}; "
        f"from the asynchronous save {reloaded_async}, max |diff| {from_async['max_abs_diff']:.3e}")
    return {"steps": [3, 4], "lm_loss_continued": continued, **sync,
            "step4_tolerance": RELOAD_TOLERANCE, "save_s": save_s, "load_s": load_s,
            "async": {**from_async, "blocked_s": async_timing.blocked_s, "save_s": async_timing.total_s},
            "pass": sync["pass"] and from_async["pass"]}


def _reload_figures(continued: list[float], reloaded: list[float]) -> dict:
    """Steps 3-4 of a reloaded run against the uninterrupted run's; ``pass``: step 3 identical,
    step 4 within `RELOAD_TOLERANCE`."""
    diff = max(abs(a - b) for a, b in zip(continued, reloaded))
    step4_rel = abs(reloaded[1] - continued[1]) / abs(continued[1])
    return {"lm_loss_reloaded": reloaded, "max_abs_diff": diff, "bit_exact": diff == 0.0,
            "step4_rel_diff": step4_rel, "pass": continued[0] == reloaded[0] and step4_rel <= RELOAD_TOLERANCE}


def _train_save_continue(out: Path) -> tuple[Path, Path, list[float], float, object]:
    """Tiny bf16 from the reference's initial weights: 2 steps, a synchronous and an asynchronous
    save, 2 more steps while the asynchronous one is written; (checkpoint, asynchronous
    checkpoint, losses 3-4, save s, the asynchronous save's `SaveTiming`)."""
    import cumo_megatron.platform as platform
    from cumo_megatron.training import checkpointing
    from cumo_megatron.training.async_save import AsyncCheckpointSaver

    model_cfg = tiny_model("bf16")
    batches = batches_for(model_cfg, TINY)
    platform.seed_everything(SEED)
    first = build_run(model_cfg, _tiny_init(out))
    train_steps(first, batches, TINY, 2)
    start = time.perf_counter()
    path = checkpointing.save_checkpoint(out / "ckpt", 2, first.model, first.optimizer, None, None,
                                         {"iteration": 2}, model_cfg=model_cfg)
    save_s = time.perf_counter() - start
    saver, timings = AsyncCheckpointSaver(), []
    async_path = saver.save(
        functools.partial(checkpointing.stage_save, out / "ckpt_async", 2, first.model, first.optimizer, None,
                          None, {"iteration": 2}, model_cfg=model_cfg, asynchronous=True),
        checkpointing.commit_save, lambda _path, timing: timings.append(timing))
    continued = train_steps(first, batches, TINY, 2)  # the weights change while the write goes on
    saver.wait()
    del first
    release_memory()
    return path, async_path, continued, save_s, timings[0]


def _reload_and_continue(path: Path) -> tuple[list[float], float]:
    """A fresh tiny model and optimizer load ``path`` and run 2 steps; (losses, load s)."""
    import cumo_megatron.platform as platform
    from cumo_megatron.training import checkpointing

    model_cfg = tiny_model("bf16")
    platform.seed_everything(SEED + 1)  # the fresh model's own initial weights must not matter
    second = build_run(model_cfg)
    start = time.perf_counter()
    checkpointing.load_checkpoint(path, second.model, second.optimizer, None, None)
    load_s = time.perf_counter() - start
    reloaded = train_steps(second, batches_for(model_cfg, TINY), TINY, 2)
    del second
    release_memory()
    return reloaded, load_s


def _tiny_init(out: Path) -> dict | None:
    """The reference child's initial weights if it ran, else None (the model's own init)."""
    import torch

    path = out / "tiny_init.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


# --------------------------------------------------------------------------- throughput


def peak_tflops(device_name: str | None) -> float | None:
    """The GPU's dense bf16 peak TFLOP/s by its name, None when unknown (or on the CPU)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def synchronize() -> None:
    """Wait for queued GPU work so wall-clock timings are the work's (no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_training(run: Run, batches: list[dict], shape: RunShape, steps: int) -> tuple[list[float], float]:
    """``steps`` steps, the warm-up ones (compiles, allocator growth) untimed; (losses, seconds per timed step)."""
    warmup = min(shape.warmup_steps, steps - 1)
    losses = train_steps(run, batches, shape, warmup)
    synchronize()  # the warm-up's queued kernels must not land in the timed window
    start = time.perf_counter()
    losses += train_steps(run, batches, shape, steps - warmup)
    synchronize()
    return losses, (time.perf_counter() - start) / (steps - warmup)


def throughput(model_cfg, shape: RunShape, steps: int, device_name: str | None) -> dict:
    """Train ``steps`` steps of ``shape``; time those after the warm-up; rate, FLOPs, memory."""
    import torch

    from cumo_megatron.models.params import hand_count
    from cumo_megatron.training.metrics import model_flops_per_step

    counts = hand_count(model_cfg)
    log(f"{shape.name} ({model_cfg.spec}): parameters total {counts.total.total:,}, active {counts.total.active:,}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    build_start = time.perf_counter()
    run = build_run(model_cfg)
    build_s = time.perf_counter() - build_start
    losses, step_s = timed_training(run, batches_for(model_cfg, shape), shape, steps)
    del run
    release_memory()
    tokens = shape.micro_batch_size * shape.num_microbatches * shape.seq_length
    images = shape.micro_batch_size * shape.num_microbatches  # one image per sample (the demo's batches)
    flops = model_flops_per_step(counts, model_cfg, stage=3, text_tokens=tokens, images=images)
    tflops = flops / step_s / 1e12
    peak = peak_tflops(device_name)
    result = {
        "shape": shape.name, "spec": model_cfg.spec, "params_total": counts.total.total,
        "params_active": counts.total.active, **{k: v for k, v in asdict(shape).items() if k != "name"},
        "steps": steps, "lm_loss_first": losses[0], "lm_loss_last": losses[-1],
        "finite": all(math.isfinite(v) for v in losses), "build_s": build_s, "step_s": step_s,
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s, "model_flops_per_step": flops,
        "tflops": tflops, "peak_bf16_tflops": peak, "mfu": tflops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    log(f"{shape.name} ({model_cfg.spec}): loss {losses[0]:.4f} -> {losses[-1]:.4f}, {step_s * 1e3:.1f} ms/step, "
        f"{result['tokens_per_s']:,.0f} tokens/s, {tflops:.2f} TFLOP/s, MFU {result['mfu']}, "
        f"peak memory {result['peak_mem_gib']} GiB")
    return result


def transformer_engine_version() -> str | None:
    """Transformer Engine's version when it imports (the ``te`` spec is then measured too)."""
    try:
        import transformer_engine
    except Exception:  # not installed, or installed without a matching CUDA build
        return None
    return getattr(transformer_engine, "__version__", "unknown")


def big_shapes(args: argparse.Namespace, on_gpu: bool, device_name: str | None) -> list[dict]:
    """Throughput of the ~1B shape (or its CPU stand-in): local spec, and TE when it imports.

    A failure (out of memory, a kernel error) is recorded in the shape's result (`attempt`).
    """
    model_cfg, shape = big_shape(on_gpu, args)
    specs = ["local"] + (["te"] if on_gpu and transformer_engine_version() else [])
    results = []
    last_s = 0.0
    for spec in specs:
        if time.perf_counter() - STARTED + last_s > BUDGET_S:
            log(f"{shape.name} ({spec}) skipped: it would end past the {BUDGET_S} s budget")
            results.append({"shape": shape.name, "spec": spec, "skipped": f"time budget {BUDGET_S} s"})
            continue
        model_cfg.spec = spec
        spec_start = time.perf_counter()
        results.append(attempt(f"{shape.name} ({spec})", throughput, model_cfg, shape, args.steps, device_name,
                               failed={"shape": shape.name, "spec": spec, "finite": False}))
        last_s = time.perf_counter() - spec_start
    return results


# --------------------------------------------------------------------------- main


def attempt(what: str, func, *args, failed: dict | None = None) -> dict:
    """``func(*args)``, or, when it raises, ``failed`` plus the error (and ``pass: False``).

    The first run on a new GPU is the one most likely to break somewhere: one failing part must
    not cost the JSON of the others.
    """
    start = time.perf_counter()
    try:
        return func(*args)
    except Exception as error:  # noqa: BLE001 - reported in the JSON and failed as a check
        log(f"{what} failed: {type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
        return dict(failed or {}, error=f"{type(error).__name__}: {error}", **{"pass": False})
    finally:
        release_memory()  # a failed run is freed once its traceback is gone
        log(f"{what}: {time.perf_counter() - start:.1f} s")


def environment(on_gpu: bool) -> dict:
    """Versions and the device the figures come from."""
    import torch
    from megatron.core import package_info

    return {
        "device": "cuda" if on_gpu else "cpu",
        "device_name": torch.cuda.get_device_name() if on_gpu else host_platform.processor() or "cpu",
        "python": host_platform.python_version(), "torch": torch.__version__,
        "megatron_core": package_info.__version__, "transformer_engine": transformer_engine_version(),
    }


def checks_of(report: dict) -> dict:
    """Every pass/fail check of the report, by name."""
    checks = {}
    if "tiny_vs_fp32" in report:
        checks["tiny_bf16_vs_fp32"] = report["tiny_vs_fp32"]["pass"]
    if "save_reload" in report:
        checks["save_reload"] = report["save_reload"]["pass"]
    for result in report.get("throughput", []):
        if "skipped" in result:
            continue
        checks[f"{result['shape']}_{result['spec']}_finite"] = bool(result["finite"]) and "error" not in result
    return checks


def smoke_main(args: argparse.Namespace, started: float, child: subprocess.Popen | None) -> int:
    """The device run: the checks and figures of the module docstring; returns the exit status."""
    import torch

    import cumo_megatron.platform as platform

    on_gpu = torch.cuda.is_available()
    if args.device == "cuda" and not on_gpu:
        raise SystemExit("--device cuda: no CUDA device is visible")
    out = Path(args.out)
    platform.initialize(seed=SEED)
    report = environment(on_gpu)
    log(f"device {report['device_name']}; torch {report['torch']}, megatron-core {report['megatron_core']}, "
        f"Transformer Engine {report['transformer_engine']}")
    report["startup_s"] = time.perf_counter() - started  # imports and process-group bring-up
    if "tiny" in args.shapes:
        report["tiny_vs_fp32"] = attempt("tiny bf16 vs fp32", tiny_vs_fp32, child, out)
        report["save_reload"] = attempt("save and reload", save_reload, out)
    if "1b" in args.shapes:
        report["throughput"] = big_shapes(args, on_gpu, report["device_name"])
    report["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report["checks"] = checks_of(report)
    report["pass"] = all(report["checks"].values())
    report["wall_s"] = time.perf_counter() - started
    platform.destroy()
    log(f"checks: {report['checks']}; wall {report['wall_s']:.1f} s")
    print(json.dumps(report))
    return 0 if report["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: the reference child or the smoke run."""
    args = parse_args(argv)
    hide_cuda_if_cpu(args)
    if args.reference:
        reference_main(args)
        return 0
    child = start_reference_child(Path(args.out)) if "tiny" in args.shapes else None
    try:
        return smoke_main(args, STARTED, child)
    finally:
        if child is not None and child.poll() is None:  # the run failed before it waited for the child
            child.kill()


if __name__ == "__main__":  # megatron's checkpoint writer re-imports __main__: nothing may run on import
    sys.exit(main())
