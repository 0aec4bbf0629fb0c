"""`seed_everything` seeds every random stream a run uses (world of one, in this process)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel

import cumo_megatron.platform as platform


def _draws() -> dict:
    """One value from each stream: Python, numpy, torch's default generator, a tracked stream."""
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = float(torch.rand(()))
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": float(torch.rand(())),
            "tracked": tracked}


def test_seed_everything_makes_every_stream_reproducible():
    platform.initialize(platform.ParallelSizes(), seed=11)
    first = _draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # what a library might do in between
    platform.seed_everything(11)
    assert _draws() == first
    platform.seed_everything(12)
    other = _draws()
    assert all(other[name] != first[name] for name in first), (other, first)
