"""Validation during training (issue 14): the held-out loss over ``data.eval_files``.

Held weights: ``train.lr=0`` for one step, so every layout validates the same initial weights
(``init_weights``): the world of one is checked against a plain forward of the model over the same
records, and the 2-rank layouts (DP = 2, PP = 2 with variable and fixed lengths, EP = 2, TP = 2; one
`run_distributed` launch) against the world of one. The held-out set has 7 records: with 2 records
a micro-batch, the last micro-batch holds a padding row (world of one, PP) or, at DP = 2, the last
megabatch is 3 records over 2 ranks.

A training run (dropout on, validation every step) killed while saving checkpoint 4 and resumed
(`tests.training.test_resume`'s helpers) is bit-exact with the uninterrupted run, validation rows
included, and its training rows are bit-identical to the same run without validation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cumo_megatron.config.loader import ConfigError, parse_cli
from cumo_megatron.config.schema import ExperimentConfig
from cumo_megatron.platform.distributed import set_cpu_threads
from cumo_megatron.training.loop import Trainer
from cumo_megatron.training.metrics import is_training_row
from cumo_megatron.training.validation import PADDING, STAND_IN, due, eval_plan
from tests.helpers.distributed import run_distributed
from tests.training.test_resume import STEPS, _killed_then_resumed, _same_rows
from tests.training.workers import experiment, make_eval_file, read_metrics, tiny_model, write_config

RECORDS = 7  # odd: DP = 2 gets uneven shards
HELD = dict(train_steps=1, lr=0.0, warmup_fraction=0.0, global_batch_size=4, micro_batch_size=2, save_interval=0)
AUX = ("vision_balance", "vision_z_loss", "connector_balance", "connector_z_loss")
RTOL = 1e-5  # fp32; layouts differ in reduction order, batches in padding


@pytest.fixture(scope="module")
def eval_file(dataset, tmp_path_factory) -> str:
    """5 image and 2 text-only held-out records on the training data's images."""
    return make_eval_file(dataset, tmp_path_factory.mktemp("eval") / "eval.json", num_images=5, num_text=2)


def _held(dataset, eval_file, init_weights, save) -> ExperimentConfig:
    cfg = experiment(dataset, str(save), load=init_weights, **HELD)
    cfg.data.eval_files = [eval_file]
    return cfg


def _plain_forward(model, cfg) -> dict:
    """The held-out figures by the model's own forward: LM loss record by record, token-weighted;
    aux losses per micro-batch of 2 records in the documented order (image records, then text-only
    ones, each longest first), averaged."""
    from cumo_megatron.data.batching import collate
    from cumo_megatron.data.dataset import dataset_for_run
    from cumo_megatron.data.tokenizer import load_tokenizer
    from cumo_megatron.moe.stats import collect_moe_stats

    dataset = dataset_for_run(cfg, cfg.data.eval_files, load_tokenizer(cfg.data.tokenizer))
    samples = [dataset[i] for i in range(len(dataset))]
    model.eval()
    collect_moe_stats(model)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for s in samples:
            per_token = model(input_ids=s.input_ids[None], images=s.images, labels=s.labels[None])
            loss_sum += float((per_token[0].double() * s.loss_mask.double()).sum())
            tokens += int(s.loss_mask.sum())
        collect_moe_stats(model)
        lengths, has_image = dataset.lengths(), dataset.has_image()
        pairs = []
        for images in (True, False):
            order = sorted((i for i in range(len(samples)) if has_image[i] == images), key=lambda i: -int(lengths[i]))
            pairs += [order[i:i + 2] for i in range(0, len(order), 2)]
        aux = {key: 0.0 for key in AUX}
        for pair in pairs:
            batch = collate([samples[i] for i in pair])
            model(input_ids=batch["input_ids"], images=batch["images"], labels=batch["labels"],
                  padding_mask=batch["padding_mask"])
            for module, values in collect_moe_stats(model)["modules"].items():
                for key, value in values.items():
                    aux[f"{module}_{key}"] += value / len(pairs)
    return {"lm_loss": loss_sum / tokens, "tokens": tokens, "aux": aux}


@pytest.fixture(scope="module")
def world_one(dataset, init_weights, eval_file, tmp_path_factory) -> dict:
    """One held-weights step at world of one, then the plain forward on the same model."""
    save = tmp_path_factory.mktemp("val1") / "run"
    cfg = _held(dataset, eval_file, init_weights, save)
    set_cpu_threads()
    trainer = Trainer(cfg)
    trainer.train()
    return {"rows": trainer.validation_rows, "file": read_metrics(save),
            "reference": _plain_forward(trainer.model, cfg)}


LAYOUTS = {
    "dp2": [],
    "pp2": ["parallel.pp=2"],
    "pp2-fixed": ["parallel.pp=2", "train.variable_seq_lengths=false"],
    "ep2": ["parallel.ep=2"],
    "tp2": ["parallel.tp=2"],
}


@pytest.fixture(scope="module")
def two_ranks(dataset, init_weights, eval_file, tmp_path_factory) -> dict:
    """The held-weights run in each 2-rank layout, one after another in one launch."""
    root = tmp_path_factory.mktemp("val2")
    config = write_config(_held(dataset, eval_file, init_weights, root / "unused"), root / "held.yaml")
    runs = [{"config": str(config), "overrides": [*overrides, f"train.save={root / name}"]}
            for name, overrides in LAYOUTS.items()]
    ranks = run_distributed("tests.training.workers:train_in_process", world_size=2, args={"runs": runs})
    return {name: {"ranks": [rank[i]["validation"] for rank in ranks], "file": read_metrics(root / name)}
            for i, name in enumerate(LAYOUTS)}


def _validation_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not is_training_row(r)]


def _figures(row: dict) -> dict:
    """A validation row without its wall time (which differs between ranks)."""
    return {k: v for k, v in row.items() if k != "time_s"}


def test_world_one_matches_a_plain_forward(world_one):
    (row,) = world_one["rows"]
    ref = world_one["reference"]
    assert row["step"] == 1 and row["split"] == "validation"
    assert (row["records"], row["skipped"], row["tokens"]) == (RECORDS, 0, ref["tokens"])
    assert row["lm_loss"] == pytest.approx(ref["lm_loss"], rel=RTOL)
    for key in AUX:
        assert row[key] == pytest.approx(ref["aux"][key], rel=RTOL), key
    # The objective's form: LM loss plus the aux losses times the model's coefficients.
    model = tiny_model(stage=3)
    aux = sum(moe.balance_coeff * row[f"{m}_balance"] + moe.z_loss_coeff * row[f"{m}_z_loss"]
              for m, moe in (("vision", model.vision.moe), ("connector", model.connector.moe)))
    assert row["loss"] == pytest.approx(row["lm_loss"] + aux, rel=1e-12)
    # The row in metrics.jsonl, after the step's training row.
    assert [is_training_row(r) for r in world_one["file"]] == [True, False]
    assert world_one["file"][1] == row


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_rank_layouts_match_world_one(world_one, two_ranks, layout):
    """Each record counts once whatever the sharding; every rank gets the same figures."""
    run = two_ranks[layout]
    (row,), (other,) = run["ranks"]
    want = world_one["rows"][0]
    assert _figures(row) == _figures(other)
    assert (row["records"], row["skipped"], row["tokens"]) == (RECORDS, 0, want["tokens"])
    for key in ("lm_loss", "loss", *AUX):
        assert row[key] == pytest.approx(want[key], rel=RTOL), (layout, key)
    assert [_figures(r) for r in _validation_rows(run["file"])] == [_figures(row)]  # once, by the reporter


@pytest.fixture(scope="module")
def resumed(dataset, init_weights, eval_file, tmp_path_factory) -> dict:
    """Dropout on, validation every step: killed while saving checkpoint 4 and resumed; and the same
    run without validation, uninterrupted."""
    root = tmp_path_factory.mktemp("val-resume")
    cfg = experiment(dataset, "", load=init_weights, **STEPS)
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.1
    plain = copy.deepcopy(cfg)
    cfg.data.eval_files = [eval_file]
    cfg.train.eval_interval = 1
    out = _killed_then_resumed(cfg, root)
    plain.train.save = str(root / "plain")
    Trainer(plain).train()
    out["plain"] = read_metrics(root / "plain")
    return out


def test_validation_leaves_training_bit_identical(resumed):
    """Same training rows, bit for bit, with and without validation (no RNG draw, no data read)."""
    straight = [r for r in resumed["straight"] if is_training_row(r)]
    _same_rows(straight, resumed["plain"])


def test_resume_with_validation_is_bit_exact(resumed):
    assert resumed["resumed_from"].name == "iter_0000002"
    straight, again = resumed["straight"], resumed["resumed"]
    # Each step's training row, then its validation row (written before the step's checkpoint).
    assert [(r["step"], is_training_row(r)) for r in straight] == [(s, t) for s in range(1, 5) for t in (True, False)]
    assert [(r["step"], is_training_row(r)) for r in again] == [(r["step"], is_training_row(r)) for r in straight]
    _same_rows([r for r in again if is_training_row(r)], [r for r in straight if is_training_row(r)])
    for got, want in zip(_validation_rows(again), _validation_rows(straight)):
        for key in ("lm_loss", "loss", "tokens", "records", *AUX):
            assert got[key] == want[key], (got["step"], key)
    losses = [r["lm_loss"] for r in _validation_rows(straight)]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 4  # the weights move


def test_tensorboard_tags_validation_apart(resumed):
    """The resumed run's validations (steps 3, 4) under their own tags; the killed run's events
    may be lost with it (TensorBoard flushes on close)."""
    events = EventAccumulator(str(resumed["save"] / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"validation/lm_loss", "validation/vision_balance", "lm_loss"} <= set(tags)
    assert "validation/lr" not in tags and "validation/step" not in tags
    assert {3, 4} <= {e.step for e in events.Scalars("validation/lm_loss")}


def test_training_rows_exclude_nothing_but_validation():
    assert is_training_row({"step": 1, "loss": 2.0}) and is_training_row({"step": 1, "split": "train"})
    assert not is_training_row({"step": 1, "split": "validation"})


@pytest.mark.parametrize("images, texts, mbs, dp", [(5, 2, 1, 2), (5, 2, 2, 2), (4, 1, 2, 1), (1, 0, 3, 2),
                                                    (0, 3, 1, 2), (8, 8, 2, 2), (1, 1, 1, 3)])
def test_eval_plan_deals_every_record_once(images, texts, mbs, dp):
    """Every record once; every rank the same number of micro-batches, each with images on every
    rank or on none (a stand-in where a rank has no image record); stand-ins only without records."""
    records = images + texts
    lengths = [(7 * i) % 5 for i in range(records)]
    has_image = [i < images for i in range(records)]
    plans = [eval_plan(lengths, has_image, mbs, dp, rank) for rank in range(dp)]
    assert len({len(plan) for plan in plans}) == 1
    assert all(len(mb) == mbs for plan in plans for mb in plan)
    dealt = [i for plan in plans for mb in plan for i in mb if i >= 0]
    assert sorted(dealt) == list(range(records))
    for step in zip(*plans):
        image_rows = [any(i <= STAND_IN or (i >= 0 and has_image[i]) for i in mb) for mb in step]
        assert len(set(image_rows)) == 1, step
        for mb in step:
            stand_ins = [i for i in mb if i <= STAND_IN]
            assert not stand_ins or (len(stand_ins) == 1 and all(i == PADDING for i in mb if i > STAND_IN)), mb
            assert all(has_image[STAND_IN - i] for i in stand_ins)


def test_due_every_interval_and_at_the_end():
    assert [s for s in range(1, 11) if due(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 10, 0)] == [10]


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_interval=-1"], "train.eval_interval must be >= 0"),
    (["train.eval_interval=5"], "train.eval_interval=5 but data.eval_files is empty"),
])
def test_eval_interval_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(ExperimentConfig, overrides)
