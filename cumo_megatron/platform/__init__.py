"""Device and process-group bring-up, and the CPU adaptations of megatron-core."""

from cumo_megatron.platform.cpu import activate as activate_cpu_adaptations
from cumo_megatron.platform.cpu import cuda_available
from cumo_megatron.platform.distributed import ParallelSizes, destroy, initialize, seed_everything

__all__ = [
    "ParallelSizes",
    "activate_cpu_adaptations",
    "cuda_available",
    "destroy",
    "initialize",
    "seed_everything",
]
