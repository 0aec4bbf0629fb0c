"""Shared fixtures of the MoE tests."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from cumo_megatron.platform import ParallelSizes, initialize


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    initialize(ParallelSizes(), seed=0)


@pytest.fixture(autouse=True)
def unit_aux_scale():
    """The aux-loss backward scale is a process-wide class attribute: pin it to 1 for each test."""
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1)  # megatron's shape
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved
