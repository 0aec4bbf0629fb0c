"""Overlapped gradient reduction and parameter gathers (`train.overlap_*`, on by default with
CUDA) on 2 gloo ranks: a DP = 2 run with both overlaps must repeat the synchronous run (the same
losses and, after the final save, which gathers the weights the overlapped gather defers to the
next forward, the same weights), also where the ranks' micro-batches run different modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cumo_megatron.training.metrics import is_training_row
from tests.helpers.distributed import run_distributed
from tests.training.workers import experiment, read_metrics, write_config


def test_overlapped_reduce_and_gather_match_the_synchronous_run(dataset, tmp_path):
    images_only = tmp_path / "images-only.json"
    images_only.write_text(json.dumps([r for r in json.loads(Path(dataset["file"]).read_text()) if "image" in r]))
    cfg = experiment(dict(dataset, file=str(images_only)), str(tmp_path / "sync"), stage=2, train_steps=3,
                     save_interval=0, global_batch_size=4)
    config = write_config(cfg, tmp_path / "stage2.yaml")
    runs = [{"config": str(config), "overrides": [f"train.save={tmp_path / name}", f"train.overlap_grad_reduce={flag}",
                                                  f"train.overlap_param_gather={flag}"]}
            for name, flag in (("sync", "false"), ("overlap", "true"))]
    ranks = run_distributed("tests.training.workers:train_in_process", world_size=2, args={"runs": runs})
    sync, overlap = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "overlap")
    assert [r["step"] for r in overlap] == [1, 2, 3]
    for a, b in zip(overlap, sync):
        assert (a["lm_loss"], a["grad_norm"]) == (b["lm_loss"], b["grad_norm"]), a["step"]
    for rank in ranks:
        for (key, _, where, data), (key2, _, where2, data2) in zip(rank[1]["shards"], rank[0]["shards"]):
            assert (key, where) == (key2, where2) and torch.equal(data, data2), key


def test_overlaps_with_text_only_micro_batches_and_moe_match_the_synchronous_run(dataset, tmp_path):
    """Stage 3 (CLIP-MoE, MLP-MoE connector, a Mixtral LLM with top-1 of 4 experts) on data with
    as many text-only samples as image ones, one sample per micro-batch: some micro-batches run
    no tower, experts go without tokens, and in most steps one rank starts with a text-only
    micro-batch while the other has images. (The LLM's experts may share buckets that start
    during the backward: megatron runs every local expert, one without tokens on an empty slice,
    so each still reports a gradient.)
    megatron's own overlapped reduce asserts here (a parameter without a gradient in a step's
    last micro-batch) and its chained gathers start in different orders on the two ranks;
    `parallelize.order_bucket_collectives` issues both in one order on both ranks, so the run
    repeats the synchronous one."""
    records = json.loads(Path(dataset["file"]).read_text())
    with_images, text_only = [r for r in records if "image" in r], [r for r in records if "image" not in r]
    mixed = tmp_path / "half-text-only.json"
    mixed.write_text(json.dumps(with_images[:8] + text_only * 2))
    cfg = experiment(dict(dataset, file=str(mixed)), str(tmp_path / "sync"), stage=3, train_steps=4, save_interval=0,
                     global_batch_size=4, micro_batch_size=1, eval_interval=2)
    # Validation between steps runs forwards without a backward (the gathers' other caller).
    cfg.data.eval_files = [str(mixed)]
    config = write_config(cfg, tmp_path / "stage3.yaml")
    # Small buckets: several bucket groups, LLM-only ones started during the backward, those
    # with tower or connector parameters after it (tests/models/test_parallelize.py).
    runs = [{"config": str(config), "overrides": [f"train.save={tmp_path / name}", f"train.overlap_grad_reduce={flag}",
                                                  f"train.overlap_param_gather={flag}", "train.ddp_bucket_size=2000",
                                                  "model.language.arch=mixtral",
                                                  "model.language.moe={num_experts: 4, top_k: 1}"]}
            for name, flag in (("sync", "false"), ("overlap", "true"))]
    ranks = run_distributed("tests.training.workers:train_in_process", world_size=2, args={"runs": runs})
    sync, overlap = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "overlap")
    assert [(r["step"], is_training_row(r)) for r in overlap] == [
        (1, True), (2, True), (2, False), (3, True), (4, True), (4, False)]
    # Not bit for bit: small buckets lay the gradient buffer out differently (megatron ignores the
    # bucket size without the overlap), which reorders the gradient norm's sums. A bucket reduced
    # wrongly, or not at all, would move these by far more than the tolerances.
    for a, b in zip(overlap, sync):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-6), a["step"]
        if is_training_row(a):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    for rank in ranks:
        for (key, _, where, data), (key2, _, where2, data2) in zip(rank[1]["shards"], rank[0]["shards"]):
            assert (key, where) == (key2, where2), key
            torch.testing.assert_close(data, data2, rtol=1e-4, atol=1e-5, msg=key)
