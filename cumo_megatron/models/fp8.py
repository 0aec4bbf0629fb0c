"""FP8 rules: what runs under FP8, and the sequence multiple Transformer Engine needs.

Pure functions of the config (no megatron or Transformer Engine import), so the config validation
can use them before anything is allocated.

- **Only the LLM runs under FP8** (`fp8_fields`). TE's FP8 GEMMs need the product of all but the
  last input dimension to be a multiple of 16 (32 for MXFP8): megatron-core's
  ``fp8_utils.get_fp8_align_size``. The ViT sees 577 tokens per image crop (576 patches + CLS)
  and the connector as many tokens as the images of a micro-batch give, neither a multiple of 16;
  megatron's own LLaVA runs its ViT under FP8 only after padding the class tokens to 16/32
  (``llava_model.py``: ``class_token_len = 32 if mxfp8 else 16``), which changes the checkpoint
  layout of a CLIP tower. Ours stay in bf16/fp16: they are a small share of the FLOPs.
- **The LLM sequence is padded** (`sequence_multiple`) to a multiple TE accepts at the given TP:
  with sequence parallelism each TP rank holds ``s / tp`` positions (and TE quantizes them before
  its all-gather), so ``s`` must be a multiple of ``align x tp``; without SP the whole ``s``
  reaches every GEMM. The LLM's MoE experts need no such rule: TE's grouped MLP pads every
  expert's tokens itself (megatron's ``Fp8Padding``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the schema imports this module lazily; no cycle at run time
    from cumo_megatron.config.schema import ModelConfig, ParallelConfig

# megatron-core 0.16.1 fp8_utils.get_fp8_align_size: 32 for MXFP8, 16 for every other recipe
# (delayed, tensorwise, blockwise). Mirrored, not imported: importing fp8_utils pulls in
# megatron's optimizer stack, far too heavy for config validation (a test checks they agree).
_ALIGN = {"mxfp8": 32}
DEFAULT_ALIGN = 16


def fp8_align(recipe: str) -> int:
    """Token-count multiple TE's FP8 GEMMs need for ``recipe`` (``model.fp8_recipe``)."""
    return _ALIGN.get(recipe, DEFAULT_ALIGN)


def fp8_fields(model: "ModelConfig", tower: str) -> dict:
    """The ``fp8``/``fp8_recipe`` fields of the TransformerConfig of ``tower``.

    ``tower`` is ``"language"``, ``"vision"`` or ``"connector"``; only the language model gets
    them (see the module docstring: 577 ViT tokens per crop, image-dependent connector tokens).
    """
    if model.fp8 is None or tower != "language":
        return {}
    return {"fp8": model.fp8, "fp8_recipe": model.fp8_recipe}


def sequence_multiple(model: "ModelConfig", parallel: "ParallelConfig") -> int:
    """The multiple the LLM sequence length of every micro-batch must be padded to.

    ``tp`` with sequence parallelism (it splits the sequence over the TP ranks), else 1; under
    FP8 that times `fp8_align` (16, or 32 for MXFP8).
    """
    multiple = parallel.tp if parallel.use_sequence_parallel else 1
    if model.fp8 is not None:
        multiple *= fp8_align(model.fp8_recipe)
    return multiple


def nearest_multiple(value: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``value`` (ties go up), at least ``multiple``."""
    down = value // multiple * multiple
    up = down + multiple
    return up if down == 0 or value - down >= up - value else down
