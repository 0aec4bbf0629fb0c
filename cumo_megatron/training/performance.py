"""Throughput settings: which fusions and overlaps a run uses, decided in one place.

`throughput_settings` decides from the config and from what the machine has (``cuda``, ``te``:
Transformer Engine importable, ``apex``: apex's ``fused_weight_gradient_mlp_cuda`` importable), so
the CUDA branch is testable on a CPU. Config knobs override the automatic choice (``None`` =
auto): ``model.fusions``, ``train.overlap_grad_reduce``, ``train.overlap_param_gather``,
``train.variable_seq_lengths``, ``train.async_save``.

What is on by default with CUDA, and why the rest is not:

- ``bias_dropout_fusion`` (both specs use megatron's ``get_bias_dropout_add``) and
  ``bias_activation_fusion`` where megatron's MLP can fuse the activation: the LLM's SwiGLU and a
  gelu ViT; not CLIP's quick_gelu (megatron fuses quick_gelu only in gated MLPs and refuses it
  otherwise).
- ``apply_rope_fusion`` and ``moe_permute_fusion``: Transformer Engine kernels (TE >= 1.4 /
  2.1), so only when TE is importable, whatever the spec; the LLM only (the ViT has no RoPE).
- ``gradient_accumulation_fusion``: every ``ColumnParallelLinear`` (the LLM's output layer under
  either spec) refuses it without apex's ``fused_weight_gradient_mlp_cuda``; on only with apex.
- ``masked_softmax_fusion`` and ``persist_layer_norm``: never. The first only reaches megatron's
  own ``DotProductAttention`` (the local spec uses SDPA, TE its fused attention); the second only
  apex's ``FusedLayerNorm`` (our norms are torch or TE's, and torch's asserts it is off).
- ``overlap_grad_reduce`` (DDP reduces gradient buckets during the backward) and
  ``overlap_param_gather`` (the distributed optimizer's all-gather of updated weights runs during
  the next forward; needs ``train.distributed_optimizer``, the default): **on with CUDA**.
  megatron issues both collectives as modules run, and CuMo's ranks do not run the same modules:
  text-only micro-batches skip the towers and the connector, connector experts may get no token.
  megatron's reduce then asserts (a parameter without a gradient in a step's last micro-batch)
  and its gathers, chained through forward pre-hooks, start in different orders on different
  ranks (a text-only first micro-batch begins with the LLM's). NCCL and gloo match collectives
  by order. `models.parallelize.order_bucket_collectives` fixes one order: buckets holding only
  LLM parameters start their reduce as soon as they are complete, any with a vision or
  connector parameter at the end of the backward; the step's first pre-hook dispatches every
  group's gather in one order (tests/training/test_overlap.py: stage 3 with text-only
  micro-batches and small buckets matches the synchronous run on 2 gloo ranks;
  tests/models/test_parallelize.py: the gathers' order does not depend on which modules run).
  ``train.ddp_bucket_size`` sets the bucket size.
- ``variable_seq_lengths``: under PP every micro-batch is padded to its own longest sample and
  megatron's schedule sends each shape before the tensor, instead of padding everything to
  ``data.max_length``. On wherever PP > 1, CPU included, except for an MoE LLM with the
  all-gather dispatcher (it all-gathers tokens over EP ranks, which need equal counts; megatron
  refuses the pair).
- ``async_save``: **on with CUDA**. A checkpoint's tensors are written by a forked process while
  training goes on; the loop is blocked only while the state is staged (device to host copies,
  the small per-rank and run files) and, when the next save, divergence or the end of training
  comes first, by the wait for the write (`training.async_save`; ``split: "checkpoint"`` rows of
  ``metrics.jsonl`` say how long). ``latest`` moves only after every rank's write is complete.
  Also works on CPU (gloo) when asked for, which is how the tests check it
  (tests/training/test_async_save.py); without CUDA the automatic choice stays synchronous.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from cumo_megatron.config.loader import ConfigError

_FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
            "persist_layer_norm", "gradient_accumulation_fusion", "moe_permute_fusion")


def te_available() -> bool:
    """Whether Transformer Engine is importable."""
    return importlib.util.find_spec("transformer_engine") is not None


def apex_wgrad_available() -> bool:
    """Whether apex's fused weight-gradient accumulation extension is importable."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


@dataclass(frozen=True)
class ThroughputSettings:
    """The resolved fusion and overlap switches of one run (`throughput_settings`)."""

    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    apply_rope_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False
    moe_permute_fusion: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    variable_seq_lengths: bool = False
    async_save: bool = False

    def fusion_fields(self, model, tower: str) -> dict:
        """TransformerConfig fusion fields for ``tower`` (``language``, ``vision``, ``connector``).

        The connector is plain torch modules: no megatron kernel reads its config's fusions.
        """
        fields = {name: getattr(self, name) for name in _FUSIONS}
        if tower == "connector":
            return {name: False for name in _FUSIONS}
        if tower == "vision":
            fields["bias_activation_fusion"] &= model.vision.activation == "gelu"
            fields["apply_rope_fusion"] = False
        return fields


def resolved_dispatcher(model, cuda: bool) -> str:
    """The MoE token dispatcher the run uses (``model.token_dispatcher``, auto: all-to-all on CUDA).

    The all-to-all dispatcher creates a CUDA stream; all-gather runs everywhere.
    """
    if model.token_dispatcher != "auto":
        return model.token_dispatcher
    return "alltoall" if cuda else "allgather"


def _pick(knob, auto: bool) -> bool:
    return auto if knob is None else bool(knob)


def fusion_settings(model, cuda: bool, te: bool, apex: bool) -> dict:
    """The fusion switches (before the per-tower rules of `ThroughputSettings.fusion_fields`)."""
    fuse = _pick(model.fusions, cuda)
    return dict(bias_activation_fusion=fuse, bias_dropout_fusion=fuse, apply_rope_fusion=fuse and te,
                gradient_accumulation_fusion=fuse and apex, moe_permute_fusion=fuse and te)


def throughput_settings(cfg, cuda: bool, te: bool, apex: bool = False) -> ThroughputSettings:
    """The throughput settings of ``cfg`` (an `ExperimentConfig`) on a machine with/without CUDA,
    Transformer Engine and apex's weight-gradient extension (module docstring: the rules)."""
    model, train, parallel = cfg.model, cfg.train, cfg.parallel
    llm_allgather = model.language.moe is not None and resolved_dispatcher(model, cuda) == "allgather"
    if train.variable_seq_lengths and parallel.pp > 1 and llm_allgather:
        raise ConfigError(
            "train.variable_seq_lengths=true with an MoE LLM needs model.token_dispatcher=alltoall "
            "(megatron's all-gather dispatcher needs equal token counts on the EP ranks)"
        )
    return ThroughputSettings(
        **fusion_settings(model, cuda, te, apex),
        # Both with CUDA, in the order `parallelize.order_bucket_collectives` fixes (module docstring).
        overlap_grad_reduce=_pick(train.overlap_grad_reduce, cuda),
        overlap_param_gather=_pick(train.overlap_param_gather, cuda) and train.distributed_optimizer,
        variable_seq_lengths=parallel.pp > 1 and _pick(train.variable_seq_lengths, not llm_allgather),
        # Off without CUDA: the writer would compete with training for the same cores, and the next
        # step's in-place updates make the kernel copy the forked snapshot's pages anyway; on (and
        # tested) when asked for.
        async_save=_pick(train.async_save, cuda),
    )


def machine_throughput_settings(cfg) -> ThroughputSettings:
    """`throughput_settings` for this machine."""
    from cumo_megatron.platform import cpu

    return throughput_settings(cfg, cpu.cuda_available(), te_available(), apex_wgrad_available())


def fusion_fields(model, tower: str) -> dict:
    """Fusion fields of ``tower``'s TransformerConfig on this machine (``model.fusions`` honoured)."""
    from cumo_megatron.platform import cpu

    settings = ThroughputSettings(**fusion_settings(model, cpu.cuda_available(), te_available(),
                                                    apex_wgrad_available()))
    return settings.fusion_fields(model, tower)
