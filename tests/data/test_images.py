"""CLIP preprocessing against transformers' CLIP image processors (built locally, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cumo_megatron.config.schema import VisionConfig
from cumo_megatron.data.images import ImageError, ImageProcessor, expand_to_square, load_rgb
from tests.fixtures.tiny_models import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

SIZES = [(50, 40), (40, 77), (32, 32), (17, 23), (100, 33)]
HF_CFG = {
    "size": {"shortest_edge": 32},
    "crop_size": {"height": 32, "width": 32},
    "resample": 3,
    "image_mean": CLIP_IMAGE_MEAN,
    "image_std": CLIP_IMAGE_STD,
}


def noise_image(w, h, seed=0):
    """Random RGB image: every pixel differs, so any resampling or offset error shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resize_and_center_crop_match_clip_image_processors():
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ours = ImageProcessor.from_preprocessor_config(HF_CFG, aspect="crop")
    pil_ref = CLIPImageProcessorPil(**HF_CFG)  # the PIL path the reference (transformers 4) used
    tv_ref = CLIPImageProcessor(**HF_CFG)  # transformers 5 default: torchvision resize
    for k, (w, h) in enumerate(SIZES):
        img = noise_image(w, h, seed=k)
        x = ours(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        ref = torch.as_tensor(np.asarray(pil_ref(img, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
        # torchvision's bicubic rounds differently by at most one level of 255 on some pixels.
        tv = tv_ref(img, return_tensors="pt")["pixel_values"][0]
        assert (x - tv).abs().max() <= 1.01 / 255 / min(CLIP_IMAGE_STD)
        assert (x - tv).abs().mean() < 1e-3


def test_pad_mode_is_expand_to_square_with_mean_colour_then_resize():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ours = ImageProcessor.from_preprocessor_config(HF_CFG, aspect="pad")
    ref = CLIPImageProcessorPil(**HF_CFG)
    background = tuple(int(m * 255) for m in CLIP_IMAGE_MEAN)
    for k, (w, h) in enumerate(SIZES):
        img = noise_image(w, h, seed=10 + k)
        square = expand_to_square(img, background)
        assert square.size == (max(w, h),) * 2
        expected = torch.as_tensor(np.asarray(ref(square, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(ours(img), expected, atol=1e-5, rtol=0)
    # A wide image padded top and bottom: the first rows are the mean colour, i.e. ~0 after normalising.
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    x = ImageProcessor(size=32, crop_size=32, aspect="pad")(wide)
    top = x[:, :4, :].reshape(3, -1)
    expected_bg = (torch.tensor(background) / 255 - torch.tensor(CLIP_IMAGE_MEAN)) / torch.tensor(CLIP_IMAGE_STD)
    torch.testing.assert_close(top, expected_bg[:, None].expand_as(top), atol=1e-6, rtol=0)
    assert x[0, 16, 16] > 1.5  # the red image is in the middle


def test_expand_to_square_places_image_centred():
    img = Image.new("RGB", (10, 4), (9, 9, 9))
    sq = np.asarray(expand_to_square(img, (1, 2, 3)))
    assert sq.shape == (10, 10, 3)
    rows = np.where((sq == 9).all(axis=2).any(axis=1))[0]
    assert rows.tolist() == [3, 4, 5, 6]  # (10 - 4) // 2 = 3 rows above
    assert (sq[0, 0] == (1, 2, 3)).all()
    tall = np.asarray(expand_to_square(Image.new("RGB", (3, 8), (9, 9, 9)), (0, 0, 0)))
    cols = np.where((tall == 9).all(axis=2).any(axis=0))[0]
    assert cols.tolist() == [2, 3, 4]


def test_normalisation_comes_from_the_vision_config():
    cfg = VisionConfig(image_size=28, patch_size=14, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    proc = ImageProcessor.from_vision_config(cfg, aspect="crop")
    x = proc(Image.new("RGB", (40, 28), (255, 0, 128)))
    assert x.shape == (3, 28, 28)
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([2.0, -1.0, 128 / 255 - 0.5]), atol=1e-6, rtol=0)


def test_preprocessor_config_from_a_checkpoint_directory(tmp_path):
    from tests.fixtures.tiny_models import save_hf_clip_vision

    save_hf_clip_vision(tmp_path / "clip")
    proc = ImageProcessor.from_preprocessor_config(tmp_path / "clip", aspect="crop")
    assert proc.mean == pytest.approx(CLIP_IMAGE_MEAN) and proc.std == pytest.approx(CLIP_IMAGE_STD)
    assert proc(noise_image(50, 60)).shape == (3, proc.crop_size, proc.crop_size)


def test_missing_and_corrupt_files_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="not found") as missing:
        load_rgb(tmp_path / "nope.png")
    assert missing.value.missing
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot decode") as bad:
        load_rgb(garbage)
    assert not bad.value.missing
    good = tmp_path / "good.png"
    noise_image(30, 30).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="cannot decode"):
        load_rgb(truncated)
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 7).save(grey)
    assert load_rgb(grey).mode == "RGB"


# ---------------------------------------------------------------- paths and elongated images
from cumo_megatron.data.images import image_path, leaves_folder  # noqa: E402
from cumo_megatron.data.records import ProblemKind  # noqa: E402


def test_image_paths_stay_inside_the_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    noise_image(8, 8).save(folder / "sub" / "in.png")
    noise_image(8, 8).save(tmp_path / "outside.png")
    (folder / "link_out.png").symlink_to(tmp_path / "outside.png")
    (folder / "link_in.png").symlink_to(folder / "sub" / "in.png")
    linked_folder = tmp_path / "folder_link"
    linked_folder.symlink_to(folder)  # a folder that is itself a link is fine
    assert image_path(folder, "sub/in.png") == folder / "sub" / "in.png"
    assert image_path(folder, "sub/../sub/in.png") == folder / "sub/../sub/in.png"
    assert image_path(folder, "link_in.png") == folder / "link_in.png"
    assert image_path(linked_folder, "sub/in.png") == linked_folder / "sub" / "in.png"
    for name in ("../outside.png", str(tmp_path / "outside.png"), "link_out.png", "sub/../../outside.png"):
        with pytest.raises(ImageError, match="outside the image folder") as info:
            image_path(folder, name)
        assert info.value.kind == ProblemKind.IMAGE_OUTSIDE_FOLDER and "allow_images_outside" in str(info.value)
        assert image_path(folder, name, allow_outside=True) == folder / name  # the explicit opt-in
    assert image_path(None, "../anything.png") == Path("../anything.png")  # no folder: nothing to confine to
    # The text-only check the dataset runs on every record at start (links need the file system).
    assert [leaves_folder(n) for n in ("a.png", "sub/../a.png", "../a.png", "/abs/a.png", "sub/../../a.png", "..a.png")] == [
        False, False, True, True, True, False]
    with pytest.raises(ImageError, match="NUL") as nul:
        image_path(folder, "a\x00.png")
    assert nul.value.kind == ProblemKind.MISSING_IMAGE


def test_elongated_images_are_refused_from_the_header(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 8000)).save(strip)
    assert strip.stat().st_size < 200  # tiny on disk, 8000x8000 once padded to a square
    with pytest.raises(ImageError, match=r"1x8000, an aspect ratio above 20") as info:
        load_rgb(strip, max_aspect_ratio=20)
    assert info.value.kind == ProblemKind.IMAGE_ASPECT_RATIO
    assert load_rgb(strip, max_aspect_ratio=8000).size == (1, 8000)  # a looser bound lets it through
    assert load_rgb(strip).size == (1, 8000)  # no bound given: no check
    # Only the header is read: a file cut right after it still reports the aspect ratio, not a decode error.
    header_only = tmp_path / "header_only.png"
    Image.new("L", (50000, 1)).save(header_only)
    data = header_only.read_bytes()
    header_only.write_bytes(data[: data.index(b"IDAT") + 8])  # up to the first bytes of pixel data
    with pytest.raises(ImageError, match="50000x1") as cut:
        load_rgb(header_only, max_aspect_ratio=20)
    assert cut.value.kind == ProblemKind.IMAGE_ASPECT_RATIO
    with pytest.raises(ImageError, match="cannot decode"):
        load_rgb(header_only, max_aspect_ratio=1e9)
    # The processor applies its bound; 20:1 exactly is still allowed.
    proc = ImageProcessor(size=16, crop_size=16, max_aspect_ratio=20)
    Image.new("RGB", (20, 400)).save(tmp_path / "edge.png")
    assert proc.load(tmp_path / "edge.png").shape == (3, 16, 16)
    with pytest.raises(ImageError, match="aspect ratio"):
        proc.load(strip)


def test_image_error_survives_pickling_with_its_kind():
    """DataLoader workers pickle exceptions; the kind must come back."""
    import pickle

    err = pickle.loads(pickle.dumps(ImageError("x.png: too long", kind=ProblemKind.IMAGE_ASPECT_RATIO)))
    assert (str(err), err.kind, err.missing) == ("x.png: too long", ProblemKind.IMAGE_ASPECT_RATIO, False)
