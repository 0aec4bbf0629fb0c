"""Fixtures of the training tests: a tiny LLaVA dataset on disk and tiny initial weights."""

from __future__ import annotations

import pytest

from tests.training.workers import make_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict:
    """Tokenizer (vocab 320), 16 images + 4 text-only samples, vicuna_v1 conversations."""
    return make_dataset(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="session")
def init_weights(tmp_path_factory) -> str:
    """A world-of-one distributed checkpoint of the tiny stage-3 model (start of the parallel runs)."""
    from megatron.core import dist_checkpointing

    import cumo_megatron.platform as platform
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from tests.training.workers import tiny_model

    out = tmp_path_factory.mktemp("init-weights")
    platform.initialize(platform.ParallelSizes(), seed=99)
    model = build_model(tiny_model(stage=3), ParallelConfig())
    dist_checkpointing.save(model.sharded_state_dict(), str(out))
    return str(out)
