"""Dataset of tokenised samples, bad-record handling, collate, and a full pass with a few bad records."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cumo_megatron.data.batching import Collator, collate
from cumo_megatron.data.dataset import DataHealth, LlavaDataset, Sample, Skipped
from cumo_megatron.data.images import ImageProcessor
from cumo_megatron.data.records import DataError, DataSource, Mixture, ProblemKind
from cumo_megatron.data.sampler import ResumableLoader
from cumo_megatron.data.templates import tokenize_conversation
from cumo_megatron.data.tokenizer import load_tokenizer
from tests.fixtures.tiny_models import save_images, tiny_sentencepiece

TPI = 4  # tokens per image
MAX_LEN = 320
IMG = 28


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tiny_sentencepiece(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    save_images(d, 12, size=40)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return d


def good(i, image=True, answer="A red circle on a blue square."):
    """A well-formed record; with ``image`` it uses img_{i % 12}.png."""
    q = "What shapes are in the picture?"
    out = {"id": f"good{i}", "conversations": [{"from": "human", "value": ("<image>\n" + q) if image else q}, {"from": "gpt", "value": answer}]}
    if image:
        out["image"] = f"img_{i % 12:04d}.png"
    return out


def bad_records():
    """One record per kind a training pass must skip, keyed by the kind it should be reported as."""
    long_first_round = " ".join(["the green triangle is next to the yellow circle"] * 40)
    return {
        ProblemKind.MISSING_IMAGE: {**good(100), "id": "bad_missing", "image": "nowhere.png"},
        ProblemKind.UNREADABLE_IMAGE: {**good(101), "id": "bad_corrupt", "image": "corrupt.png"},
        ProblemKind.ROLE_ORDER: {"id": "bad_roles", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]},
        ProblemKind.UNEXPECTED_IMAGE_TOKEN: {**good(102, image=False), "id": "bad_token", "conversations": good(1)["conversations"]},
        ProblemKind.MISSING_IMAGE_TOKEN: {**good(103, image=False), "id": "bad_noplace", "image": "img_0001.png"},
        ProblemKind.MALFORMED: {"id": "bad_shape", "conversations": "not a list"},
        # The image comes after a long first round: cutting at MAX_LEN would split it -> skipped.
        ProblemKind.TOO_LONG: {
            "id": "bad_long",
            "image": "img_0002.png",
            "conversations": [
                {"from": "human", "value": long_first_round},
                {"from": "gpt", "value": "yes"},
                {"from": "human", "value": "<image>\nAnd here?"},
                {"from": "gpt", "value": "a square"},
            ],
        },
    }


def write_data(tmp_path, n_good_img=10, n_good_txt=6, with_bad=True):
    """a.json (list) + b.jsonl (lines, with one unparseable line); returns (sources, bad ids)."""
    bad = bad_records() if with_bad else {}
    a = [good(i) for i in range(n_good_img)] + list(bad.values())[:4]
    b_lines = [json.dumps(good(50 + i, image=False)) for i in range(n_good_txt)] + [json.dumps(r) for r in list(bad.values())[4:]]
    bad_ids = {r["id"] for r in bad.values()}
    if with_bad:
        b_lines.insert(2, '{"id": "bad_json", "conversations": [')  # a truncated line
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.jsonl").write_text("\n".join(b_lines) + "\n")
    return [DataSource(str(tmp_path / "a.json")), DataSource(str(tmp_path / "b.jsonl"))], bad_ids


def make_dataset(tmp_path, tokenizer, image_dir, policy="skip", **kw):
    sources, bad_ids = write_data(tmp_path, **kw)
    mixture = Mixture(sources, default_image_folder=str(image_dir))
    proc = ImageProcessor(size=IMG, crop_size=IMG, aspect="pad")
    ds = LlavaDataset(mixture, tokenizer, "vicuna_v1", TPI, MAX_LEN, proc, policy=policy)
    return ds, bad_ids


def test_sample_is_the_templates_output_plus_the_processed_image(tmp_path, tokenizer, image_dir):
    ds, _ = make_dataset(tmp_path, tokenizer, image_dir, with_bad=False)
    s = ds[3]
    assert isinstance(s, Sample) and s.record_id == "good3"
    ref = tokenize_conversation("vicuna_v1", good(3)["conversations"], tokenizer, TPI, MAX_LEN)
    assert s.input_ids.tolist() == ref.input_ids and s.labels.tolist() == ref.labels
    assert s.loss_mask.tolist() == [float(m) for m in ref.loss_mask]
    assert int((s.input_ids == -200).sum()) == TPI
    proc = ImageProcessor(size=IMG, crop_size=IMG, aspect="pad")
    torch.testing.assert_close(s.images, proc.load(image_dir / "img_0003.png")[None], atol=0, rtol=0)
    text = ds[10]  # first record of b.jsonl: text-only
    assert isinstance(text, Sample) and text.images is None and not bool((text.input_ids == -200).any())
    assert ds.has_image().tolist() == [True] * 10 + [False] * 6


def test_truncated_samples_are_used_and_reported(tmp_path, tokenizer, image_dir):
    long_answer = " ".join(["a big purple ellipse"] * 80)
    (tmp_path / "t.json").write_text(json.dumps([good(0, answer=long_answer)]))
    ds = LlavaDataset(
        Mixture([DataSource(str(tmp_path / "t.json"))], default_image_folder=str(image_dir)),
        tokenizer, "vicuna_v1", TPI, MAX_LEN, ImageProcessor(size=IMG, crop_size=IMG),
    )
    s = ds[0]
    assert isinstance(s, Sample) and len(s.input_ids) == MAX_LEN
    assert s.truncated is not None and "good0" in str(s.truncated)
    assert s.loss_mask[-1] == 0  # the target beyond the cut is not trained on


def test_collate_pads_per_batch_or_to_a_fixed_length(tmp_path, tokenizer, image_dir):
    ds, _ = make_dataset(tmp_path, tokenizer, image_dir, with_bad=False)
    items = [ds[0], ds[10], ds[1]]  # image, text, image
    fake_skip = Skipped(5, ds.mixture[5].problem(ProblemKind.MISSING_IMAGE, "gone"))
    items.insert(2, fake_skip)
    batch = collate(items, pad_id=tokenizer.pad_id)
    longest = max(len(it.input_ids) for it in items if isinstance(it, Sample))
    assert batch["input_ids"].shape == (4, longest) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == batch["loss_mask"].shape == (4, longest)
    for row, it in enumerate(items):
        if isinstance(it, Skipped):
            assert batch["loss_mask"][row].sum() == 0 and (batch["input_ids"][row] == tokenizer.pad_id).all()
            continue
        n = len(it.input_ids)
        assert torch.equal(batch["input_ids"][row, :n], it.input_ids)
        assert torch.equal(batch["labels"][row, :n], it.labels)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all()
        assert (batch["labels"][row, n:] == 0).all() and (batch["loss_mask"][row, n:] == 0).all()
    # Images stacked in sample order: sample 0's image then sample 1's.
    assert batch["images"].shape == (2, 3, IMG, IMG)
    assert torch.equal(batch["images"][0], items[0].images[0]) and torch.equal(batch["images"][1], items[3].images[0])
    assert batch["indices"] == [0, 10, 5, 1] and batch["skipped"] == [fake_skip]
    fixed = Collator(pad_id=tokenizer.pad_id, fixed_length=MAX_LEN)(items)
    assert fixed["input_ids"].shape == (4, MAX_LEN)
    assert torch.equal(fixed["input_ids"][:, :longest], batch["input_ids"])
    assert fixed["loss_mask"][:, longest:].sum() == 0
    assert collate(items, pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0
    with pytest.raises(DataError, match="fixed length 8"):
        collate(items, fixed_length=8)
    text_only = collate([ds[10], ds[11]])
    assert text_only["images"] is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_full_pass_with_bad_records_completes_and_reports_exactly_them(tmp_path, tokenizer, image_dir, num_workers, caplog):
    ds, bad_ids = make_dataset(tmp_path, tokenizer, image_dir)
    n = len(ds)
    assert n == 10 + 6 + len(bad_records()) + 1
    health = DataHealth()
    loader = ResumableLoader.build(ds, micro_batch_size=3, seed=1, pad_id=tokenizer.pad_id, health=health, num_workers=num_workers)
    seen, trained, images_seen = [], [], 0
    with caplog.at_level(logging.WARNING, logger="cumo_megatron.data"):
        for batch in loader.epoch():
            assert batch["input_ids"].shape[0] == 3  # skipped samples keep the row: shapes never change
            seen += batch["indices"]
            skipped_rows = {sk.index for sk in batch["skipped"]}
            trained += [rid for idx, rid in zip(batch["indices"], batch["record_ids"]) if idx not in skipped_rows]
            n_images = 0 if batch["images"] is None else batch["images"].shape[0]
            # One image per run of TPI placeholders, in the same batch.
            assert int((batch["input_ids"] == -200).sum()) == n_images * TPI
            images_seen += n_images
    # Every entry met once (n = 24 is a multiple of 3: no wrap-around padding).
    assert sorted(seen) == list(range(n))
    assert sorted(trained) == sorted([f"good{i}" for i in range(10)] + [f"good{50 + i}" for i in range(6)])
    # Exactly the bad records, by id (the unparseable JSON line has none) and by place.
    assert health.skipped_ids() == bad_ids | {None}
    bad_places = {(str(tmp_path / "a.json"), i) for i in range(10, 14)} | {(str(tmp_path / "b.jsonl"), i) for i in (2, 7, 8, 9)}
    assert set(health.skipped) == bad_places
    expected_kinds = {kind: 1 for kind in bad_records()}
    expected_kinds[ProblemKind.BAD_JSON] = 1
    assert health.counts == expected_kinds
    assert health.events == len(bad_places)
    assert images_seen == 10  # the good image records; bad ones contributed none
    by_id = {p.record_id: p for p in health.skipped.values()}
    assert by_id[None].kind == ProblemKind.BAD_JSON and "b.jsonl record 2 (line 3" in str(by_id[None])
    assert "a.json record 10" in str(by_id["bad_missing"])
    # Each bad record is logged with where it is and its id.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for rid in bad_ids:
        assert f"id={rid!r}" in logged
    assert "b.jsonl record 2 (line 3, no id)" in logged
    assert "skipped records: 8" in health.summary()
    # A second epoch meets them again: events grow, distinct records do not.
    for _ in loader.epoch():
        pass
    assert health.events == 2 * len(bad_places) and set(health.skipped) == bad_places
    restored = DataHealth()
    restored.load_state_dict(health.state_dict())
    assert restored.skipped == health.skipped and restored.events == health.events


def test_policy_fail_stops_at_start_for_malformed_and_at_the_sample_for_images(tmp_path, tokenizer, image_dir):
    with pytest.raises(DataError, match=r"(?s)5 bad record\(s\).*bad_roles") as info:
        make_dataset(tmp_path, tokenizer, image_dir, policy="fail")
    assert "b.jsonl record 2 (line 3" in str(info.value)
    # Only image problems (not visible without opening files): raised when the sample is met.
    (tmp_path / "c.json").write_text(json.dumps([good(0), {**good(1), "id": "gone", "image": "nowhere.png"}]))
    ds = LlavaDataset(
        Mixture([DataSource(str(tmp_path / "c.json"))], default_image_folder=str(image_dir)),
        tokenizer, "vicuna_v1", TPI, MAX_LEN, ImageProcessor(size=IMG, crop_size=IMG), policy="fail",
    )
    assert isinstance(ds[0], Sample)
    with pytest.raises(DataError, match=r"c.json record 1 \(id='gone'\).*missing_image"):
        ds[1]


def test_unknown_template_and_missing_image_processor_fail_at_construction(tmp_path, tokenizer, image_dir):
    sources, _ = write_data(tmp_path, with_bad=False)
    mixture = Mixture(sources, default_image_folder=str(image_dir))
    with pytest.raises(ValueError, match="unknown template"):
        LlavaDataset(mixture, tokenizer, "chatml", TPI, MAX_LEN, ImageProcessor(size=IMG, crop_size=IMG))
    with pytest.raises(DataError, match="no image processor"):
        LlavaDataset(mixture, tokenizer, "vicuna_v1", TPI, MAX_LEN, None)


def _image_dataset(tmp_path, image_dir, tokenizer, records, **kw):
    (tmp_path / "c.json").write_text(json.dumps(records))
    proc = ImageProcessor(size=IMG, crop_size=IMG, max_aspect_ratio=kw.pop("max_aspect_ratio", 20))
    return LlavaDataset(Mixture([DataSource(str(tmp_path / "c.json"))], default_image_folder=str(image_dir)),
                        tokenizer, "vicuna_v1", TPI, MAX_LEN, proc, **kw)


def test_images_outside_the_folder_and_elongated_images_are_bad_records(tmp_path, tokenizer, image_dir):
    from PIL import Image

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    Image.new("RGB", (2, 100)).save(tmp_path / "strip.png")  # 50:1
    records = [good(0),
               {**good(1), "id": "dotdot", "image": "../" + tmp_path.name + "/outside.png"},
               {**good(2), "id": "absolute", "image": str(outside)},
               {**good(3), "id": "strip", "image": str(tmp_path / "strip.png")}]
    ds = _image_dataset(tmp_path, image_dir, tokenizer, records)
    assert isinstance(ds[0], Sample)
    assert [ds[i].problem.kind for i in (1, 2, 3)] == [ProblemKind.IMAGE_OUTSIDE_FOLDER] * 3
    assert "id='dotdot'" in str(ds[1].problem) and "allow_images_outside" in str(ds[1].problem)
    # The explicit option reads them; the strip then meets the aspect-ratio bound (and passes a looser one).
    allowed = _image_dataset(tmp_path, image_dir, tokenizer, records, allow_images_outside=True)
    assert isinstance(allowed[1], Sample) and isinstance(allowed[2], Sample)
    assert allowed[3].problem.kind == ProblemKind.IMAGE_ASPECT_RATIO
    loose = _image_dataset(tmp_path, image_dir, tokenizer, records, allow_images_outside=True, max_aspect_ratio=60)
    assert isinstance(loose[3], Sample)
    # Policy fail: paths that leave the folder by their text are found at start, on every rank.
    with pytest.raises(DataError, match=r"(?s)3 bad record\(s\).*id='dotdot'.*image_outside_folder.*id='absolute'.*id='strip'"):
        _image_dataset(tmp_path, image_dir, tokenizer, records, policy="fail")
    with pytest.raises(DataError, match="nowhere is not a directory"):
        _image_dataset(tmp_path, tmp_path / "nowhere", tokenizer, records)


def test_policy_fail_in_a_worker_process_stops_the_main_process_without_a_traceback(tmp_path, tokenizer, image_dir):
    ds = _image_dataset(tmp_path, image_dir, tokenizer, [good(0), {**good(1), "id": "gone", "image": "nowhere.png"}],
                        policy="fail")
    loader = ResumableLoader.build(ds, micro_batch_size=2, pad_id=tokenizer.pad_id, health=DataHealth(), num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'c.json'} record 1 (id='gone'): [missing_image]")
    assert "Traceback" not in message and "data.policy=skip" in message
