"""`collect_moe_stats`: per-module losses (share-weighted, per micro-batch) and per-layer loads."""

from __future__ import annotations

import pytest
import torch

from cumo_megatron.config.presets import tiny
from cumo_megatron.models.transformer_configs import connector_transformer_config
from cumo_megatron.moe.router import CuMoRouter, RouterSettings
from cumo_megatron.moe.stats import collect_moe_stats
from cumo_megatron.platform import ParallelSizes, initialize
from tests.reference import cumo_reference as ref


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    initialize(ParallelSizes(), seed=0)


class _TwoModules(torch.nn.Module):
    """Two vision MoE layers (numbered as megatron numbers them, from 1) and a connector router."""

    def __init__(self):
        super().__init__()
        config = connector_transformer_config(tiny())
        vision = RouterSettings("vision", call_share=0.5)  # mean over 2 layers, one pass each
        self.layers = torch.nn.ModuleList(CuMoRouter(config, settings=vision) for _ in range(2))
        for i, layer in enumerate(self.layers):
            layer.set_layer_number(i + 1)
        self.connector = CuMoRouter(config, settings=RouterSettings("connector", call_share=1.0))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for router in self.routers():
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator))

    def routers(self):
        """Every router, vision layers first."""
        return [*self.layers, self.connector]


def _reference(router: CuMoRouter, x_sbh: torch.Tensor):
    logits_bse = (x_sbh @ router.weight.detach().t()).transpose(0, 1)
    _, indices, probs = ref.route_topk(logits_bse, 2)
    load = torch.nn.functional.one_hot(indices, 4).sum((0, 1, 2))
    return ref.balance_loss(probs, indices[..., 0], 4), ref.z_loss(logits_bse), load


def test_module_losses_are_means_over_layers_and_microbatches():
    model = _TwoModules()
    inputs = [torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(m)) for m in range(3)]
    expected = {"vision": [0.0, 0.0], "connector": [0.0, 0.0]}
    loads = {"vision.layer0": 0, "vision.layer1": 0, "connector": 0}
    for x in inputs:  # three micro-batches
        for key, router in zip(("vision.layer0", "vision.layer1", "connector"), model.routers()):
            router(x)
            balance, z, load = _reference(router, x)
            module = router.settings.module
            expected[module][0] += float(balance) * router.settings.call_share / len(inputs)
            expected[module][1] += float(z) * router.settings.call_share / len(inputs)
            loads[key] = loads[key] + load

    stats = collect_moe_stats(model, num_microbatches=len(inputs))
    assert set(stats) == {"modules", "layers"}
    assert set(stats["modules"]) == {"vision", "connector"}
    for module, (balance, z) in expected.items():
        assert stats["modules"][module]["balance"] == pytest.approx(balance, rel=1e-5)
        assert stats["modules"][module]["z_loss"] == pytest.approx(z, rel=1e-5)
    assert stats["layers"] == {key: load.tolist() for key, load in loads.items()}
    assert all(isinstance(v, int) for counts in stats["layers"].values() for v in counts)

    # Collecting drained the routers.
    again = collect_moe_stats(model)
    assert again["modules"]["vision"] == {"balance": 0.0, "z_loss": 0.0}
    assert again["layers"]["vision.layer0"] == [0, 0, 0, 0]


def test_rejects_zero_microbatches():
    with pytest.raises(ValueError, match="num_microbatches"):
        collect_moe_stats(_TwoModules(), num_microbatches=0)
