"""Each CPU adaptation of megatron-core (`cumo_megatron.platform.cpu`), tested where megatron needs it.

All tests run in this process as a world of one (the platform brings torch.distributed up once);
the inactive-with-CUDA check runs in a subprocess because the adaptations cannot be uninstalled.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import random as mrandom

from cumo_megatron.platform import ParallelSizes, cpu, initialize, seed_everything
from cumo_megatron.platform.distributed import set_cpu_threads

ROOT = Path(__file__).resolve().parents[2]
SEED = 1234


@pytest.fixture(autouse=True)
def world_of_one():
    """Every test starts from a freshly initialised world of one with the same seed."""
    initialize(ParallelSizes(), seed=SEED)
    yield


# --- 1. torch.cuda.current_device() -> CPU ----------------------------------------------------


def test_current_device_is_cpu():
    """Without CUDA, torch.cuda.current_device() would raise; megatron allocates on its result."""
    assert cpu.is_active()
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_megatron_global_memory_buffer_and_mappings_on_cpu():
    """megatron's global memory buffer allocates on current_device(); the SP mappings run (world of one)."""
    buffer = parallel_state.get_global_memory_buffer()
    scratch = buffer.get_tensor((2, 3), torch.float32, "cumo-test")
    assert scratch.device.type == "cpu" and tuple(scratch.shape) == (2, 3)

    x_sbh = torch.randn(4, 2, 3, requires_grad=True)
    gathered = tensor_parallel.gather_from_sequence_parallel_region(x_sbh)
    scattered = tensor_parallel.reduce_scatter_to_sequence_parallel_region(gathered)
    scattered.sum().backward()
    assert gathered.device.type == "cpu"
    torch.testing.assert_close(scattered, x_sbh, rtol=0, atol=0)
    torch.testing.assert_close(x_sbh.grad, torch.ones_like(x_sbh), rtol=0, atol=0)
    # The TP=2 allocation paths of these mappings run in tests/platform/test_distributed.py.


# --- 2. torch.cuda.synchronize() no-op ------------------------------------------------------


def test_synchronize_is_a_noop():
    """Checkpoint preload, p2p and timers call torch.cuda.synchronize(); on CPU it must not raise."""
    assert torch.cuda.synchronize() is None
    assert torch.cuda.synchronize(0) is None


# --- 3. CPU RNG tracker ------------------------------------------------------------------------


def _draw(tracker, name: str = "model-parallel-rng", n: int = 8) -> torch.Tensor:
    with tracker.fork(name):
        return torch.rand(n)


def test_megatron_uses_the_cpu_tracker():
    """megatron's tracker factory builds our class; its three named streams exist after seeding."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu.CpuRNGStatesTracker)
    assert set(tracker.get_states()) == {"data-parallel-rng", "model-parallel-rng", "expert-parallel-rng"}


def test_fork_is_reproducible_after_reseeding():
    """Two forks advance the named stream (different draws); re-seeding replays the same sequence."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    first, second = _draw(tracker), _draw(tracker)
    assert not torch.equal(first, second)

    seed_everything(SEED)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.testing.assert_close(_draw(tracker), first, rtol=0, atol=0)
    torch.testing.assert_close(_draw(tracker), second, rtol=0, atol=0)


def test_named_streams_are_separate():
    """model- and expert-parallel streams differ from each other and from the default stream.

    As on GPU, 'data-parallel-rng' is seeded like the default generator (megatron's rule), so it
    replays the default stream.
    """
    tracker = tensor_parallel.get_cuda_rng_tracker()
    model_draw, expert_draw = _draw(tracker), _draw(tracker, "expert-parallel-rng")
    data_draw = _draw(tracker, "data-parallel-rng")
    default_draw = torch.rand(8)
    assert not torch.equal(model_draw, expert_draw)
    assert not torch.equal(model_draw, default_draw)
    assert not torch.equal(expert_draw, default_draw)
    torch.testing.assert_close(data_draw, default_draw, rtol=0, atol=0)


def test_fork_leaves_the_default_stream_untouched():
    """Drawing outside, forking (and drawing inside), drawing outside == two draws without the fork."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.rand(8)
    inside = _draw(tracker)
    after = torch.rand(8)

    seed_everything(SEED)
    torch.testing.assert_close(torch.rand(8), before, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(8), after, rtol=0, atol=0)
    assert not torch.equal(inside, after)


def test_get_states_set_states_round_trip():
    """set_states(get_states()) rewinds every named stream; the snapshot is not aliased by later forks."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    snapshot = tracker.get_states()
    model_first = _draw(tracker)
    expert_first = _draw(tracker, "expert-parallel-rng")
    assert not torch.equal(_draw(tracker), model_first)

    tracker.set_states(snapshot)
    torch.testing.assert_close(_draw(tracker), model_first, rtol=0, atol=0)
    torch.testing.assert_close(_draw(tracker, "expert-parallel-rng"), expert_first, rtol=0, atol=0)


def test_activation_recompute_with_dropout_matches_no_recompute():
    """tensor_parallel.checkpoint replays the default and tracked RNG streams in the recomputation.

    Uses megatron's `_get/_set_cuda_rng_state` (redirected to the CPU generator): with wrong RNG
    handling the recomputed dropout masks would differ and so would the gradients.
    """
    weight = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(6, 16, requires_grad=True)
    upstream = torch.randn(6, 16)

    def block(inp):
        h = F.dropout(inp @ weight, p=0.5, training=True)  # default stream
        # model-parallel stream, as megatron's TP dropout does (seed_everything makes a new tracker)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            h = F.dropout(h.tanh(), p=0.5, training=True)
        return h

    def run(recompute: bool):
        seed_everything(SEED + 1)
        weight.grad = x.grad = None
        out = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        # Advance both streams between forward and backward, as the rest of a model would.
        torch.rand(5)
        _draw(tensor_parallel.get_cuda_rng_tracker())
        (out * upstream).sum().backward()
        return out.detach(), weight.grad.clone(), x.grad.clone()

    plain, recomputed = run(False), run(True)
    assert (plain[0] == 0).float().mean() > 0.3  # dropout really dropped something
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# --- 4. CudaToCpuMode --------------------------------------------------------------------------


def test_cuda_placements_map_to_cpu():
    """CUDA literals in factory calls, .cuda() and .to() land on the CPU."""
    x = torch.ones(2)
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=0).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert x.new_zeros(3, device="cuda:0").device.type == "cpu"
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    converted = x.to(device="cuda", dtype=torch.float64)
    assert converted.device.type == "cpu" and converted.dtype == torch.float64
    assert x.to(torch.device("cuda"), torch.float16).dtype == torch.float16


def test_type_reports_cuda_names():
    """megatron's optimizers compare `param.type()` with 'torch.cuda.*Tensor' names."""
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    # .type(dtype) still converts.
    assert torch.ones(2).type(torch.float64).dtype == torch.float64


class _CudaLiteralsInBackward(torch.autograd.Function):
    """Doubles its input; its backward uses CUDA literals, as megatron's autograd functions may."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        scale = torch.full((1,), 2.0, device="cuda")
        assert grad.type() == "torch.cuda.FloatTensor"
        return grad * scale.cuda()


@pytest.mark.parametrize("entry", ["Tensor.backward", "torch.autograd.backward"])
def test_mode_stays_active_during_backward(entry):
    """Autograd Function.backward and grad hooks run under the mode (a mode pops itself while it
    handles the backward call, so without re-entry the whole backward pass would lose it)."""
    x = torch.ones(3, requires_grad=True)
    seen_in_hook = []
    x.register_hook(lambda g: seen_in_hook.append(torch.zeros(1, device="cuda").device.type))
    y = _CudaLiteralsInBackward.apply(x)
    upstream = torch.tensor([1.0, 2.0, 3.0])
    if entry == "Tensor.backward":
        y.backward(upstream, retain_graph=True, inputs=[x])
    else:
        torch.autograd.backward([y], [upstream], retain_graph=True, inputs=(x,))
    torch.testing.assert_close(x.grad, 2 * upstream, rtol=0, atol=0)
    assert seen_in_hook == ["cpu"]
    # Scalar outputs still get their implicit gradient; the mode is still installed afterwards.
    x.grad = None
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0), rtol=0, atol=0)
    assert any(isinstance(m, cpu.CudaToCpuMode) for m in torch.overrides._get_current_function_mode_stack())


def test_megatron_grad_norm_and_clipping():
    """get_grad_norm_fp32 ('cuda' literals) and clip_grad_by_total_norm_fp32 (.type() check) on CPU."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])

    norm = get_grad_norm_fp32([p.grad for p in params])
    assert math.isclose(norm, flat.norm().item(), rel_tol=1e-5)
    inf_norm = get_grad_norm_fp32([p.grad for p in params], norm_type=math.inf)
    assert math.isclose(inf_norm, flat.abs().max().item(), rel_tol=1e-6)

    clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=norm)
    clipped = torch.cat([p.grad.flatten() for p in params]).norm().item()
    assert math.isclose(clipped, 0.5, rel_tol=1e-4)


def test_megatron_ddp_distributed_optimizer_training_step():
    """megatron DDP + distributed Adam with clipping train a 2-layer GPTModel on CPU; loss falls."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from cumo_megatron.config.presets import tiny
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.language import build_language_model

    model = build_language_model(tiny(moe=False), ParallelConfig())
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        module=model,
    )
    assert all(buffer.grad_data.device.type == "cpu" for buffer in ddp.buffers)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True, clip_grad=1.0), [ddp]
    )

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 16), generator=generator)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    losses = []
    for _ in range(6):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(tokens, positions, None, labels=labels).mean()
        loss.backward()
        ddp.finish_grad_sync()
        update_ok, grad_norm, _ = optimizer.step()
        assert update_ok and math.isfinite(grad_norm) and grad_norm > 0
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


# --- 5. TransformerConfig overrides ------------------------------------------------------------


def test_transformer_config_overrides_without_cuda():
    """Without CUDA, pipeline p2p must not call cuda.synchronize per batch; weights start on CPU."""
    overrides = cpu.transformer_config_overrides()
    assert overrides["batch_p2p_sync"] is False
    assert overrides["use_cpu_initialization"] is True


# --- 6. Inactive when CUDA is present -----------------------------------------------------------

_INACTIVE_PROBE = r"""
import json, torch
import megatron.core.tensor_parallel.random as mrandom
original = {
    "current_device": torch.cuda.current_device,
    "synchronize": torch.cuda.synchronize,
    "tracker": mrandom.CudaRNGStatesTracker,
    "get_state": mrandom._get_cuda_rng_state,
    "set_state": mrandom._set_cuda_rng_state,
}
torch.cuda.is_available = lambda: True  # pretend a GPU exists before the platform module loads
from cumo_megatron.platform import cpu
active = cpu.activate()
print(json.dumps({
    "activate": active,
    "is_active": cpu.is_active(),
    "current_device_original": torch.cuda.current_device is original["current_device"],
    "synchronize_original": torch.cuda.synchronize is original["synchronize"],
    "tracker_original": mrandom.CudaRNGStatesTracker is original["tracker"],
    "rng_state_functions_original": mrandom._get_cuda_rng_state is original["get_state"]
        and mrandom._set_cuda_rng_state is original["set_state"],
    "function_modes": torch._C._len_torch_function_stack(),
    "overrides": cpu.transformer_config_overrides(),
}), flush=True)
import os
os._exit(0)  # skip the interpreter's teardown (seconds with torch and megatron-core loaded)
"""


def test_nothing_is_installed_when_cuda_is_present():
    """With CUDA reported, activate() returns False and leaves torch and megatron stock."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-c", _INACTIVE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "activate": False,
        "is_active": False,
        "current_device_original": True,
        "synchronize_original": True,
        "tracker_original": True,
        "rng_state_functions_original": True,
        "function_modes": 0,
        "overrides": {},
    }


# --- 7. CPU threads ---------------------------------------------------------------------------


def test_set_cpu_threads_shares_cores_and_honours_override(monkeypatch):
    """Cores are split over LOCAL_WORLD_SIZE processes; CUMO_CPU_THREADS overrides; at least one."""
    saved = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        monkeypatch.delenv("CUMO_CPU_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert set_cpu_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert set_cpu_threads() == 8
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("CUMO_CPU_THREADS", "3")
        assert set_cpu_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)


# --- 8. platform.initialize ---------------------------------------------------------------------


def test_initialize_world_of_one():
    """A plain process becomes a gloo world of one with every parallel size 1."""
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1
    assert parallel_state.get_expert_model_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 1


def test_reinitialize_resets_groups_and_seeds():
    """initialize() again (other expert-TP size, same seed) rebuilds the groups and replays the RNG."""
    first = torch.rand(4), _draw(tensor_parallel.get_cuda_rng_tracker())
    initialize(ParallelSizes(etp=1), seed=SEED)
    assert parallel_state.get_expert_tensor_parallel_world_size() == 1
    again = torch.rand(4), _draw(tensor_parallel.get_cuda_rng_tracker())
    for a, b in zip(first, again):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    initialize(ParallelSizes(), seed=SEED + 1)
    assert not torch.equal(torch.rand(4), first[0])


def test_bad_sizes_fail_clearly_and_keep_the_old_groups():
    """Sizes that do not divide the world raise a ValueError naming the sizes; groups survive."""
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp\*cp = 2\*1\*1"):
        initialize(ParallelSizes(tp=2))
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1


def test_data_parallel_size_rules():
    """DP = world / (tp*pp*cp); the expert layout etp*ep*pp must divide the world too."""
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by tp\*pp\*cp = 3\*1\*1.*parallel"):
        ParallelSizes(tp=3).data_parallel_size(2)
    with pytest.raises(ValueError, match=r"etp\*ep\*pp = 2\*4\*1.*parallel\.ep"):
        ParallelSizes(tp=2, ep=4).data_parallel_size(4)
    assert ParallelSizes(tp=2, ep=4, etp=1).data_parallel_size(4) == 2
    assert ParallelSizes(tp=2, pp=2).data_parallel_size(8) == 2
    assert ParallelSizes().data_parallel_size(3) == 3


def test_quick_gelu_is_eager_on_cpu_and_matches_megatron():
    """Without CUDA the ViT uses an eager quick_gelu, numerically megatron's (x * sigmoid(1.702x))."""
    from megatron.core.activations import quick_gelu as megatron_quick_gelu

    from cumo_megatron.config.presets import tiny
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.transformer_configs import vision_transformer_config

    assert cpu.quick_gelu_impl() is cpu.quick_gelu
    assert vision_transformer_config(tiny(), ParallelConfig()).activation_func is cpu.quick_gelu
    x = torch.linspace(-6, 6, 101)
    # Compare with megatron's own function body, not its torch.compile wrapper (seconds to compile).
    megatron_eager = getattr(megatron_quick_gelu, "_torchdynamo_orig_callable", megatron_quick_gelu)
    torch.testing.assert_close(cpu.quick_gelu(x), megatron_eager(x), rtol=1e-6, atol=1e-7)
