"""Process bring-up: torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel state.

Works the same under ``torchrun`` (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and in a
plain ``python`` process, which becomes a world of one.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from cumo_megatron.platform import cpu


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes; data parallelism is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel size; None means megatron's default (= tp)
    cp: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks, with a clear error when the sizes do not divide it."""
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp}; change the launch or parallel.* settings"
            )
        dp = world_size // model_parallel
        expert_model = (self.etp or self.tp) * self.ep * self.pp
        if world_size % expert_model:
            raise ValueError(
                f"world size {world_size} is not divisible by etp*ep*pp = {self.etp or self.tp}"
                f"*{self.ep}*{self.pp}; change parallel.ep or parallel.etp"
            )
        return dp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_backend() -> str:
    """nccl when CUDA is present, gloo otherwise."""
    return "nccl" if cpu.cuda_available() else "gloo"


def set_cpu_threads() -> int:
    """Give each local process an equal share of the cores (``CUMO_CPU_THREADS`` overrides).

    Two OpenMP pools spinning on the same two cores slow small matmuls down ~100x (measured here:
    23 ms vs 0.27 ms for a 64x64 matmul forward+backward under a second busy process).
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(os.environ.get("CUMO_CPU_THREADS", "0")) or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    return threads


def init_process_group(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's environment, or as a world of one."""
    cpu.activate()
    if dist.is_initialized():
        return
    if not cpu.cuda_available():
        set_cpu_threads()
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )


_current_sizes: ParallelSizes | None = None  # what megatron's groups were last made for


def _destroy_model_parallel_groups() -> None:
    """Destroy megatron's process groups, then its bookkeeping.

    ``parallel_state.destroy_model_parallel`` only forgets the groups: each gloo group keeps its
    threads (two per group) until destroyed, and a long test session that re-creates the groups
    would pile up thousands of them.
    """
    groups = {}
    for value in vars(parallel_state).values():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for group in candidates:
            if isinstance(group, dist.ProcessGroup) and group is not dist.group.WORLD:
                groups[id(group)] = group
    parallel_state.destroy_model_parallel()
    for group in groups.values():
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError):  # already destroyed, or not a group of this process
            pass


def initialize(sizes: ParallelSizes = ParallelSizes(), seed: int = 1234, backend: str | None = None) -> None:
    """Bring up torch.distributed and megatron's TP/PP/EP/CP/DP groups, and seed every RNG stream.

    Safe to call again (tests do): with the same sizes the groups are kept and only the RNGs are
    re-seeded; different sizes destroy the old groups and make new ones.
    """
    global _current_sizes
    init_process_group(backend)
    sizes.data_parallel_size(dist.get_world_size())
    if not (parallel_state.model_parallel_is_initialized() and _current_sizes == sizes):
        if parallel_state.model_parallel_is_initialized():
            _destroy_model_parallel_groups()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=sizes.tp,
            pipeline_model_parallel_size=sizes.pp,
            context_parallel_size=sizes.cp,
            expert_model_parallel_size=sizes.ep,
            expert_tensor_parallel_size=sizes.etp,
        )
        _current_sizes = sizes
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed every random stream of this rank; the rules are the same on CPU and GPU.

    - Python's `random` and numpy's global generator: ``seed + 100 * pipeline rank``, megatron's
      training rule (pipeline stages draw different values, data-parallel replicas the same).
    - torch's default generator (CPU, and every CUDA device's): ``seed`` on every rank. Model
      initialisation draws from it, and every layout must build the same weights.
    - megatron's tracked streams (model-, data- and expert-parallel; dropout inside TP regions
      and initialisation forks): `model_parallel_cuda_manual_seed`, which offsets per TP/EP rank.

    A checkpoint saves and restores all of them (`training.checkpointing.rng_state`).
    """
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    offset_seed = seed + 100 * pp_rank
    random.seed(offset_seed)
    np.random.seed(offset_seed % 2**32)  # numpy's legacy seeding takes 32 bits
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy() -> None:
    """Tear down megatron's groups and the process group."""
    global _current_sizes
    if parallel_state.model_parallel_is_initialized():
        _destroy_model_parallel_groups()
    _current_sizes = None
    if dist.is_initialized():
        dist.destroy_process_group()
