"""Functions run on every rank by `tests.helpers.distributed.run_distributed` (gloo, CPU).

One launch costs ~10 s, so `check_two_ranks` checks everything the platform needs from two
processes in one go and returns plain measurements; `tests/platform/test_distributed.py` asserts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gloo_all_reduce(rank: int) -> dict:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {"all_reduce_sum": value.item(), "backend": dist.get_backend()}


def _tensor_parallel_checks(rank: int) -> dict:
    """TP = 2: groups, sequence-parallel gather / reduce-scatter, TP-rank RNG streams, SP norm grads."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.tensor_parallel.mappings import _gather_along_first_dim
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cumo_megatron.models.norms import SequenceParallelTorchNorm
    from cumo_megatron.platform import ParallelSizes, initialize

    initialize(ParallelSizes(tp=2), seed=11)
    out: dict = {
        "tp_world": parallel_state.get_tensor_model_parallel_world_size(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_world": parallel_state.get_data_parallel_world_size(),
    }

    # Sequence-parallel mappings allocate their outputs on torch.cuda.current_device().
    local_x = torch.arange(6, dtype=torch.float32).view(2, 3) + 100 * rank
    local_x.requires_grad_(True)
    gathered = tensor_parallel.gather_from_sequence_parallel_region(local_x)
    scattered = tensor_parallel.reduce_scatter_to_sequence_parallel_region(gathered)
    # The gather's backward is a reduce-scatter: each rank's slice receives the sum over ranks.
    (gathered * (rank + 1)).sum().backward()
    buffered = _gather_along_first_dim(local_x.detach(), parallel_state.get_tensor_model_parallel_group(),
                                       use_global_buffer=True)
    out.update(
        local_x=local_x.detach(),
        gathered=gathered.detach(),
        gathered_device=str(gathered.device),
        scattered=scattered.detach(),
        local_x_grad=local_x.grad,
        buffered=buffered.clone(),
        buffered_device=str(buffered.device),
    )

    # Named RNG streams: the model-parallel stream differs across TP ranks, the default one does not.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork("model-parallel-rng"):
        out["model_parallel_draw"] = torch.rand(4)
    out["default_draw"] = torch.rand(4)

    # Sequence-parallel norm params are summed over the TP group by megatron's grad finalisation.
    sp_config = TransformerConfig(
        num_layers=1, hidden_size=4, num_attention_heads=2, tensor_model_parallel_size=2,
        sequence_parallel=True, normalization="RMSNorm",
    )
    norm = SequenceParallelTorchNorm(sp_config, hidden_size=4)
    norm.ddp_config = DistributedDataParallelConfig()
    norm.weight.grad = torch.full((4,), float(rank + 1))
    _allreduce_non_tensor_model_parallel_grads([norm], sp_config, parallel_state.get_tensor_model_parallel_group())
    out["sp_norm_grad"] = norm.weight.grad.clone()
    return out


def _checkpoint_round_trip(rank: int, checkpoint_dir: str) -> dict:
    """megatron dist_checkpointing save + load of a TP-sharded tensor (needs psutil, sync no-op)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    full = torch.arange(24, dtype=torch.float32).view(4, 6)
    shard = full.chunk(2, dim=0)[rank].clone()
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", shard, (0, rank, 2))}, checkpoint_dir)
    dist.barrier()
    # Load the same shard back, and the whole tensor as a replica (resharded on load).
    loaded = dist_checkpointing.load(
        {
            "w": ShardedTensor.from_rank_offsets("w", torch.zeros_like(shard), (0, rank, 2)),
        },
        checkpoint_dir,
    )
    loaded_full = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 6), replica_id=rank)}, checkpoint_dir
    )
    return {"saved_shard": shard, "loaded_shard": loaded["w"], "full": full, "loaded_full": loaded_full["w"]}


def _pipeline_checks(rank: int) -> dict:
    """PP = 2 (re-initialised in the same process): megatron p2p forward send / backward send."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from cumo_megatron.platform import ParallelSizes, cpu, initialize

    initialize(ParallelSizes(pp=2), seed=11)
    out = {
        "pp_world": parallel_state.get_pipeline_model_parallel_world_size(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_world_after_reinit": parallel_state.get_tensor_model_parallel_world_size(),
    }
    config = ModelParallelConfig(
        pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, **cpu.transformer_config_overrides()
    )
    comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), config)
    shape = (3, 2, 4)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    activation = torch.arange(24, dtype=torch.float32).view(shape)
    if first:
        comm.send_forward(activation, is_last_stage=last)
        out["grad_received"] = comm.recv_backward(shape, is_last_stage=last)
    else:
        received = comm.recv_forward(shape, is_first_stage=first)
        out["activation_received"] = received
        comm.send_backward(-2.0 * received, is_first_stage=first)
    out["activation_sent"] = activation
    return out


def check_two_ranks(checkpoint_dir: str) -> dict:
    """Everything the platform needs from two gloo processes, in one launch."""
    rank = dist.get_rank()
    result = {"rank": rank}
    result.update(_gloo_all_reduce(rank))
    result.update(_tensor_parallel_checks(rank))
    result.update(_checkpoint_round_trip(rank, checkpoint_dir))
    result.update(_pipeline_checks(rank))
    return result
