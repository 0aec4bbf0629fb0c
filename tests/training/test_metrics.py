"""Metrics: JSON lines, the same scalars in TensorBoard, a console line."""

from __future__ import annotations

import io
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cumo_megatron.training.metrics import MetricsWriter


def test_jsonl_tensorboard_and_console_carry_the_same_step(tmp_path):
    console = io.StringIO()
    writer = MetricsWriter(tmp_path, console=console)
    for step, loss in ((1, 2.5), (2, 2.0)):
        writer.write({"step": step, "loss": loss, "lm_loss": loss - 0.1, "lr": 1e-3,
                      "vision": {"balance": 1.1, "z_loss": 0.5}})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 2.0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss" in tags and "lm_loss" in tags
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert any("balance" in tag for tag in tags)
    assert console.getvalue().count("\n") == 2
