"""How a CuMo model is laid out on its ranks: the one place that decides it.

torchtitan keeps model code single-device and applies parallelism in one ``parallelize.py``;
megatron-core builds tensor-parallel layers at construction time, so the decisions here are asked
for twice: while the model is built (process groups of the TP-replicated towers, which experts are
expert-parallel) and once it is built (`place`, `wrap_ddp`). Everything about *where a tensor
lives, in which dtype and on which ranks* is answered here:

- **Device** (`training_device`): the current CUDA device when CUDA is present (megatron-LM's
  ``get_model`` moves every chunk there; megatron-core's DDP moves nothing), else the CPU.
  Parameters made with plain ``torch.nn`` (norms, routers, connector, the ViT stem) are born on
  the CPU and are moved by `place`; batches by `move_batch`; the aux-loss gradient scale is made
  on the batch's device (`aux_loss_scale`).
- **Dtype**: with ``model.precision`` bf16/fp16 the model chunk is wrapped in megatron's
  ``Float16Module`` (casts every parameter, the first stage's inputs, the last stage's outputs
  back to fp32), exactly as megatron-LM does; megatron's optimizer keeps fp32 main parameters.
  Inference casts the model itself (`place_for_inference`).
- **TP-replicated towers**: the vision tower and the connector run whole on every TP rank
  (CLIP-L/336 has 577 tokens, which sequence parallelism cannot split evenly, and megatron's MoE
  refuses TP > 1 without SP). They are built with single-rank TP groups
  (`replicated_pg_collection`), broadcast from TP rank 0 after the build
  (`broadcast_tp_replicas`), their gradients averaged across TP by megatron's
  ``finalize_model_grads`` (``average_gradients_across_tp_domain``), and checkpointed once
  (`mark_tp_replicas`).
- **Expert parallelism**: the LLM's experts (Mixtral) follow ``parallel.ep``; the vision experts
  use EP only at TP = 1 and only when the tower has experts (`vision_uses_expert_parallel`); the
  connector's experts are always local.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup
from megatron.core.process_groups_config import ProcessGroupCollection

from cumo_megatron.config.schema import ModelConfig, ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- device and dtype


def training_device() -> torch.device:
    """Where this rank's model and batches live: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(group=None) -> torch.device:
    """Where tensors sent through ``group``'s collectives must live: the current GPU under NCCL,
    else the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return training_device()
    return torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where one rank's model chunk lives and in which dtype it computes."""

    device: torch.device
    dtype: torch.dtype

    @property
    def half(self) -> bool:
        """Whether the model computes in bf16/fp16 (wrapped in megatron's ``Float16Module``)."""
        return self.dtype in (torch.bfloat16, torch.float16)


def placement_for(model: ModelConfig, device: Optional[torch.device] = None) -> Placement:
    """The placement a run of ``model`` uses (``device`` overrides `training_device`)."""
    return Placement(device=torch.device(device) if device is not None else training_device(),
                     dtype=DTYPES[model.precision])


def place(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Move ``model`` to the placement's device and put it in its training dtype.

    Returns the module to hand to DDP and to megatron's schedules: ``model`` itself in fp32, else
    a ``Float16Module`` around it (it converts the parameters in place, so ``model`` stays the
    object whose state dicts are checkpointed). Call after `broadcast_tp_replicas` and before
    `wrap_ddp`, as megatron-LM's ``get_model`` does.
    """
    from megatron.core.transformer.module import Float16Module

    model.to(placement.device)
    mark_tp_replicated_gradients(model)
    if not placement.half:
        return model
    config = model.config
    if config.params_dtype != placement.dtype:
        raise ValueError(
            f"the model was built for {config.params_dtype} but is placed in {placement.dtype}: build it from "
            "the same model.precision"
        )
    return Float16Module(config, model)


def place_for_inference(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Move ``model`` to the device and cast all of it to the placement's dtype (no wrapper:
    generation feeds the model itself and reads logits as they come)."""
    return model.to(device=placement.device, dtype=placement.dtype)


def move_batch(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on ``device`` (non-blocking from pinned memory); other values kept."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def aux_loss_scale(device: torch.device, num_microbatches: int, grad_scale_func=None) -> torch.Tensor:
    """The backward scale of every MoE aux loss in one micro-batch, on the loss's device.

    The LM loss of a micro-batch is divided by the number of micro-batches and, under fp16,
    multiplied by the loss scale (megatron's ``grad_scale_func``); the aux losses must be scaled
    the same way, and `MoEAuxLossAutoScaler` multiplies their gradients with this tensor.
    """
    one = torch.ones(1, device=device)
    scale = grad_scale_func(one) if grad_scale_func is not None else one
    return scale / num_microbatches


# --------------------------------------------------------------------------- expert parallelism


def vision_uses_expert_parallel(model: ModelConfig, parallel: ParallelConfig) -> bool:
    """Whether the vision tower's experts are spread over the EP group.

    Only at TP = 1, and only when the tower has experts. At TP > 1 the vision tower is replicated
    over the TP ranks (see the module docstring): the tokens of TP peers are identical, so
    spreading experts over an EP group that contains TP peers would count tokens twice, and the
    vision experts stay local (reduced over DP like dense weights) instead.
    """
    return model.vision.moe is not None and parallel.tp == 1 and parallel.ep > 1


def vision_expert_parallel_size(model: ModelConfig, parallel: ParallelConfig) -> int:
    """EP size of the vision tower's MoE layers (1 when its experts stay local)."""
    return parallel.ep if vision_uses_expert_parallel(model, parallel) else 1


def language_expert_parallel_size(model: ModelConfig, parallel: ParallelConfig) -> int:
    """EP size of the LLM's MoE layers (1 for a dense LLM)."""
    return parallel.ep if model.language.moe is not None else 1


# --------------------------------------------------------------------------- TP-replicated towers

_SINGLE_RANK_GROUP = {}


def single_rank_group() -> dist.ProcessGroup:
    """This rank alone as a process group (collective to create: every rank calls it)."""
    key = (dist.get_world_size(), id(parallel_state.get_tensor_model_parallel_group(check_initialized=False)))
    if key not in _SINGLE_RANK_GROUP:
        group, _ = dist.new_subgroups(group_size=1)
        _SINGLE_RANK_GROUP[key] = group
    return _SINGLE_RANK_GROUP[key]


def replicated_pg_collection(use_expert_parallel: bool) -> ProcessGroupCollection:
    """Process groups of a TP-replicated tower: megatron's global groups, with TP (and, unless
    ``use_expert_parallel``, EP) reduced to this rank."""
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    if parallel_state.get_tensor_model_parallel_world_size() == 1 and (
        use_expert_parallel or parallel_state.get_expert_model_parallel_world_size() == 1
    ):
        return pgs
    solo = single_rank_group()
    values = {f.name: getattr(pgs, f.name) for f in dataclasses.fields(pgs) if hasattr(pgs, f.name)}
    values.update(tp=solo, tp_cp=solo, expt_tp=solo)
    if not use_expert_parallel:
        values.update(ep=solo, tp_ep=solo)
    return ProcessGroupCollection(**values)


def mark_replicated_over_tp(module: torch.nn.Module, experts_are_dense: bool) -> None:
    """Fix parameter attributes of a sub-model replicated over TP ranks (call before DDP).

    - ``tensor_model_parallel=False``: the copy on every TP rank is whole, so the gradient norm
      must count it once (megatron counts non-TP parameters on TP rank 0 only).
    - ``allreduce=True`` on experts that are not spread by EP: their gradients are reduced over the
      data-parallel group like any dense weight, not over megatron's expert-data-parallel group,
      which is sized for the LLM's experts.
    """
    for param in module.parameters():
        param.tensor_model_parallel = False
        param.partition_dim = -1
        if experts_are_dense and not getattr(param, "allreduce", True):
            param.allreduce = True


def tp_replicated_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sub-models of ``model`` (a `CuMoModel` stage) that every TP rank holds whole."""
    return [m for m in (getattr(model, "vision", None), getattr(model, "connector", None)) if m is not None]


def mark_tp_replicated_gradients(model: torch.nn.Module) -> None:
    """Ask megatron's ``finalize_model_grads`` to average the replicas' gradients across TP.

    In exact arithmetic every TP rank computes the same gradient for a replicated tower (same
    images, the full gradient of the spliced embeddings after SP's gather); non-deterministic GPU
    kernels make them differ in the last bits, and replicas that drift apart are then
    checkpointed from TP rank 0 only. Averaging keeps them identical.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    for module in tp_replicated_modules(model):
        for param in module.parameters():
            param.average_gradients_across_tp_domain = True


def broadcast_tp_replicas(model: torch.nn.Module) -> None:
    """Make the TP-replicated towers identical on every TP rank (from TP rank 0).

    megatron initialises weights under the model-parallel RNG stream, which differs per TP rank;
    replicated sub-models must start (and, with `mark_tp_replicated_gradients`, stay) identical.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    # Right after the build the plain torch.nn parts still sit on the CPU, which NCCL cannot
    # send: stage those through the current GPU.
    comm = comm_device(group)
    with torch.no_grad():
        for module in tp_replicated_modules(model):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.device == comm:
                    dist.broadcast(tensor.data, src=src, group=group)
                else:
                    staged = tensor.data.to(comm)
                    dist.broadcast(staged, src=src, group=group)
                    tensor.data.copy_(staged)


def mark_tp_replicas(sharded_state_dict: dict) -> dict:
    """Give each TP rank's copy of a TP-replicated sub-model a distinct checkpoint replica id.

    Built with single-rank TP groups, every TP rank would claim to hold the main replica
    (``replica_id[1] == 0``) and megatron's checkpoint validation rejects the duplicate writers.
    The second replica-id component is the TP rank by megatron's convention.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return sharded_state_dict

    def _mark(item):
        if isinstance(item, ShardedBase) and isinstance(item.replica_id, tuple):
            item.replica_id = (item.replica_id[0], tp_rank, *item.replica_id[2:])
        return item

    dict_list_map_inplace(_mark, sharded_state_dict)
    return sharded_state_dict


# --------------------------------------------------------------------------- data parallelism


def wrap_ddp(
    chunk: torch.nn.Module,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    grad_reduce_in_fp32: bool = True,
    bucket_size: Optional[int] = None,
):
    """megatron DDP around a placed chunk, with `finalize_model_grads` wired into its config.

    Gradients are reduced in fp32 whatever the compute dtype (megatron-LM's default for bf16).
    With ``overlap_grad_reduce`` the schedule gets DDP's ``no_sync`` (no reduction before the last
    micro-batch) and ``start_grad_sync`` (bucket reductions start during the last backward), as
    megatron-LM wires them; ``finalize_model_grads`` waits for them (`order_bucket_collectives`: when
    a bucket may start). ``overlap_param_gather``
    (distributed optimizer only) defers the all-gather of updated weights to the next step's
    forward (`order_bucket_collectives`: in which order): see `params_gathered` before reading
    the weights outside a forward.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather and use_distributed_optimizer,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk)
    if overlap_grad_reduce or ddp_config.overlap_param_gather:
        order_bucket_collectives(wrapped)
    chunk.config.finalize_model_grads_func = finalize_model_grads
    chunk.config.no_sync_func = wrapped.no_sync if overlap_grad_reduce else None
    chunk.config.grad_sync_func = wrapped.start_grad_sync if overlap_grad_reduce else None
    return wrapped


# Top-level submodules of a CuMo chunk that a micro-batch may leave unused: a text-only
# micro-batch never runs the vision tower nor the connector, and the connector's MoE skips an
# expert that gets no token. The LLM's parameters get a gradient in every backward (megatron's
# SequentialMLP and grouped GEMMs run experts on empty inputs too).
SKIPPABLE_MODULES = ("vision", "connector")


class _RankOrderedBucketGroup(_ParamAndGradBucketGroup):
    """A DDP bucket group whose overlapped collectives run in the same order on every
    data-parallel rank, whichever modules a rank's micro-batches use.

    NCCL and gloo match collectives by the order each rank issues them. megatron (0.16) issues
    them as modules run, which is the same everywhere only if every rank runs the same modules;
    CuMo's do not: a text-only micro-batch skips the vision tower and the connector, and an
    expert may get no token.

    **Gradient reduce** (``overlap_grad_reduce``). megatron starts a bucket's reduce during the
    last micro-batch's backward once the parameters that reported a gradient equal those of the
    first step ("golden" counts), and asserts at the end of the first step that every parameter
    reported one. Here a bucket with a parameter of a `SKIPPABLE_MODULES` module
    (``issue_early`` false) starts its reduce only in ``finish_grad_sync`` (the same point and
    order on every rank, as without overlap); any other bucket starts when all of its parameters
    have their gradient (which no later gradient can change), else in ``finish_grad_sync`` too.

    **Parameter gather** (``overlap_param_gather``). megatron gathers the updated weights in the
    next forward: a module's pre-hook waits for its group's all-gather, and each wait dispatches
    the next group's. A rank whose first micro-batch is text-only would start with an LLM
    group's gather while a rank with images starts with the tower's. Here the first pre-hook of
    a step dispatches every group's gather, in ``gather_order`` (the same list on every rank),
    before any other collective of the step; each hook then only waits for its own group, and
    ``finish_grad_sync`` waits for those no module of this rank used, before the optimizer
    writes the weights again. The gathers still overlap the forward: only the first module
    waits for the first group.
    """

    issue_early: bool = True
    gather_order: tuple = ()  # every bucket group of the DDP module, dispatch order

    def reset(self) -> None:
        """Forget this step's gradient reports (no golden counts: see the class)."""
        self.per_param_grad_ready_counts = {}
        self.is_last_microbatch = True

    def register_grad_ready(self, param: torch.nn.Parameter, force_all_reduce: Optional[bool] = False) -> None:
        """Count ``param``'s gradient; start the reduce when the bucket may and is complete."""
        assert self.ddp_config.overlap_grad_reduce, "register_grad_ready() needs overlap_grad_reduce"
        if not self.is_last_microbatch:
            return
        counts = self.per_param_grad_ready_counts
        counts[param] = counts.get(param, 0) + 1
        if self.issue_early and len(counts) == len(self.params):
            self.start_grad_sync(force_all_reduce=force_all_reduce)

    def start_grad_sync(self, force_all_reduce: Optional[bool] = False) -> None:
        """Start the reduce unless it already runs (the schedules' ``grad_sync_func`` may ask
        again after the backward started it; megatron asserts there outside its first step)."""
        if self.ddp_config.overlap_grad_reduce and self.grad_reduce_handle is not None:
            return
        super().start_grad_sync(force_all_reduce=force_all_reduce)

    def finish_grad_sync(self, force_all_reduce: Optional[bool] = False) -> None:
        """Wait for a gather that no module waited for; start the reduce if nothing did yet,
        then wait for it (megatron's own wait, which also marks the gathers as done)."""
        if self.ddp_config.overlap_param_gather and self.param_gather_handle is not None:
            super().finish_param_sync(skip_next_bucket_dispatch=True)
        if self.ddp_config.overlap_grad_reduce:
            self.start_grad_sync(force_all_reduce=force_all_reduce)
        super().finish_grad_sync(force_all_reduce=force_all_reduce)

    def finish_param_sync(self, skip_next_bucket_dispatch: bool = False) -> None:
        """Wait for this group's gathered weights; the step's first call dispatches all gathers."""
        if not self.param_gather_dispatched:
            for group in self.gather_order:
                if not group.param_gather_dispatched:
                    group.start_param_sync()
        super().finish_param_sync(skip_next_bucket_dispatch=True)


def skippable_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters of ``module``'s `SKIPPABLE_MODULES` (found through DDP and
    ``Float16Module`` wrappers)."""
    found: set[int] = set()
    for name, param in module.named_parameters():
        if any(part in SKIPPABLE_MODULES for part in name.split(".")[:-1]):
            found.add(id(param))
    return found


def order_bucket_collectives(ddp) -> None:
    """Make every bucket group of megatron DDP ``ddp`` a `_RankOrderedBucketGroup`."""
    # megatron builds its bucket groups inside DDP's constructor with no way to pass a class;
    # re-classing the built groups keeps all their state (buffers, hooks' lookups) as it is.
    skippable = skippable_parameters(ddp.module)
    # megatron's own gather order: each group list in reverse (buckets are laid out from the
    # last parameter to the first, so this is the order in which the forward meets them).
    gather_order = tuple(reversed(ddp.bucket_groups)) + tuple(reversed(ddp.expert_parallel_bucket_groups))
    for group in gather_order:
        group.__class__ = _RankOrderedBucketGroup
        group.issue_early = not any(id(p) in skippable for p in group.params)
        group.is_first_batch = False  # megatron's golden-count bookkeeping is not used
        group.gather_order = gather_order
        group.next_param_gather_bucket_group = None  # all gathers start together (the class)


@contextlib.contextmanager
def params_gathered(ddp) -> Iterator[None]:
    """Within the block the model holds this step's updated weights on every DP rank.

    Under ``overlap_param_gather`` the distributed optimizer's all-gather of updated weights runs
    in forward pre-hooks; a checkpoint save reads the weights outside a forward. As megatron-LM
    does around saves, the hooks are removed (which gathers synchronously) and put back after.
    A no-op without overlapped gathers.
    """
    if not getattr(ddp, "use_forward_hook", False):
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()
