"""The simulated device of placement audits: placement, data-dependent ops, autograd, violations,
and a placement audit of the tiny CuMo model's forward/backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers.simulated_device import (
    PlacementError,
    SimulatedTensor,
    audit_module,
    simulated_device,
    where,
)

META = torch.device("meta")


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("offset", torch.arange(3.0))

    def forward(self, x):
        return self.norm(self.lin(x)) + self.offset


def _sim(x: torch.Tensor) -> torch.Tensor:
    with simulated_device():
        return x.to(META)


def test_module_to_meta_places_every_parameter_and_buffer():
    model = _Small()
    model.lin.weight.tensor_model_parallel = True  # megatron-style attribute must survive the move
    model.norm.bias.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    with simulated_device() as sim:
        moved = model.to(sim.device)
    assert moved is model
    assert audit_module(model) == []
    assert [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()] == names
    for p in model.parameters():
        assert isinstance(p, nn.Parameter) and isinstance(p, SimulatedTensor) and p.device == META
    assert model.lin.weight.requires_grad and not model.norm.bias.requires_grad
    assert model.lin.weight.tensor_model_parallel is True
    # The negative control of audit_module itself: a buffer left on the CPU is named.
    model.offset = torch.zeros(3)
    assert audit_module(model) == ["offset"]


def test_forward_backward_give_simulated_outputs_and_grads_equal_to_cpu():
    torch.manual_seed(0)
    ref, x = _Small(), torch.randn(5, 4)
    model = _Small()
    model.load_state_dict(ref.state_dict())
    ref(x).float().pow(2).mean().backward()
    with simulated_device() as sim:
        model.to(sim.device)
        out = model(x.to(sim.device))
        out.float().pow(2).mean().backward()
    assert where(out) == "simulated" and sim.violations == []
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert where(p.grad) == "simulated", name
        torch.testing.assert_close(p.grad.cpu(), p_ref.grad)
    # Outside the block the model keeps working on simulated inputs (a second, accumulating pass).
    model(_sim(x)).sum().backward()
    assert where(model.lin.weight.grad) == "simulated"


def test_a_cpu_tensor_mixed_in_is_a_violation_and_a_cpu_scalar_is_not():
    model = _Small()
    with simulated_device() as sim:
        model.to(sim.device)
        x = torch.randn(2, 4, device=sim.device)
        out = model(x) * torch.tensor(2.0)  # 0-dim CPU scalar: CUDA allows it
        assert sim.violations == []
        stray = torch.ones(3)  # the bug to catch: a CPU tensor with ndim > 0 ...
        out = out + stray  # ... mixed into a device op
        torch.ones(3) + torch.ones(3)  # CPU-only bookkeeping: fine
    assert where(out) == "simulated"  # collecting mode carries on
    [v] = sim.violations
    assert v.op == "aten.add.Tensor" and v.simulated_shapes == [(2, 3)] and v.cpu_shapes == [(3,)]
    assert v.stack[-1].startswith("tests/helpers/test_simulated_device.py:")
    [origin] = v.cpu_origins  # where the CPU tensor was made: here, inside the block
    assert origin.startswith("tests/helpers/test_simulated_device.py:") and origin != v.stack[-1]
    assert "1x aten.add.Tensor" in sim.report()

    with simulated_device(strict=True) as sim, pytest.raises(PlacementError, match="same device"):
        torch.zeros(2, 3, device=sim.device) + torch.ones(3)
    with pytest.raises(PlacementError):  # outside any block, as on a GPU
        x + torch.ones(4)


def test_cuda_exemptions_are_not_violations():
    """CPU index tensors, host-to-device copies and ``.cpu()`` are legal on CUDA."""
    with simulated_device() as sim:
        x = torch.arange(6.0, device=sim.device).view(2, 3).requires_grad_()
        picked = x[torch.tensor([1, 0])]
        y = torch.zeros(2, 3, device=sim.device)
        y[torch.tensor([0])] = 5.0
        y[1:] = torch.ones(1, 3)  # a slice assignment is a copy_
        assert sim.violations == []
        y[torch.tensor([0])] = torch.ones(1, 3)  # index_put_ values must be on the device
        [v] = sim.violations
        assert v.op == "aten.index_put_.default" and v.cpu_shapes == [(3,)]
        sim.violations.clear()
        y.copy_(torch.full((2, 3), 7.0))
        host = (x * 2).cpu()
        host.sum().backward()
    assert sim.violations == []
    assert where(picked) == "simulated" and picked.tolist() == [[3, 4, 5], [0, 1, 2]]
    assert where(host) == "cpu" and host.tolist() == [[0, 2, 4], [6, 8, 10]]
    assert where(x.grad) == "simulated" and x.grad.tolist() == [[2.0] * 3] * 2
    assert y.tolist() == [[7.0] * 3] * 2


def test_placement_calls_make_simulated_tensors():
    base = torch.randn(2, 3)
    with simulated_device(cuda_is_simulated=True) as sim:
        made = {
            "to(str)": base.to("meta"),
            "to(device)": base.to(torch.device("meta")),
            "to(device=, dtype=)": base.to(device=sim.device, dtype=torch.bfloat16),
            "to(other)": base.to(torch.ones(1, device=sim.device)),
            "ones": torch.ones(1, device=sim.device),
            "zeros": torch.zeros(2, device="meta"),
            "empty": torch.empty(2, 2, device=sim.device),
            "full": torch.full((2,), 3.0, device=sim.device),
            "arange": torch.arange(4, device=sim.device),
            "tensor": torch.tensor([1, 2], device=sim.device),
            "cuda str": torch.zeros(2, device="cuda"),
            "current_device": torch.zeros(2, device=torch.cuda.current_device()),
            "Tensor.cuda": base.cuda(),
        }
        sim_base = base.to(sim.device)
        made.update({
            "new_zeros": sim_base.new_zeros(3), "new_ones": sim_base.new_ones(1),
            "new_full": sim_base.new_full((2,), 1.0), "new_empty": sim_base.new_empty(2),
            "new_tensor": sim_base.new_tensor([1.0, 2.0]),
            "zeros_like": torch.zeros_like(sim_base), "randn_like": torch.randn_like(sim_base),
            "empty_like": torch.empty_like(sim_base), "full_like": torch.full_like(sim_base, 2.0),
        })
        cpu_made = torch.ones(2, device="cpu")
    assert {k: where(v) for k, v in made.items() if where(v) != "simulated"} == {}
    assert where(cpu_made) == "cpu"
    assert made["to(device=, dtype=)"].dtype == torch.bfloat16
    assert made["tensor"].tolist() == [1, 2] and made["full"].tolist() == [3.0, 3.0]
    assert made["to(str)"] is not None and torch.equal(made["to(str)"].cpu(), base)
    with simulated_device(cuda_is_simulated=False):
        assert where(torch.zeros(2, device="cuda" if torch.cuda.is_available() else "cpu")) != "simulated"


def test_data_dependent_and_routing_ops_match_cpu():
    torch.manual_seed(1)
    logits = torch.randn(8, 4)
    with simulated_device() as sim:
        s = logits.to(sim.device)
        probs = torch.softmax(s.to(torch.bfloat16).float(), dim=-1)
        top_p, top_i = torch.topk(probs, k=2, dim=-1)
        counts = torch.histc(top_i.float(), bins=4, min=0, max=3)
        sizes = counts.long().tolist()
        order = top_i.flatten().argsort()
        chunks = torch.split(s.repeat_interleave(2, dim=0).index_select(0, order), sizes)
        summed = torch.zeros(4, 4, device=sim.device).scatter_add_(0, top_i[:, :1].expand(-1, 4), s)
        mask = s > 0
        scattered = torch.zeros_like(s).masked_scatter(mask, s[mask] * 10)
        biggest = s.max().item()
    assert sim.violations == []
    ref_probs = torch.softmax(logits.to(torch.bfloat16).float(), dim=-1)
    ref_p, ref_i = torch.topk(ref_probs, k=2, dim=-1)
    assert sizes == torch.histc(ref_i.float(), bins=4, min=0, max=3).long().tolist()
    assert sum(sizes) == 16 and [c.shape[0] for c in chunks] == sizes
    assert all(where(c) == "simulated" for c in chunks)
    torch.testing.assert_close(top_p.cpu(), ref_p)
    assert probs.dtype == torch.float32 and biggest == logits.max().item()
    ref_sum = torch.zeros(4, 4).scatter_add_(0, ref_i[:, :1].expand(-1, 4), logits)
    torch.testing.assert_close(summed.cpu(), ref_sum)
    torch.testing.assert_close(scattered.cpu(), torch.where(logits > 0, logits * 10, 0.0))


class _ScaleGrad(torch.autograd.Function):
    """y = x * w, whose backward also allocates on the current device, as megatron's do."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        bias = torch.zeros(1, device=torch.cuda.current_device())
        return grad * w + bias, (grad * x).sum(0)


def test_custom_autograd_function_runs_forward_and_backward():
    x, w = torch.randn(3, 2), torch.randn(2)
    with simulated_device() as sim:
        xs = x.to(sim.device).requires_grad_()
        ws = w.to(sim.device).requires_grad_()
        y = _ScaleGrad.apply(xs, ws)
        torch.autograd.backward([y.sum()])
    assert sim.violations == []
    assert where(y) == "simulated" and where(xs.grad) == "simulated" and where(ws.grad) == "simulated"
    torch.testing.assert_close(xs.grad.cpu(), w.expand(3, 2))
    torch.testing.assert_close(ws.grad.cpu(), x.sum(0))
