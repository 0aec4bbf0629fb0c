"""Rank-side half of the TP = 2 and PP = 2 generation test (run under `run_distributed`)."""

from __future__ import annotations

import torch

import cumo_megatron.platform as platform
from cumo_megatron.inference.generation import generate
from cumo_megatron.inference.session import load_model


def _generate_cases(cases: dict, new: int) -> dict:
    """Greedy (cache; no cache for Mistral), sampled and left-padded batch tokens of each case."""
    out = {}
    for kind, case in cases.items():
        model, _ = load_model(case["ckpt"])
        batch = torch.load(case["batch"], weights_only=True)
        ids, images = batch["ids"], batch["images"]
        out[kind] = {
            "greedy": generate(model, ids, images, new),
            "uncached": generate(model, ids, images, new, use_cache=False) if kind == "mistral" else None,
            "sampled": generate(model, ids, images, 10, temperature=1.5, top_p=0.95, seed=1),
            "ragged": generate(model, batch["ragged_ids"], batch["ragged_images"], new,
                               left_pad_b=batch["ragged_pad"]),
            "sequence_parallel": bool(model.config.sequence_parallel),
            "stage": (model.pre_process, model.post_process),
        }
    return out


def generate_tp2_and_pp2(cases: dict, new: int, questions: str, cli_out: dict) -> dict:
    """At TP = 2 and then at PP = 2, for each case: load our checkpoint and generate
    (`_generate_cases`); then run the CLI's batch mode on ``questions`` writing ``cli_out[layout]``
    (rank 0 writes)."""
    from cumo_megatron.generate import main

    out = {}
    for layout, sizes in (("tp2", platform.ParallelSizes(tp=2)), ("pp2", platform.ParallelSizes(pp=2))):
        platform.initialize(sizes, seed=0)
        out[layout] = _generate_cases(cases, new)
        main(["--load", cases["mistral"]["ckpt"], "--batch", questions, "--out", cli_out[layout],
              "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3", "--tp", str(sizes.tp),
              "--pp", str(sizes.pp)])
    return out
