"""CPU time per token of the CLIP-MoE block (4 experts, top-2) vs the dense MLP and a reference loop.

Shapes of CLIP ViT-L/336: width 1024, ffn 4096, quick_gelu, biases; 576 tokens x batch 8. Three
implementations on the same input, fp32:

* ``moe``: our megatron `MoELayer` (CuMoRouter, all-gather dispatcher, SequentialMLP experts) built
  from the local layer spec exactly as the vision tower builds it;
* ``dense``: megatron's dense `MLP` of the same shape (top-2's FLOP floor is 2x this);
* ``loop``: the original code's per-sample, per-expert loop (`tests/reference/cumo_reference.ReferenceMoE`).

Forward runs in ``torch.no_grad()`` with the modules in eval mode. Runs are interleaved
(dense, moe, loop, dense, ...) so that load from other processes hits all three alike; the table
gives the median of the repeats and, as a load-robust cross-check, the median of the per-round
ratios. ``--backward`` also times forward+backward (train mode, aux losses attached, input grad);
``--profile`` splits the MoE forward into router / permute / experts / unpermute and prints
torch.profiler's operator table. The last line is ``{"moe_over_dense": X, "moe_over_loop": Y}``
(forward, ratios of medians).

Usage: ``python bench/moe_block.py [--tokens 576] [--batch 8] [--repeats 7] [--backward] [--profile]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cumo_megatron.platform as platform  # noqa: E402
from cumo_megatron.config.schema import ModelConfig, MoEConfig, ParallelConfig, VisionConfig  # noqa: E402
from cumo_megatron.models.specs import layer_spec  # noqa: E402
from cumo_megatron.models.transformer_configs import vision_transformer_config  # noqa: E402
from cumo_megatron.moe.router import RouterSettings  # noqa: E402
from tests.reference.cumo_reference import ReferenceCLIPMLP, ReferenceMoE  # noqa: E402

PATHS = ("dense", "moe", "loop")


def build_blocks(hidden: int, ffn: int, experts: int, top_k: int):
    """(megatron MoELayer, megatron dense MLP, reference loop MoE) with shared weights."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    model = ModelConfig(vision=VisionConfig(
        hidden_size=hidden, num_heads=16, ffn_hidden_size=ffn, moe=MoEConfig(experts, top_k),
    ))
    config = vision_transformer_config(model, ParallelConfig())
    settings = RouterSettings("vision", call_share=1.0)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    moe = build_module(layer_spec("local", causal=False, router=settings).submodules.mlp,
                       config=config, pg_collection=pgs)
    dense_model = ModelConfig(vision=VisionConfig(hidden_size=hidden, num_heads=16, ffn_hidden_size=ffn))
    dense_config = vision_transformer_config(dense_model, ParallelConfig())
    dense = build_module(layer_spec("local", causal=False, router=None).submodules.mlp,
                         config=dense_config, tp_group=pgs.tp)
    ref = ReferenceMoE(hidden, [ReferenceCLIPMLP(hidden, ffn) for _ in range(experts)], top_k=top_k)
    with torch.no_grad():
        ref.gate.weight.copy_(moe.router.weight)
        for j, expert in enumerate(moe.experts.local_experts):
            # megatron zero-inits biases: make them non-trivial so every path really adds them.
            expert.linear_fc1.bias.normal_(0.0, 0.02)
            expert.linear_fc2.bias.normal_(0.0, 0.02)
            ref.experts[j].fc1.weight.copy_(expert.linear_fc1.weight)
            ref.experts[j].fc1.bias.copy_(expert.linear_fc1.bias)
            ref.experts[j].fc2.weight.copy_(expert.linear_fc2.weight)
            ref.experts[j].fc2.bias.copy_(expert.linear_fc2.bias)
        source = moe.experts.local_experts[0]
        for name in ("linear_fc1", "linear_fc2"):
            getattr(dense, name).weight.copy_(getattr(source, name).weight)
            getattr(dense, name).bias.copy_(getattr(source, name).bias)
    return moe, dense, ref


def moe_stages(moe, x_sbh: torch.Tensor) -> dict[str, float]:
    """One MoELayer forward split into its stages (same calls as `MoELayer.forward`), seconds each."""
    dispatcher = moe.token_dispatcher
    times = {}
    t0 = time.perf_counter()
    probs, routing_map = moe.router(x_sbh)
    t1 = time.perf_counter()
    hidden, probs = dispatcher.dispatch_preprocess(x_sbh, routing_map, probs)
    hidden, probs = dispatcher.token_dispatch(hidden, probs)
    permuted, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(hidden, probs)
    t2 = time.perf_counter()
    out, _ = moe.experts(permuted, tokens_per_expert, permuted_probs)
    t3 = time.perf_counter()
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(out)))
    t4 = time.perf_counter()
    times.update(router=t1 - t0, permute=t2 - t1, experts=t3 - t2, unpermute=t4 - t3)
    return times


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(runs: dict, warmup: int, repeats: int, extra=None) -> tuple[dict, dict]:
    """Per-path lists of wall times, rounds interleaved; ``extra()`` (stage timings) runs each round."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    stages: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn))
        if extra is not None:
            for stage, seconds in extra().items():
                stages.setdefault(stage, []).append(seconds)
    return times, stages


def _table(title: str, times: dict, tokens: int) -> dict:
    median = {name: statistics.median(values) for name, values in times.items()}
    print(title)
    print(f"{'path':<8}{'ms':>10}{'us/token':>10}{'x dense':>9}{'x dense/round':>15}   all runs (ms)")
    for name, values in times.items():
        per_round = statistics.median(v / d for v, d in zip(values, times["dense"]))
        runs_ms = " ".join(f"{1e3 * t:.0f}" for t in values)
        print(f"{name:<8}{1e3 * median[name]:>10.1f}{1e6 * median[name] / tokens:>10.2f}"
              f"{median[name] / median['dense']:>9.2f}{per_round:>15.2f}   {runs_ms}")
    return median


def _forward_backward(module, x: torch.Tensor):
    """One training step's worth of work: forward, ``out.sum()`` backward (aux losses attached)."""

    def run():
        x.grad = None
        for param in module.parameters():
            param.grad = None
        out = module(x)[0]
        out.sum().backward()

    return run


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and the JSON line; return the forward ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--backward-repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="MoE stage split and operator table")
    args = parser.parse_args(argv)

    platform.initialize(platform.ParallelSizes(), seed=0)
    torch.manual_seed(0)
    moe, dense, ref = build_blocks(args.hidden, args.ffn, args.experts, args.top_k)
    x_sbh = torch.randn(args.tokens, args.batch, args.hidden)
    x_bsh = x_sbh.transpose(0, 1).contiguous()  # the loop takes [B, T, d]
    tokens = args.tokens * args.batch
    print(f"CLIP-MoE block: {args.experts} experts top-{args.top_k}, width {args.hidden}, ffn {args.ffn}, "
          f"{args.tokens} tokens x batch {args.batch}, fp32, {torch.get_num_threads()} threads")

    for module in (moe, dense, ref):
        module.eval()
    runs = {"dense": lambda: dense(x_sbh), "moe": lambda: moe(x_sbh), "loop": lambda: ref(x_bsh)}
    with torch.no_grad():
        max_diff = (moe(x_sbh)[0] - ref(x_bsh)[0].transpose(0, 1)).abs().max().item()
        extra = (lambda: moe_stages(moe, x_sbh)) if args.profile else None
        times, stages = _interleaved(runs, args.warmup, args.repeats, extra)
    moe.router.take_stats()
    print(f"moe vs loop: max |diff| = {max_diff:.2e}")
    median = _table(f"forward, no_grad, median of {args.repeats}:", times, tokens)
    if stages:
        print("MoE forward by stage (median ms, x dense):")
        for stage, values in stages.items():
            t = statistics.median(values)
            print(f"  {stage:<10}{1e3 * t:>9.1f}{t / median['dense']:>8.2f}")
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            moe(x_sbh)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    if args.backward:
        for module in (moe, dense, ref):
            module.train()
        x_grad_sbh = x_sbh.clone().requires_grad_(True)
        x_grad_bsh = x_bsh.clone().requires_grad_(True)
        train_runs = {
            "dense": _forward_backward(dense, x_grad_sbh),
            "moe": _forward_backward(moe, x_grad_sbh),
            "loop": _forward_backward(ref, x_grad_bsh),
        }
        train_times, _ = _interleaved(train_runs, 1, args.backward_repeats)
        moe.router.take_stats()
        _table(f"forward+backward, median of {args.backward_repeats}:", train_times, tokens)

    ratios = {
        "moe_over_dense": round(median["moe"] / median["dense"], 3),
        "moe_over_loop": round(median["moe"] / median["loop"], 3),
    }
    print(json.dumps(ratios))
    return ratios


if __name__ == "__main__":
    main()
