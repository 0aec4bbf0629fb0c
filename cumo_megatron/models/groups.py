"""Process groups for the sub-models that do not follow the LLM's tensor parallelism.

The vision tower and the connector run replicated over tensor-parallel ranks (see
`transformer_configs.vision_uses_expert_parallel` for why). They are built with a
`ProcessGroupCollection` whose tensor-parallel groups are single-rank groups; everything else
(DP, PP and, at TP = 1, EP) is megatron's global groups.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

_SINGLE_RANK_GROUP = {}


def single_rank_group() -> dist.ProcessGroup:
    """This rank alone as a process group (collective to create: every rank calls it)."""
    key = (dist.get_world_size(), id(parallel_state.get_tensor_model_parallel_group(check_initialized=False)))
    if key not in _SINGLE_RANK_GROUP:
        group, _ = dist.new_subgroups(group_size=1)
        _SINGLE_RANK_GROUP[key] = group
    return _SINGLE_RANK_GROUP[key]


def replicated_pg_collection(use_expert_parallel: bool) -> ProcessGroupCollection:
    """Global groups, with TP (and, unless ``use_expert_parallel``, EP) reduced to this rank."""
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
    """Fix parameter attributes of a sub-model replicated over TP ranks.

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


def mark_tp_replicas(sharded_state_dict: dict) -> dict:
    """Give each TP rank's copy of a TP-replicated sub-model a distinct checkpoint replica id.

    Built with single-rank TP groups, every TP rank would claim to hold the main replica
    (``replica_id[1] == 0``) and megatron's checkpoint validation rejects the duplicate writers.
    The second replica-id component is the TP rank by megatron's convention.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return sharded_state_dict

    def _mark(item):
        if isinstance(item, ShardedBase) and isinstance(item.replica_id, tuple):
            item.replica_id = (item.replica_id[0], tp_rank, *item.replica_id[2:])
        return item

    dict_list_map_inplace(_mark, sharded_state_dict)
    return sharded_state_dict
