"""Rank-side half of the TP = 2 generation test (run under `run_distributed`)."""

from __future__ import annotations

import torch

import cumo_megatron.platform as platform
from cumo_megatron.inference.generation import generate
from cumo_megatron.inference.session import load_model


def generate_tp2(cases: dict, new: int, questions: str, cli_out: str) -> dict:
    """For each case: load our checkpoint at TP = 2, generate greedy (cache and no cache) and sampled
    tokens; then run the CLI's batch mode on ``questions`` writing ``cli_out`` (rank 0 writes)."""
    platform.initialize(platform.ParallelSizes(tp=2), seed=0)
    out = {}
    for kind, case in cases.items():
        model, _ = load_model(case["ckpt"])
        batch = torch.load(case["batch"], weights_only=True)
        ids, images = batch["ids"], batch["images"]
        out[kind] = {
            "greedy": generate(model, ids, images, new),
            "uncached": generate(model, ids, images, new, use_cache=False) if kind == "mistral" else None,
            "sampled": generate(model, ids, images, 10, temperature=1.5, top_p=0.95, seed=1),
            "sequence_parallel": bool(model.config.sequence_parallel),
        }
    from cumo_megatron.generate import main

    main(["--load", cases["mistral"]["ckpt"], "--batch", questions, "--out", cli_out,
          "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"])
    return out
