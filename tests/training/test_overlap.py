"""Opt-in overlapped gradient reduction and parameter gathers (`train.overlap_*`) on 2 gloo ranks.

Off by default (`training.performance`: megatron's overlapped reduce needs a gradient for every
parameter in every step's last micro-batch). Where that holds (stage 2: dense towers; images in
every sample) a DP = 2 run with both overlaps must repeat the synchronous run: the same losses and,
after the final save (which gathers the weights the overlapped gather defers to the next forward),
the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
