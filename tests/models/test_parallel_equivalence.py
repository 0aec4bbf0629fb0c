"""TP=2 (with SP), EP=2 and PP=2 give the world-of-one loss and gradients on the full CuMo model.

The world-of-one run happens in this process; each layout runs under ``torchrun`` with 2 gloo
ranks, loads the same weights (a distributed checkpoint, resharded by megatron), runs the same
micro-batches, and writes its gradients as a distributed checkpoint, which this process gathers by
loading it into the world-of-one layout.
"""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core import dist_checkpointing

import cumo_megatron.platform as platform
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.training.step import forward_backward, wrap_ddp
from tests.helpers.distributed import run_distributed
from tests.models.parallel_workers import equivalence_model_config, save_gradients

SEQ = 16
MICROBATCHES = 2


def _microbatches(cfg) -> list[dict]:
    gen = torch.Generator().manual_seed(1234)
    tokens = cfg.vision.tokens_per_image
    out = []
    for i in range(MICROBATCHES):
        ids = torch.randint(0, cfg.language.vocab_size, (1, SEQ), generator=gen)
        ids[0, 1 + i:1 + i + tokens] = cfg.image_token_id
        loss_mask = torch.ones(1, SEQ)
        loss_mask[0, : 1 + i + tokens] = 0.0  # loss on the text after the image, as in training
        out.append(dict(
            input_ids=ids,
            images=torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen),
            labels=torch.randint(0, cfg.language.vocab_size, (1, SEQ), generator=gen),
            loss_mask=loss_mask,
        ))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """World-of-one weights, batches, loss and gradients."""
    tmp = tmp_path_factory.mktemp("parallel")
    platform.initialize(platform.ParallelSizes(), seed=7)
    cfg = equivalence_model_config()
    model = build_model(cfg, ParallelConfig())
    weights = tmp / "weights"
    weights.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(weights))
    batches = _microbatches(cfg)
    torch.save(batches, tmp / "batches.pt")
    ddp = wrap_ddp(model)
    ddp.zero_grad_buffer()
    loss = forward_backward(ddp, batches, MICROBATCHES, seq_length=SEQ, micro_batch_size=1)
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    return dict(tmp=tmp, cfg=cfg, loss=loss, grads=grads, weights=str(weights))


def _gathered_grads(reference, grads_dir: str) -> dict[str, torch.Tensor]:
    platform.initialize(platform.ParallelSizes(), seed=7)
    template = build_model(reference["cfg"], ParallelConfig())
    state = dist_checkpointing.load(template.sharded_state_dict(), grads_dir)
    template.load_state_dict(state)
    return {name: p.detach().clone() for name, p in template.named_parameters()}


@pytest.mark.parametrize("layout", [dict(tp=2, pp=1, ep=1), dict(tp=1, pp=1, ep=2), dict(tp=1, pp=2, ep=1)],
                         ids=["tp2-sp", "ep2", "pp2"])
def test_layout_matches_world_of_one(reference, layout):
    grads_dir = str(reference["tmp"] / f"grads-{layout['tp']}{layout['pp']}{layout['ep']}")
    results = run_distributed(
        "tests.models.parallel_workers:loss_and_grads",
        world_size=2,
        args=dict(layout, weights=reference["weights"], batches=str(reference["tmp"] / "batches.pt"),
                  out_dir=grads_dir, seq_length=SEQ),
    )
    assert all(r["replicas_identical"] for r in results), "TP replicas of vision/connector differ"
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    gathered = _gathered_grads(reference, grads_dir)
    assert gathered.keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(gathered[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # The comparison proves something only if gradients flow almost everywhere (an expert that no
    # token of this small batch chose legitimately has none).
    flowing = [n for n, g in reference["grads"].items() if float(g.abs().sum()) > 0]
    assert len(flowing) >= 0.9 * len(reference["grads"]), sorted(set(reference["grads"]) - set(flowing))
