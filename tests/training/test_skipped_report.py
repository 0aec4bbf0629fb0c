"""``skipped_records.json``: the merge over data-parallel ranks, and a real two-rank run writing it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from cumo_megatron.data.records import ProblemKind
from cumo_megatron.training.pointers import iteration_dir
from cumo_megatron.training.skipped_report import REPORT_NAME, merge_health_states, summary_line
from tests.fixtures.tiny_models import save_images
from tests.training.workers import check, experiment, launch, write_config


def _problem(source, index, kind, rid):
    return {"kind": kind, "source": source, "index": index, "record_id": rid, "message": f"why {rid}", "line": None}


def test_merge_keeps_each_record_once_adds_events_and_orders_by_file_and_index():
    rank0 = {"skipped": [_problem("b.json", 2, "missing_image", "x"), _problem("a.json", 5, "too_long", "y")],
             "truncated": [_problem("a.json", 1, "truncated", "t")], "events": 3}
    rank1 = {"skipped": [_problem("a.json", 5, "too_long", "y"), _problem("a.json", 0, "missing_image", "z")],
             "truncated": [], "events": 2}
    report = merge_health_states([rank0, rank1, None], step=7)
    assert report["step"] == 7 and report["skipped_records"] == 3 and report["skip_events"] == 5
    assert report["counts"] == {"missing_image": 2, "too_long": 1} and report["truncated_records"] == 1
    assert [(r["file"], r["index"], r["id"]) for r in report["records"]] == [("a.json", 0, "z"), ("a.json", 5, "y"),
                                                                              ("b.json", 2, "x")]
    assert report["records"][0] == {"file": "a.json", "index": 0, "line": None, "id": "z", "kind": "missing_image",
                                    "reason": "why z"}
    assert summary_line(report, Path("r.json")) == (
        "data: 3 skipped record(s) (missing_image=2, too_long=1), 5 skip event(s), 1 truncated; list in r.json")
    empty = merge_health_states([None])
    assert summary_line(empty) == "data: 0 skipped record(s) (none), 0 skip event(s), 0 truncated"


def test_two_rank_run_writes_the_merged_report_at_checkpoints_and_prints_totals(dataset, tmp_path):
    """dp=2, policy skip, one epoch over 12 records of which 6 are bad: the report holds all 6 with
    file, index and id, equal to the union of what each rank's checkpoint file recorded."""
    images = tmp_path / "images"
    save_images(images, 4, size=32)
    Image.new("RGB", (2, 100)).save(images / "strip.png")
    save_images(tmp_path / "elsewhere", 1, size=32)
    q = "What is shown?"

    def rec(rid, image=None, human="<image>\n" + q):
        out = {"id": rid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "a square"}]}
        return {**out, "image": image} if image else out

    bad = {"gone1": ("nowhere1.png", ProblemKind.MISSING_IMAGE), "gone2": ("nowhere2.png", ProblemKind.MISSING_IMAGE),
           "dotdot": ("../elsewhere/img_0000.png", ProblemKind.IMAGE_OUTSIDE_FOLDER),
           "absolute": (str(tmp_path / "elsewhere" / "img_0000.png"), ProblemKind.IMAGE_OUTSIDE_FOLDER),
           "strip": ("strip.png", ProblemKind.IMAGE_ASPECT_RATIO)}
    records = [rec(f"good{i}", f"img_{i:04d}.png") for i in range(4)] + [rec(f"text{i}", human=q) for i in range(2)]
    records += [rec(rid, name) for rid, (name, _) in bad.items()] + [rec("no_image")]  # <image> without an image
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    expected = {rid: kind for rid, (_, kind) in bad.items()} | {"no_image": ProblemKind.UNEXPECTED_IMAGE_TOKEN}

    save = tmp_path / "run"
    cfg = experiment(dataset, str(save), global_batch_size=2, train_steps=6, save_interval=3)
    cfg.data.files, cfg.data.image_folder = [str(data)], str(images)
    proc = launch(write_config(cfg, tmp_path / "config.yaml"), nproc=2)
    check(proc)
    report = json.loads((save / REPORT_NAME).read_text())
    assert report["step"] == 6 and report["skipped_records"] == 6 and report["skip_events"] == 6
    assert {r["id"]: r["kind"] for r in report["records"]} == expected
    assert {(r["file"], r["index"]) for r in report["records"]} == {(str(data), i) for i in range(6, 12)}
    assert "data: 6 skipped record(s) (image_aspect_ratio=1, image_outside_folder=2, missing_image=2, " \
           "unexpected_image_token=1), 6 skip event(s), 0 truncated" in proc.stdout
    # Merged over the ranks: each rank met only its shard's bad records, the report has them all.
    per_rank = [torch.load(iteration_dir(save, 6) / "ranks" / f"rank{r:05d}.pt", weights_only=False)
                ["loader"]["health"]["skipped"] for r in range(2)]
    assert all(per_rank) and sorted(p["record_id"] for part in per_rank for p in part) == sorted(expected)
