"""Bad data met by one rank stops every rank, each with the same message and no traceback.

With ``data.policy=fail`` a bad record raises `DataError` on the data-parallel rank whose shard
holds it; the other ranks would go on into the step's collectives and die there with a
communication error (a traceback) once the failing rank has exited. `next_microbatches` fetches a
step's micro-batches and agrees over all ranks whether any of them failed (one small all-reduce a
step, next to the step's own), so every rank raises a `DataError` naming the record.
"""

from __future__ import annotations

from typing import Iterator

__all__ = ["next_microbatches"]


def next_microbatches(data_iter: Iterator[dict], count: int) -> list[dict]:
    """The next ``count`` micro-batches of ``data_iter``; a user error (`DataError`, `ImageError`)
    on any rank raises on every rank (collective when torch.distributed runs several processes)."""
    import torch
    import torch.distributed as dist

    from cumo_megatron.data.records import DataError
    from cumo_megatron.errors import UserError
    from cumo_megatron.models.parallelize import comm_device

    error = None
    batches: list[dict] = []
    try:
        batches = [next(data_iter) for _ in range(count)]
    except UserError as exc:
        error = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():  # one host sync a step (on a GPU), the only one this adds
            messages: list = [None] * dist.get_world_size()
            dist.all_gather_object(messages, None if error is None else str(error))
            if error is None:
                rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
                raise DataError(f"rank {rank} stopped on bad data: {message}")
    if error is not None:
        raise error
    return batches
