"""A simulated accelerator for placement audits on a CPU-only host.

On a GPU every parameter, buffer, batch tensor and small helper tensor (the MoE aux-loss scale,
masks made in ``forward``) must be on the GPU; a CPU tensor of one or more dimensions mixed into a
GPU op crashes the run ("expected all tensors to be on the same device"). On a CPU-only host
nothing catches such a bug, and the ``meta`` device cannot stand in for the GPU because MoE
routing needs real data (``.tolist()``, ``.item()``, ``torch.histc``, data-dependent splits).

`SimulatedTensor` reports the device ``meta`` but holds a real CPU tensor; every aten op unwraps
its inputs, runs on the CPU data and wraps tensor outputs again, so data-dependent code runs and
autograd (including custom ``autograd.Function``s) works. Inside `simulated_device()`, placing
anything on ``torch.device("meta")`` (``Tensor.to``, ``Module.to``, factories with ``device=``,
``new_*``, ``*_like``) makes simulated tensors, and by default ``"cuda"`` / integer device
indices / ``torch.cuda.current_device()`` mean the simulated device too, as they would on a GPU.

Usage::

    with simulated_device() as sim:
        model.to(sim.device)
        loss = model(x.to(sim.device)).mean()
        loss.backward()
    assert audit_module(model) == []
    print(sim.report())

What counts as a violation: an aten op that receives at least one simulated tensor and at least
one plain CPU tensor with ``ndim > 0``. Exempt, as CUDA allows them: 0-dim CPU tensors (CPU
scalars), CPU index tensors of ``aten.index`` / ``aten.index_put_`` (advanced indexing), and the
source of ``aten.copy_`` (``gpu_tensor.copy_(cpu_tensor)``, ``gpu[idx] = cpu``). Ops on plain CPU
tensors only are CPU-side bookkeeping and never violations. In collecting mode (``strict=False``)
the op then runs on the CPU data and the output is simulated, so one run lists every violation;
``strict=True`` raises at the first, like CUDA would. Outside `simulated_device()` a mixed op
always raises.

Limits:

* No storage: ``data_ptr()``, ``untyped_storage()``, ``numpy()`` of a simulated tensor fail (use
  ``.cpu()`` first, as on a GPU). Collectives (``torch.distributed``) on simulated tensors are not
  supported; run with world size one where megatron skips them.
* In-place ops that change a tensor's metadata (``resize_``, ``set_``, ``t_``, ``as_strided_``...)
  raise `NotImplementedError` when the shape or strides change: the wrapper's metadata is fixed
  at creation.
* A real (data-less) ``meta`` tensor reaching a simulated op raises: it means something made a
  meta tensor outside the context (e.g. torch internals that exclude Python dispatch).
* Only one thread: torch-function and dispatch modes are per thread.
* ``torch.cuda.is_available()`` stays False, so code that branches on it takes its CPU path.
* Slow (two Python hops per op): for small models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

# Tensor.backward / torch.autograd.backward are re-run with the mode pushed again through the same
# bodies the CPU platform's mode uses, so the whole backward pass stays on the simulated device.
from cumo_megatron.platform.cpu import _engine_backward, _tensor_backward

SIM_DEVICE = torch.device("meta")
_CPU = torch.device("cpu")
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)

aten = torch.ops.aten
# Ops where CUDA accepts CPU tensors of any rank in the given positional argument(s): index
# tensors of advanced indexing, and the source of a host-to-device copy.
_CPU_OK_ARGS = {
    aten.index.Tensor: {1},
    aten.index_put.default: {1},
    aten.index_put_.default: {1},
    aten._index_put_impl_.default: {1},
    aten.copy_.default: {1},
}


@dataclasses.dataclass
class Violation:
    """One op that mixed simulated-device tensors with plain CPU tensors of ndim > 0."""

    op: str
    simulated_shapes: list[tuple[int, ...]]
    cpu_shapes: list[tuple[int, ...]]
    stack: list[str]  # "file:line in function", innermost last, torch frames left out
    # Per CPU tensor: the frame of the op that made it inside the audit, or "before the audit".
    cpu_origins: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        where = " <- ".join(reversed(self.stack)) or "?"
        made = f" (cpu made at {', '.join(self.cpu_origins)})" if self.cpu_origins else ""
        return f"{self.op}: simulated {self.simulated_shapes}, cpu {self.cpu_shapes} at {where}{made}"


class PlacementError(RuntimeError):
    """A simulated-device op received a CPU tensor (strict mode, or outside the context)."""


def _caller_stack(depth: int = 3) -> list[str]:
    # The innermost frames outside torch and this file: the code that issued the op.
    frames = [
        f for f in traceback.extract_stack()
        if not f.filename.startswith(_TORCH_DIR) and os.path.abspath(f.filename) != _THIS_FILE
        # other torch-function modes on the stack (the platform's CudaToCpuMode) are plumbing
        and f.name not in ("__torch_function__", "__torch_dispatch__")
    ]
    return [f"{_short_path(f.filename)}:{f.lineno} in {f.name}" for f in frames[-depth:]]


def _short_path(path: str) -> str:
    # Paths as a reader finds them: relative to the checkout, or to site-packages (megatron/...).
    cwd = os.getcwd() + os.sep
    if path.startswith(cwd):
        return path[len(cwd):]
    marker = os.sep + "site-packages" + os.sep
    return path.split(marker, 1)[1] if marker in path else path


class SimulatedTensor(torch.Tensor):
    """A tensor that reports the simulated device (``meta``) and holds real CPU data in ``_data``."""

    _data: torch.Tensor
    __slots__ = ["_data"]

    @staticmethod
    def __new__(cls, data: torch.Tensor, requires_grad: bool = False):
        if isinstance(data, SimulatedTensor) or data.device.type != "cpu":
            raise TypeError(f"SimulatedTensor wraps a plain CPU tensor, got {type(data).__name__} on {data.device}")
        r = torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, layout=data.layout, device=SIM_DEVICE, requires_grad=requires_grad,
        )
        r._data = data
        return r

    # Only __torch_dispatch__ is customised; torch-function handling stays the default one.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self):
        """The data as nested Python lists (a device-to-host read, as on a GPU)."""
        return self._data.tolist()

    def __repr__(self) -> str:  # the stock repr prints "..." for meta tensors
        grad = f", grad_fn={type(self.grad_fn).__name__}" if self.grad_fn is not None else ""
        return f"SimulatedTensor({self._data!r}{grad})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check_placement(func, args, kwargs)
        explicit_cpu = _is_cpu(kwargs.get("device"))
        if _is_sim(kwargs.get("device")):
            kwargs = dict(kwargs, device=_CPU)
        flat, spec = tree_flatten((args, kwargs))
        owner = {}  # id(inner data) -> wrapper, to return the wrapper from in-place / out= ops
        for i, a in enumerate(flat):
            if isinstance(a, SimulatedTensor):
                owner[id(a._data)] = a
                flat[i] = a._data
            elif isinstance(a, torch.Tensor) and a.device.type == "meta":
                raise PlacementError(
                    f"{func}: a real (data-less) meta tensor {tuple(a.shape)} reached a simulated op; "
                    f"it was made outside simulated_device() or by code that bypasses Python dispatch"
                )
        uargs, ukwargs = tree_unflatten(flat, spec)
        out = func(*uargs, **ukwargs)
        if explicit_cpu:  # e.g. .cpu(), .to("cpu"), new_empty(device="cpu"): a real CPU tensor
            return out

        def rewrap(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, SimulatedTensor):
                return t
            wrapper = owner.get(id(t))
            if wrapper is not None:  # in-place or out=: the caller's own tensor comes back
                if wrapper.shape != t.shape or wrapper.stride() != t.stride():
                    raise NotImplementedError(f"{func} changes a simulated tensor's metadata in place")
                return wrapper
            return SimulatedTensor(t)

        return tree_map(rewrap, out)


def _is_sim(device) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == SIM_DEVICE.type


def _is_cpu(device) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == "cpu"


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an index means cuda:<index>


# The innermost active audit, where violations go (None outside any `simulated_device()`).
_ACTIVE: list["SimulatedDevice"] = []


def _check_placement(func, args, kwargs) -> None:
    sims, cpus, cpu_tensors = [], [], []
    cpu_ok = _CPU_OK_ARGS.get(func, ())
    for i, a in enumerate(args):
        if i in cpu_ok:
            continue
        for t in tree_flatten(a)[0]:
            _classify(t, sims, cpu_tensors)
    for t in tree_flatten(kwargs)[0]:
        _classify(t, sims, cpu_tensors)
    if not (sims and cpu_tensors):
        return
    audit = _ACTIVE[-1] if _ACTIVE else None
    cpus = [tuple(t.shape) for t in cpu_tensors]
    origins = [audit.origins.get(t, "before the audit") for t in cpu_tensors] if audit else []
    v = Violation(str(func), sims, cpus, _caller_stack(), origins)
    if audit is None or audit.strict:
        raise PlacementError(f"Expected all tensors to be on the same device: {v}")
    audit.violations.append(v)


def _classify(t, sims, cpu_tensors) -> None:
    if isinstance(t, SimulatedTensor):
        sims.append(tuple(t.shape))
    elif isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0:
        cpu_tensors.append(t)


class _ToSimulated(torch.autograd.Function):
    """CPU -> simulated copy, differentiable like a host-to-device ``.to()``."""

    @staticmethod
    def forward(ctx, x, dtype):
        data = x.detach().to(dtype=dtype or x.dtype, copy=True)
        return SimulatedTensor(data)

    @staticmethod
    def backward(ctx, grad):
        return (grad._data if isinstance(grad, SimulatedTensor) else grad), None


def to_simulated(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A simulated-device copy of the plain CPU tensor ``x`` (keeps autograd history)."""
    if isinstance(x, SimulatedTensor):
        return x if dtype in (None, x.dtype) else x.to(dtype)
    return _ToSimulated.apply(x, dtype)


def _wrap_outputs(out):
    # Factories ran on the CPU in place of the simulated device: wrap what they made.
    def wrap(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, SimulatedTensor):
            return to_simulated(t) if t.requires_grad else SimulatedTensor(t)
        return t

    return tree_map(wrap, out)


class _PlacementMode(TorchFunctionMode):
    """Turns placements on the simulated device (and, optionally, CUDA) into simulated tensors.

    Works at the torch-function level because ``torch.tensor(..., device=)`` builds its tensor
    with Python dispatch excluded, and ``Module.to`` must see ``Tensor.to`` to carry parameter
    attributes (megatron's ``tensor_model_parallel``, ``allreduce``...) onto the new parameters.
    """

    def __init__(self, cuda_is_simulated: bool):
        super().__init__()
        self.cuda_is_simulated = cuda_is_simulated

    def _target(self, device) -> bool:
        return _is_sim(device) or (self.cuda_is_simulated and _is_cuda(device))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # A mode is popped while it handles a call: push it again for the whole backward pass
        # (custom Function.backward, hooks), as CudaToCpuMode does.
        if func is torch.Tensor.backward:
            with self:
                return _tensor_backward(*args, **kwargs)
        if func is torch.autograd.backward:
            with self:
                return _engine_backward(*args, **kwargs)
        if func is torch.Tensor.new_tensor and isinstance(args[0], SimulatedTensor) and "device" not in kwargs:
            # Like torch.tensor it builds its result with Python dispatch off, on self's device:
            # that would be a real, data-less meta tensor.
            kwargs = dict(kwargs, device=SIM_DEVICE)
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if func is torch.Tensor.cuda and self.cuda_is_simulated:
            return to_simulated(args[0])
        if func is torch.Tensor.detach:
            out = func(*args, **kwargs)
            carried = getattr(args[0], "_sim_carry", None)
            if carried:  # Parameter(simulated) detaches: keep the old parameter's attributes
                out.__dict__.update(carried)
            return out
        if getattr(func, "__name__", "") == "__set__" and len(args) == 2 and isinstance(args[0], SimulatedTensor):
            # `sim.data = other`: the wrapper's metadata changes, so must its CPU data.
            func(*args, **kwargs)
            if isinstance(args[1], SimulatedTensor):
                args[0]._data = args[1]._data
            return None
        if "device" in kwargs and self._target(kwargs["device"]):
            requires_grad = kwargs.get("requires_grad", False)
            kwargs = dict(kwargs, device=_CPU)
            kwargs.pop("requires_grad", None)
            out = _wrap_outputs(func(*args, **kwargs))
            if requires_grad:
                out.requires_grad_()
            return out
        return func(*args, **kwargs)

    def _to(self, func, args, kwargs):
        x = args[0]
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
        if device is None or not self._target(device):
            return func(*args, **kwargs)
        if isinstance(x, SimulatedTensor):
            if dtype is None or dtype == x.dtype:
                return x.clone() if kwargs.get("copy") else x
            return x.to(dtype)
        out = to_simulated(x, dtype)
        if isinstance(x, torch.nn.Parameter) and x.__dict__:
            out._sim_carry = dict(x.__dict__)
        return out


class _FactoryDispatchMode(TorchDispatchMode):
    """Catches ``device=meta`` allocations made below Python (autograd engine zero-fills,
    ``ToCopyBackward``), which the torch-function mode never sees; and, with ``origins``, notes
    where each plain CPU tensor of ndim > 0 was made, so a violation can name the culprit's
    birthplace and not only the op that finally mixed it in."""

    def __init__(self, origins: "WeakIdKeyDictionary | None"):
        super().__init__()
        self.origins = origins

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        has_sim = any(isinstance(t, SimulatedTensor) for t in flat)
        if _is_sim(kwargs.get("device")) and not has_sim:
            out = func(*args, **dict(kwargs, device=_CPU))
            return tree_map(lambda t: SimulatedTensor(t) if isinstance(t, torch.Tensor) else t, out)
        out = func(*args, **kwargs)
        if self.origins is not None:
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and not isinstance(t, SimulatedTensor)
                        and t.device.type == "cpu" and t.dim() > 0):
                    self.origins[t] = (_caller_stack(1) or ["?"])[0]
        return out


class SimulatedDevice:
    """The state of one `simulated_device()` block: its ``device`` and the ``violations`` found."""

    def __init__(self, strict: bool, track_origins: bool):
        self.strict = strict
        self.device = SIM_DEVICE
        self.violations: list[Violation] = []
        # CPU tensor -> frame that made it (weak: the audit must not keep tensors alive)
        self.origins = WeakIdKeyDictionary() if track_origins else None

    def summary(self) -> list[tuple[Violation, int]]:
        """Distinct violations (same op and stack) with how often each happened, first seen first."""
        seen: dict[tuple, list] = {}
        for v in self.violations:
            key = (v.op, tuple(v.stack), tuple(v.simulated_shapes), tuple(v.cpu_shapes), tuple(v.cpu_origins))
            seen.setdefault(key, [v, 0])[1] += 1
        return [(v, n) for v, n in seen.values()]

    def report(self) -> str:
        """One line per distinct violation; empty when none."""
        return "\n".join(f"{n}x {v}" for v, n in self.summary())


@contextlib.contextmanager
def simulated_device(
    strict: bool = False, cuda_is_simulated: bool = True, track_origins: bool = True,
) -> Iterator[SimulatedDevice]:
    """Make placements on ``meta`` (and CUDA, unless ``cuda_is_simulated`` is False) simulated.

    ``strict``: raise `PlacementError` at the first violation instead of collecting them.
    ``cuda_is_simulated``: ``"cuda"``, integer indices and ``torch.cuda.current_device()`` mean
    the simulated device, as on a GPU host (the CPU platform otherwise maps them to the CPU, and
    megatron's "allocate on the current device" would then look like a violation).
    ``track_origins``: note where each CPU tensor made inside the block came from (a stack walk
    per CPU op; turn off for speed), reported in `Violation.cpu_origins`.
    Tensors made inside stay simulated after the block; ops mixing them with CPU tensors outside
    any block raise.
    """
    audit = SimulatedDevice(strict, track_origins)
    saved_current_device = torch.cuda.current_device
    if cuda_is_simulated:
        torch.cuda.current_device = lambda: SIM_DEVICE
    _ACTIVE.append(audit)
    try:
        # Pushed last, so it sees calls before the platform's CudaToCpuMode (a stack).
        with _FactoryDispatchMode(audit.origins), _PlacementMode(cuda_is_simulated):
            yield audit
    finally:
        _ACTIVE.remove(audit)
        torch.cuda.current_device = saved_current_device


def where(t: Any) -> str:
    """``"simulated"`` for a simulated tensor, else the device type (``"cpu"``, ``"meta"``...)."""
    if isinstance(t, SimulatedTensor):
        return "simulated"
    if isinstance(t, torch.Tensor):
        return t.device.type
    return type(t).__name__


def audit_module(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on the simulated device."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return [name for name, t in named if where(t) != "simulated"]
