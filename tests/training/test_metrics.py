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


def _counts(vision: int, connector: int, language: int):
    from types import SimpleNamespace

    return SimpleNamespace(**{name: SimpleNamespace(active=n) for name, n in
                              (("vision", vision), ("connector", connector), ("language", language))})


def test_flops_stage1_counts_the_frozen_llm_as_forward_and_input_gradients():
    from cumo_megatron.config.presets import tiny
    from cumo_megatron.training.metrics import model_flops_per_step

    model = tiny(moe=False)  # 28 px / 14 px patches: 4 patches (+ CLS = 5 ViT tokens), 4 tokens per image
    counts = _counts(vision=10, connector=3, language=100)
    # 2 images, 50 real LLM tokens.
    # stage 1: ViT 2 x 10 x (2 x 5) + connector 6 x 3 x (2 x 4) + LLM 4 x 100 x 50
    assert model_flops_per_step(counts, model, 1, 50, 2) == 200 + 144 + 20000
    # stages 2 and 3: all 6N
    assert model_flops_per_step(counts, model, 3, 50, 2) == 600 + 144 + 30000
    assert model_flops_per_step(counts, model, 2, 50, 2) == 600 + 144 + 30000


def test_padded_batch_counts_only_real_tokens():
    import torch

    from cumo_megatron.data.batching import collate
    from cumo_megatron.data.dataset import Sample
    from cumo_megatron.training.metrics import real_and_padded_tokens

    def sample(n, index):
        ids = torch.arange(1, n + 1)
        return Sample(input_ids=ids, labels=ids, loss_mask=torch.ones(n), images=None, index=index, record_id=None)

    # 3 + 7 tokens padded to the multiple 16 (FP8 at TP = 1): 32 positions, 10 real.
    batch = collate([sample(3, 0), sample(7, 1)], pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (2, 16)
    assert real_and_padded_tokens([batch, batch]) == (20, 64)
