"""TP=2 (with SP), EP=2 and PP=2 give the world-of-one loss, gradients, expert load and MoE aux
losses on the full CuMo model, with micro-batches of 2 samples and padding (the LLM's balance is
taken over each micro-batch's real tokens, which SP ranks and pipeline stages must combine).

The world-of-one run happens in this process; the layouts run one after another on the 2 gloo
ranks of one ``torchrun`` launch (`tests.helpers.shared_launch`, shared with the platform checks).
Each loads the same weights (a distributed checkpoint, resharded
by megatron), runs the same micro-batches, and writes its gradients as a distributed checkpoint,
which this process gathers by loading it into the world-of-one layout.
"""

from __future__ import annotations


import pytest
import torch
from megatron.core import dist_checkpointing

import cumo_megatron.platform as platform
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.moe.stats import collect_moe_stats
from cumo_megatron.models.parallelize import wrap_ddp
from cumo_megatron.training.step import forward_backward
from tests.helpers import shared_launch
from tests.models.parallel_workers import equivalence_model_config

SEQ = 16
MICROBATCHES = 2
MICRO_BATCH_SIZE = 2
# Real tokens per sample of each micro-batch; the rest is right padding (as the data pipeline pads).
REAL = ((16, 11), (9, 13))


def _microbatches(cfg) -> list[dict]:
    gen = torch.Generator().manual_seed(1234)
    tokens = cfg.vision.tokens_per_image
    out = []
    for i in range(MICROBATCHES):
        ids = torch.randint(0, cfg.language.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=gen)
        loss_mask = torch.ones(MICRO_BATCH_SIZE, SEQ)
        padding_mask = torch.arange(SEQ).unsqueeze(0) >= torch.tensor(REAL[i]).unsqueeze(1)
        for j in range(MICRO_BATCH_SIZE):
            start = 1 + i + j
            ids[j, start:start + tokens] = cfg.image_token_id
            loss_mask[j, : start + tokens] = 0.0  # loss on the text after the image, as in training
        loss_mask[padding_mask] = 0.0
        out.append(dict(
            input_ids=ids,
            images=torch.randn(MICRO_BATCH_SIZE, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen),
            labels=torch.randint(0, cfg.language.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=gen),
            loss_mask=loss_mask,
            padding_mask=padding_mask,
        ))
    return out


LAYOUTS = {"tp2-sp": dict(tp=2, pp=1, ep=1), "ep2": dict(tp=1, pp=1, ep=2), "pp2": dict(tp=1, pp=2, ep=1)}
PART = "models.parallel_equivalence"


def _prepare(tmp) -> tuple[str, dict, dict]:
    """World-of-one weights, batches, loss and gradients; the 2-rank call that runs every layout."""
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
    loss = forward_backward(ddp, batches, MICROBATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH_SIZE)
    moe_stats = collect_moe_stats(model, MICROBATCHES)
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    out_dirs = [str(tmp / f"grads-{name}") for name in LAYOUTS]
    args = dict(layouts=list(LAYOUTS.values()), weights=str(weights), batches=str(tmp / "batches.pt"),
                out_dirs=out_dirs, seq_length=SEQ, micro_batch_size=MICRO_BATCH_SIZE)
    reference = dict(cfg=cfg, loss=loss, grads=grads, expert_load=moe_stats["layers"],
                     moe_losses=moe_stats["modules"], out_dirs=dict(zip(LAYOUTS, out_dirs)))
    return "tests.models.parallel_workers:loss_and_grads_per_layout", args, reference


shared_launch.register(PART, _prepare)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[dict, list]:
    """The world-of-one reference, and each rank's results per layout (from the shared launch)."""
    return shared_launch.results(PART, tmp_path_factory)


def _gathered_grads(reference, grads_dir: str) -> dict[str, torch.Tensor]:
    platform.initialize(platform.ParallelSizes(), seed=7)
    template = build_model(reference["cfg"], ParallelConfig())
    state = dist_checkpointing.load(template.sharded_state_dict(), grads_dir)
    template.load_state_dict(state)
    return {name: p.detach().clone() for name, p in template.named_parameters()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_world_of_one(launched, layout):
    reference, ranks = launched
    results = [rank[list(LAYOUTS).index(layout)] for rank in ranks]
    grads_dir = reference["out_dirs"][layout]
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


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_load_matches_world_of_one(launched, layout):
    """Every MoE layer's token counts per expert, summed over data-parallel ranks, are the
    world-of-one counts: TP ranks that split the sequence (SP) report the whole layer's load, each
    pipeline stage its own layers."""
    reference, ranks = launched
    results = [rank[list(LAYOUTS).index(layout)] for rank in ranks]
    want = reference["expert_load"]
    assert any(key.startswith("language") for key in want) and any(key.startswith("vision") for key in want)
    got: dict[str, list[int]] = {}
    for dp_rank in sorted({r["dp_rank"] for r in results}):
        replicas = [r["expert_load"] for r in results if r["dp_rank"] == dp_rank]
        for other in replicas[1:]:  # TP ranks of one DP rank (or stages, with disjoint layers)
            for key in set(other) & set(replicas[0]):
                assert other[key] == replicas[0][key], (layout, key)
        merged = {key: value for replica in replicas for key, value in replica.items()}
        for key, counts in merged.items():
            got[key] = [a + b for a, b in zip(got.get(key, [0] * len(counts)), counts)]
    assert got == want, layout


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_aux_losses_match_world_of_one(launched, layout):
    """Each module's balance and z losses equal the world-of-one values: TP ranks that split the
    sequence (SP) each hold the whole micro-batch's loss, pipeline stages add their layers' shares,
    data-parallel ranks average their micro-batches."""
    reference, ranks = launched
    results = [rank[list(LAYOUTS).index(layout)] for rank in ranks]
    want = reference["moe_losses"]
    assert set(want) == {"vision", "connector", "language"}
    per_dp: list[dict[str, dict[str, float]]] = []
    for dp_rank in sorted({r["dp_rank"] for r in results}):
        summed: dict[str, dict[str, float]] = {}
        for pp_rank in sorted({r["pp_rank"] for r in results if r["dp_rank"] == dp_rank}):
            replicas = [r["moe_losses"] for r in results if (r["dp_rank"], r["pp_rank"]) == (dp_rank, pp_rank)]
            for other in replicas[1:]:  # TP ranks of one stage
                assert other.keys() == replicas[0].keys(), layout
                for module, losses in other.items():
                    for kind, value in losses.items():
                        assert value == pytest.approx(replicas[0][module][kind], rel=1e-6), (layout, module, kind)
            for module, losses in replicas[0].items():
                entry = summed.setdefault(module, {"balance": 0.0, "z_loss": 0.0})
                for kind, value in losses.items():
                    entry[kind] += value
        per_dp.append(summed)
    assert all(entry.keys() == want.keys() for entry in per_dp), layout
    for module, losses in want.items():
        for kind, value in losses.items():
            got = sum(entry[module][kind] for entry in per_dp) / len(per_dp)
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (layout, module, kind)
