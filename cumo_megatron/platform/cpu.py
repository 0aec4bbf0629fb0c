"""Every CPU adaptation of megatron-core, in one place, active only when CUDA is absent.

megatron-core 0.16.1 assumes CUDA in many places (../shared/DESIGN.md, section 3). On a CPU-only
host `activate()` installs the following ways round, each tested in `tests/platform/test_cpu.py`:

1. `torch.cuda.current_device()` returns the CPU device, so tensors that megatron allocates "on the
   current device" (TP mappings, DDP grad buffers, the checkpoint saver) land on the CPU.
2. `torch.cuda.synchronize()` is a no-op (checkpoint preload, p2p, timers).
3. megatron's CUDA RNG tracker (dropout and initialisation forks, activation recompute) becomes a
   tracker of CPU generator states with the same interface.
4. A `TorchFunctionMode` maps ``device="cuda"`` (and integer device indices) in factory calls and
   ``.to()`` to the CPU, makes ``Tensor.cuda()`` return the tensor, and reports a CPU tensor's
   ``.type()`` in its ``torch.cuda.`` form, which megatron's optimizer and DDP code compare against.
   It stays active through the backward pass (hooks, ``autograd.Function.backward``, recompute),
   in the thread that called `activate()` (torch-function modes are per thread).

5. CLIP's quick_gelu runs eagerly (`quick_gelu_impl`): megatron wraps it in ``torch.compile``, and
   on a CPU inductor spends 5-20 s compiling C++ per process for a one-line activation.
6. `transformer_config_overrides`: no per-batch synchronize in pipeline p2p, weights made on the CPU.
7. ``torch.distributed.all_reduce`` with ``ReduceOp.AVG`` (megatron's ``finalize_model_grads``
   averages the gradients of TP-replicated modules with it) runs as a SUM followed by a division:
   gloo has no AVG.

On a machine with CUDA none of this is installed and the stock megatron-core + TE path runs.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_LOG = logging.getLogger(__name__)
_ACTIVE = False
_MODE: "CudaToCpuMode | None" = None


def cuda_available() -> bool:
    """True when a usable CUDA device exists (then no CPU adaptation is installed)."""
    return torch.cuda.is_available()


def is_active() -> bool:
    """Whether the CPU adaptations are installed in this process."""
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer means "cuda:<index>" to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placements to the CPU for code written with CUDA literals.

    A mode is popped while it handles a call, and torch routes ``Tensor.backward`` and
    ``torch.autograd.backward`` through torch-function handling; without care the whole backward
    pass (autograd hooks such as DDP's, ``autograd.Function.backward``, activation recompute)
    would run without the mode. Backward calls are therefore re-run with the mode pushed again.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            with self:  # dispatches again, as torch.autograd.backward, to the branch below
                return _tensor_backward(*args, **kwargs)
        if func is torch.autograd.backward and _HAVE_ENGINE_BACKWARD:
            with self:
                return _engine_backward(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to:
            args, kwargs = _cpu_to_args(args, kwargs)
        elif "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        return func(*args, **kwargs)


def _tensor_backward(tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    # Tensor.backward's own body, which forwards to torch.autograd.backward.
    torch.autograd.backward(tensor, gradient, retain_graph, create_graph, inputs=inputs)


try:
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    _HAVE_ENGINE_BACKWARD = True
except ImportError:  # another torch: the backward pass then runs without the mode
    _HAVE_ENGINE_BACKWARD = False


def _engine_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    # The rest of torch.autograd.backward after its torch-function check (torch 2.14); torch has
    # already normalised ``tensors`` and ``inputs`` to tuples when it hands the call to a mode.
    grads = _tensor_or_tensors_to_tuple(grad_tensors, len(tensors))
    grads = _make_grads(tensors, grads, is_grads_batched=False)
    if retain_graph is None:
        retain_graph = create_graph
    _engine_run_backward(
        tensors, grads, retain_graph, create_graph, tuple(inputs or ()),
        allow_unreachable=True, accumulate_grad=True,
    )


def _cpu_to_args(args, kwargs):
    # Tensor.to(device), Tensor.to(device, dtype), Tensor.to(device=...)
    if len(args) > 1 and _is_cuda_device(args[1]):
        args = (args[0], _CPU, *args[2:])
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs = dict(kwargs, device=_CPU)
    return args, kwargs


class CpuRNGStatesTracker:
    """megatron's `CudaRNGStatesTracker` interface over CPU generator states.

    Named states (data-parallel, model-parallel, expert-parallel) are forked exactly as on GPU:
    inside ``fork(name)`` the default CPU generator holds that named stream.
    """

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = is_inference_rng_tracker
        self.reset()

    def is_initialized(self) -> bool:
        """Whether `add` or `set_states` has been called."""
        return self._is_initialized

    def reset(self) -> None:
        """Forget every named state."""
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of the name -> state mapping (for checkpoints)."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore states from `get_states`."""
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Create the named stream seeded with ``seed``."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        """Run the block with the named stream as the default CPU generator state."""
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _install_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # initialize_rng_tracker() instantiates `CudaRNGStatesTracker` by module-level name.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recompute saves and restores "the CUDA RNG state": use the CPU one.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


def _install_gloo_average() -> None:
    import torch.distributed as dist

    sum_all_reduce = dist.all_reduce

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op != dist.ReduceOp.AVG:
            return sum_all_reduce(tensor, op=op, group=group, async_op=async_op)
        if async_op:
            raise NotImplementedError("ReduceOp.AVG with async_op=True has no gloo emulation")
        result = sum_all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(dist.get_world_size(group))
        return result

    all_reduce.__doc__ = sum_all_reduce.__doc__
    dist.all_reduce = all_reduce


def activate() -> bool:
    """Install the CPU adaptations if CUDA is absent. Idempotent; returns whether they are active."""
    global _ACTIVE, _MODE
    if _ACTIVE or cuda_available():
        return _ACTIVE
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _install_rng()
    _install_gloo_average()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _ACTIVE = True
    _LOG.info("CUDA absent: megatron-core CPU adaptations active")
    return True


def transformer_config_overrides() -> dict:
    """Fields of megatron's `TransformerConfig` that must differ when CUDA is absent.

    Pipeline p2p calls ``cuda.synchronize`` per batch unless ``batch_p2p_sync`` is off, and
    weights are created on the CPU directly.
    """
    if cuda_available():
        return {}
    return {"batch_p2p_sync": False, "use_cpu_initialization": True}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``, eager."""
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_impl():
    """megatron's compiled quick_gelu on GPU; the eager one without CUDA (no inductor compile)."""
    if cuda_available():
        from megatron.core.activations import quick_gelu as compiled_quick_gelu

        return compiled_quick_gelu
    return quick_gelu
