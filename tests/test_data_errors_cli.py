"""Data errors end ``python -m cumo_megatron.train`` as a few lines with exit status 4, no traceback,
on every rank (runs as a user starts them: a subprocess, and two ranks under the stage scripts'
launcher, `cumo_megatron.torchrun`)."""

from __future__ import annotations

import json
import re

import pytest

from cumo_megatron.errors import EXIT_DATA
from tests.training.workers import experiment, launch, make_dataset, write_config

RANK_TRACE = re.compile(r"^\[rank\d+\]:", re.MULTILINE)  # how torch prefixes a rank's uncaught traceback


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Tokenizer and images of the training tests (4 image + 2 text records)."""
    return make_dataset(tmp_path_factory.mktemp("cli-data"), num_images=4, num_text=2)


def test_a_data_file_that_is_not_json_stops_with_one_line_even_under_policy_skip(dataset, tmp_path):
    data = tmp_path / "notes.json"
    data.write_text("these are my notes, not JSON\n")
    cfg = experiment(dataset, str(tmp_path / "run"), global_batch_size=1, train_steps=1)
    cfg.data.files, cfg.data.policy = [str(data)], "skip"
    proc = launch(write_config(cfg, tmp_path / "config.yaml"))
    assert proc.returncode == EXIT_DATA, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not RANK_TRACE.search(proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"data error: {data}: not valid JSON (line 1, column 1: Expecting value); a LLaVA data file is a JSON "
        "list of records or JSON lines (one record per line)")


def test_a_bad_record_met_by_one_rank_stops_both_ranks_with_its_message(dataset, tmp_path):
    """policy fail, dp=2: a missing image (found only when read) is met by one rank mid-run; the other
    rank, waiting for the step's collectives, stops with the same message instead of a comm error."""
    records = json.loads(open(dataset["file"]).read())
    records = [r for r in records if r["id"] in ("img0", "img1", "txt0")]
    records.append({**records[0], "id": "gone", "image": "nowhere.png"})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    cfg = experiment(dataset, str(tmp_path / "run"), global_batch_size=2, train_steps=2, save_interval=0)
    cfg.data.files, cfg.data.policy = [str(data)], "fail"
    proc = launch(write_config(cfg, tmp_path / "config.yaml"), nproc=2)
    out = proc.stdout + proc.stderr
    # The launcher (cumo_megatron.torchrun) exits with the failed rank's status and reports it.
    assert proc.returncode == EXIT_DATA and f"exitcode  : {EXIT_DATA}" in out, out[-4000:]
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\[rank (\d)\] data error: (.*)$", proc.stderr, re.M)}
    assert sorted(lines) == [0, 1], proc.stderr[-4000:]
    where = f"{data} record 3 (id='gone'): [missing_image] image file not found: {dataset['image_folder']}/nowhere.png"
    failing = next(r for r, line in lines.items() if line.startswith(where))
    assert lines[1 - failing] == f"rank {failing} stopped on bad data: {where}"
    assert "data.policy=skip" in proc.stderr
    # No traceback anywhere: not from a rank, not from the launcher.
    assert not RANK_TRACE.search(proc.stderr) and "Traceback" not in proc.stderr, proc.stderr[-4000:]