"""CLIP image preprocessing: PIL for decoding and resizing, torch for the tensor.

Two modes, as the reference uses them:

* ``crop`` (CLIPImageProcessor's default; the reference's stage 1): resize the shortest side to
  ``size`` with bicubic resampling (the long side to ``int(size * long / short)``), then
  center-crop ``crop_size``;
* ``pad`` (the reference's stages 2 and 3, ``image_aspect_ratio=pad``): paste the image on a square
  canvas of the mean colour (``int(255 * mean)`` per channel), centred, then the same resize + crop
  (which on a square image is a plain resize).

Then scale to [0, 1] and normalise with the vision checkpoint's mean / std. The result is the base
image ``[3, crop, crop]`` float32; S2 multi-scale crops are computed by the model from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from cumo_megatron.data.records import ProblemKind
from cumo_megatron.errors import EXIT_DATA, UserError

__all__ = ["ImageError", "ImageProcessor", "check_aspect_ratio", "expand_to_square", "image_path", "is_image_file", "leaves_folder", "load_rgb"]

Aspect = Literal["crop", "pad"]


class ImageError(UserError, OSError):
    """An image cannot be used: missing, undecodable, outside the image folder or too elongated.

    ``kind`` is the `ProblemKind` a validator or the dataset reports it as; ``missing`` says whether
    the file does not exist (kept for callers that only tell missing from unreadable).
    """

    label = "image error"
    exit_status = EXIT_DATA

    def __init__(self, message: str, missing: bool = False, kind: Optional[str] = None):
        super().__init__(message)
        self.missing = missing
        self.kind = kind or (ProblemKind.MISSING_IMAGE if missing else ProblemKind.UNREADABLE_IMAGE)

    def __reduce__(self):
        # DataLoader workers pickle exceptions: keep every argument (the default passes only args).
        return (type(self), (str(self), self.missing, self.kind))


def image_path(folder, name: str, allow_outside: bool = False) -> Path:
    """Where image ``name`` of a record lives: ``folder / name`` (``name`` as is without a folder).

    With a folder and ``allow_outside`` false, a path that leaves the folder -- an absolute path,
    ``..`` components, or a symbolic link resolving elsewhere -- raises `ImageError` (kind
    ``image_outside_folder``): a data file should not make training read arbitrary files. Paths are
    compared after `os.path.realpath` of both sides, so a folder that is itself a link still works.
    """
    if "\0" in name:  # the OS refuses such names with a ValueError, not an OSError
        raise ImageError(f"image name {name!r} contains a NUL character", kind=ProblemKind.MISSING_IMAGE, missing=True)
    if folder is None:
        return Path(name)
    path = Path(folder) / name
    if allow_outside:
        return path
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    if os.path.commonpath([root, target]) != root:
        raise ImageError(
            f"image {name!r} resolves to {target}, outside the image folder {folder}; move it into the "
            "folder, or allow it with data.allow_images_outside=true (validate_data: --allow-images-outside)",
            kind=ProblemKind.IMAGE_OUTSIDE_FOLDER,
        )
    return path


def leaves_folder(name: str) -> bool:
    """Whether image ``name`` leaves its folder by its text alone (absolute, or ``..`` beyond the top):
    the file-system-free part of `image_path`'s check, cheap enough to run on every record at start."""
    return os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir


def check_aspect_ratio(size: tuple[int, int], max_aspect_ratio: Optional[float], path) -> None:
    """Raise `ImageError` (kind ``image_aspect_ratio``) when ``size``'s long side exceeds
    ``max_aspect_ratio`` times its short side: pad-to-square would build a ``long x long`` canvas
    (a 1x50000 strip: 7.5 GB) and resize-and-crop a ``size x size*ratio`` image. None: no bound."""
    width, height = size
    if max_aspect_ratio is None:
        return
    if min(width, height) < 1 or max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageError(
            f"image {path} is {width}x{height}, an aspect ratio above {max_aspect_ratio:g}; crop or drop it, or "
            "raise data.max_aspect_ratio (validate_data: --max-aspect-ratio)",
            kind=ProblemKind.IMAGE_ASPECT_RATIO,
        )


def is_image_file(path) -> bool:
    """Whether ``path`` is an existing file; a name the OS cannot even look up (too long, a NUL
    character) raises `ImageError` rather than the OSError / ValueError `Path.is_file` lets through."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot look up image {str(path)[:300]!r}: {exc}", missing=True) from None


def load_rgb(path, max_aspect_ratio: Optional[float] = None) -> Image.Image:
    """Open ``path`` fully (so truncated files fail here, not later) and convert it to RGB.

    With ``max_aspect_ratio`` the size is checked from the header first (`check_aspect_ratio`),
    before any pixel is decoded.
    """
    path = Path(path)
    if not is_image_file(path):
        raise ImageError(f"image file not found: {path}", missing=True)
    try:
        img = Image.open(path)
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise ImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    with img:
        check_aspect_ratio(img.size, max_aspect_ratio, path)
        try:
            img.load()
            return img.convert("RGB")
        except Exception as exc:
            raise ImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def expand_to_square(img: Image.Image, background: Sequence[int]) -> Image.Image:
    """Centre ``img`` on a square canvas of colour ``background`` (the reference's ``expand2square``)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), tuple(background))
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class ImageProcessor:
    """Turns an RGB PIL image into a normalised ``[3, crop_size, crop_size]`` float32 tensor."""

    size: int = 336  # shortest side after resizing
    crop_size: int = 336
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    aspect: Aspect = "pad"
    resample: int = Image.Resampling.BICUBIC
    max_aspect_ratio: Optional[float] = None  # refuse more elongated images (`check_aspect_ratio`)

    def __post_init__(self):
        if self.aspect not in ("crop", "pad"):
            raise ValueError(f"image aspect {self.aspect!r} is unknown; use 'crop' or 'pad'")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image mean/std need 3 channels, got mean={self.mean} std={self.std}")
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_vision_config(
        cls, vision_cfg, aspect: Aspect = "pad", max_aspect_ratio: Optional[float] = None
    ) -> "ImageProcessor":
        """From our `VisionConfig` (its ``image_size``, ``image_mean``, ``image_std``, which the
        checkpoint adapters fill from the vision checkpoint)."""
        return cls(
            size=vision_cfg.image_size,
            crop_size=vision_cfg.image_size,
            mean=list(vision_cfg.image_mean),
            std=list(vision_cfg.image_std),
            aspect=aspect,
            max_aspect_ratio=max_aspect_ratio,
        )

    @classmethod
    def from_preprocessor_config(cls, config, aspect: Aspect = "pad") -> "ImageProcessor":
        """From a HF ``preprocessor_config.json`` (dict, file, or directory holding it)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "preprocessor_config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        size = config.get("size", 224)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = config.get("crop_size", size)
        crop = crop.get("height") if isinstance(crop, dict) else crop
        if isinstance(config.get("crop_size"), dict) and config["crop_size"].get("height") != config["crop_size"].get("width"):
            raise ValueError(f"crop_size {config['crop_size']} is not square; CLIP towers take square images")
        return cls(
            size=int(size),
            crop_size=int(crop),
            mean=[float(x) for x in config.get("image_mean", cls.__dataclass_fields__["mean"].default_factory())],
            std=[float(x) for x in config.get("image_std", cls.__dataclass_fields__["std"].default_factory())],
            aspect=aspect,
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
        )

    @property
    def background(self) -> tuple[int, int, int]:
        """Pad colour: the mean in 0..255, truncated as the reference does."""
        return tuple(int(x * 255) for x in self.mean)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing the shortest side to ``size`` (CLIPImageProcessor's rule)."""
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Preprocess one PIL image; returns float32 ``[3, crop_size, crop_size]``."""
        img = img.convert("RGB")
        if self.aspect == "pad":
            img = expand_to_square(img, self.background)
        target = self.resized_size(*img.size)
        if target != img.size:
            img = img.resize(target, resample=self.resample)
        arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
        top = (arr.shape[0] - self.crop_size) // 2
        left = (arr.shape[1] - self.crop_size) // 2
        if top < 0 or left < 0:
            raise ValueError(f"resized image {arr.shape[1]}x{arr.shape[0]} is smaller than crop {self.crop_size}")
        arr = arr[top : top + self.crop_size, left : left + self.crop_size]
        x_chw = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).to(torch.float32) / 255.0
        return (x_chw - self._mean) / self._std

    def load(self, path) -> torch.Tensor:
        """Open ``path`` (raising `ImageError`, also for an aspect ratio above ``max_aspect_ratio``)
        and preprocess it."""
        return self(load_rgb(path, self.max_aspect_ratio))
