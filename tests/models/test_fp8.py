"""FP8 rules (models.fp8): only the LLM runs under FP8; sequences padded to what TE needs."""

from __future__ import annotations

import pytest

from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models import transformer_configs as tc
from cumo_megatron.models.fp8 import fp8_align, fp8_fields, nearest_multiple, sequence_multiple


def _fp8(recipe="delayed"):
    model = tiny(moe=False)
    model.spec, model.precision, model.fp8, model.fp8_recipe = "te", "bf16", "hybrid", recipe
    return model


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_align_matches_megatron(recipe):
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    assert fp8_align(recipe) == get_fp8_align_size(Fp8Recipe(recipe))


@pytest.mark.parametrize(
    "fp8, recipe, tp, sp, expected",
    [
        (None, "delayed", 1, None, 1),
        (None, "delayed", 2, None, 2),  # SP on by default at tp > 1: s / tp per rank
        (None, "delayed", 2, False, 1),  # no SP: every rank holds the whole sequence
        ("hybrid", "delayed", 1, None, 16),
        ("e4m3", "tensorwise", 2, None, 32),  # 16 tokens per rank after the SP split
        ("hybrid", "mxfp8", 4, None, 128),
        ("hybrid", "blockwise", 2, False, 16),
    ],
)
def test_sequence_multiple(fp8, recipe, tp, sp, expected):
    model = tiny(moe=False)
    model.fp8, model.fp8_recipe = fp8, recipe
    assert sequence_multiple(model, ParallelConfig(tp=tp, sequence_parallel=sp)) == expected


def test_nearest_multiple():
    assert nearest_multiple(2000, 32) == 2016  # tie: up
    assert nearest_multiple(2040, 32) == 2048
    assert nearest_multiple(2050, 32) == 2048
    assert nearest_multiple(5, 16) == 16  # never 0


def test_only_the_language_config_gets_fp8():
    model = _fp8()
    assert fp8_fields(model, "language") == {"fp8": "hybrid", "fp8_recipe": "delayed"}
    assert fp8_fields(model, "vision") == {} and fp8_fields(model, "connector") == {}
    # The TransformerConfigs themselves (TE is not needed to build a dense config with fp8 set).
    assert tc.language_transformer_config(model, ParallelConfig()).fp8 == "hybrid"
    assert tc.vision_transformer_config(model, ParallelConfig()).fp8 is None
    assert tc.connector_transformer_config(model).fp8 is None
    model.fp8 = None
    assert tc.language_transformer_config(model, ParallelConfig()).fp8 is None
