"""Map-style dataset of tokenised LLaVA samples, and the `DataHealth` counter of bad ones.

``dataset[i]`` is a `Sample` (``input_ids`` with each image pre-expanded to ``tokens_per_image``
copies of ``image_token_id``, shifted ``labels``, ``loss_mask``, ``images [k, 3, H, W]`` or None)
or, when entry ``i`` cannot be used, a `Skipped` marker naming the record and the reason. With
``policy="fail"`` the same problem raises `DataError` instead, and structurally broken records
are reported when the dataset is built (not hours into a run).

A skipped sample is never replaced by another one: the collate function turns it into an empty
row (no loss), so batch shapes, the sample order and every other sample stay exactly as planned;
`DataHealth` (fed by `ResumableLoader`) counts and logs each bad record once, with its id.

Tokenisation, masking and truncation are the template's (`templates.tokenize_conversation`):
samples longer than ``max_length`` are truncated as the reference does, unless the cut would fall
inside an image's tokens (then skipped as ``too_long``); each truncation is counted too. Records
the reference would silently alter (a conversation opening with a gpt turn, which it drops) are
skipped and reported as ``role_order`` instead.

Images are read as `images.image_path` allows (inside the image folder unless
``allow_images_outside``) and refused above the processor's ``max_aspect_ratio``; both are bad
records like any other (``image_outside_folder``, ``image_aspect_ratio``). With ``policy="fail"``
in a DataLoader worker the problem travels to the main process as a fatal `Skipped` marker, which
`sampler.ResumableLoader` raises there (`fail_error`), so the user reads the message, not the
worker's traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from cumo_megatron.config.schema import IMAGE_TOKEN_ID
from cumo_megatron.data.images import ImageError, ImageProcessor, image_path, leaves_folder
from cumo_megatron.data.records import (
    DataError,
    Mixture,
    Problem,
    ProblemKind,
    RawRecord,
    check_record,
    record_images,
)

__all__ = ["Policy", "Sample", "Skipped", "fail_error", "DataHealth", "Encoded", "EncodeFailure", "encode_conversation", "LlavaDataset"]

Policy = Literal["skip", "fail"]
TRUNCATED = "truncated"  # DataHealth kind of a sample cut to max_length (used, not skipped)

logger = logging.getLogger("cumo_megatron.data")


@dataclass
class Sample:
    """One usable training sample (1-D tensors of one length ``s``)."""

    input_ids: torch.Tensor  # [s] int64; images pre-expanded as image_token_id runs
    labels: torch.Tensor  # [s] int64; labels[t] = token at t + 1
    loss_mask: torch.Tensor  # [s] float32; 1 where labels[t] is supervised
    images: Optional[torch.Tensor]  # [k, 3, H, W] float32, in the order of their placeholders
    index: int  # dataset index
    record_id: Optional[str]
    truncated: Optional[Problem] = None  # set when the sample was cut to max_length


@dataclass(frozen=True)
class Skipped:
    """Dataset entry ``index`` could not be used; ``problem`` says where and why.

    ``fatal`` (policy ``fail`` in a DataLoader worker) asks the main process to stop with
    `fail_error`: an exception raised in a worker would reach the user wrapped in the worker's
    traceback, so the worker hands the problem over instead.
    """

    index: int
    problem: Problem
    fatal: bool = False


def fail_error(problem: Problem) -> DataError:
    """The `DataError` that stops a run with policy ``fail`` at ``problem``."""
    return DataError(
        f"{problem}\nfix or remove the record (tools/validate_data.py lists every bad one), or set "
        "data.policy=skip to skip and count bad records"
    )


@dataclass
class Encoded:
    """What the template + tokenizer produced for one conversation (our shifted-label convention)."""

    input_ids: torch.Tensor  # [s] int64
    labels: torch.Tensor  # [s] int64
    loss_mask: torch.Tensor  # [s] float32
    num_images: int
    truncated: bool


@dataclass(frozen=True)
class EncodeFailure:
    """Why a conversation could not be encoded: a `ProblemKind` and a message."""

    kind: str
    message: str


class DataHealth:
    """Counts bad records (each once, by file and index) and logs each with its id.

    ``skipped`` maps ``(file, index)`` to the `Problem`; ``counts`` the number of distinct records
    per kind; ``events`` how many times bad samples were met (a record seen in two epochs counts
    twice there). Truncations are counted apart (the sample was still used).
    """

    def __init__(self, log_limit: int = 1000):
        self.skipped: dict[tuple[str, int], Problem] = {}
        self.truncated: dict[tuple[str, int], Problem] = {}
        self.events = 0
        self.log_limit = log_limit

    @property
    def counts(self) -> dict[str, int]:
        """Distinct skipped records per problem kind."""
        out: dict[str, int] = {}
        for problem in self.skipped.values():
            out[problem.kind] = out.get(problem.kind, 0) + 1
        return out

    def skipped_ids(self) -> set[Optional[str]]:
        """Record ids of every skipped record (None for records without an id)."""
        return {p.record_id for p in self.skipped.values()}

    def record(self, skipped: Skipped) -> None:
        """Count one skipped sample; log it the first time this record is met."""
        self.events += 1
        key = (skipped.problem.source, skipped.problem.index)
        if key in self.skipped:
            return
        self.skipped[key] = skipped.problem
        if len(self.skipped) <= self.log_limit:
            logger.warning("skipped bad sample: %s", skipped.problem)
        elif len(self.skipped) == self.log_limit + 1:
            logger.warning("more than %d bad samples; further ones are counted but not logged", self.log_limit)

    def record_truncated(self, problem: Problem) -> None:
        """Count one truncated sample (logged once per record)."""
        key = (problem.source, problem.index)
        if key not in self.truncated:
            self.truncated[key] = problem
            if len(self.truncated) <= self.log_limit:
                logger.info("truncated sample: %s", problem)

    def summary(self) -> str:
        """One line: skipped records per kind, events, truncations."""
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.counts.items())) or "none"
        return f"skipped records: {len(self.skipped)} ({kinds}); skip events: {self.events}; truncated: {len(self.truncated)}"

    def state_dict(self) -> dict:
        """Plain-Python state for checkpoints."""
        as_dict = lambda p: dict(  # noqa: E731
            kind=p.kind, source=p.source, index=p.index, record_id=p.record_id, message=p.message, line=p.line
        )
        return {
            "skipped": [as_dict(p) for p in self.skipped.values()],
            "truncated": [as_dict(p) for p in self.truncated.values()],
            "events": self.events,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore counts saved by `state_dict`."""
        self.skipped = {(d["source"], d["index"]): Problem(**d) for d in state.get("skipped", [])}
        self.truncated = {(d["source"], d["index"]): Problem(**d) for d in state.get("truncated", [])}
        self.events = int(state.get("events", 0))


def encode_conversation(
    conversations: list,
    *,
    template: Any,
    tokenizer: Any,
    tokens_per_image: int,
    max_length: int,
    image_token_id: int,
    has_image: Optional[bool] = None,
    sample_id: Any = None,
) -> Encoded | EncodeFailure:
    """Tokenise one conversation with `templates.tokenize_conversation`; the only call site.

    Returns `Encoded` or an `EncodeFailure`: the template's skip reasons keep their kind
    (``too_long`` when the cut would split an image, ``no_supervision``, ``tokenize_failed`` for a
    round mismatch); a conversation the template refuses as malformed becomes ``malformed``.
    """
    from cumo_megatron.data.templates import tokenize_conversation

    try:
        out = tokenize_conversation(
            template,
            conversations,
            tokenizer,
            tokens_per_image,
            max_length,
            image_token_id,
            has_image=has_image,
            sample_id=sample_id,
        )
    except DataError as exc:
        return EncodeFailure(ProblemKind.MALFORMED, str(exc))
    if not out:  # a SkippedSample (falsy)
        detail = getattr(out, "detail", "") or ""
        return EncodeFailure(getattr(out, "kind", ProblemKind.TOKENIZE_FAILED), f"{out.reason}: {detail}".rstrip(": "))
    return Encoded(
        input_ids=torch.tensor(out.input_ids, dtype=torch.long),
        labels=torch.tensor(out.labels, dtype=torch.long),
        loss_mask=torch.tensor(out.loss_mask, dtype=torch.float32),
        num_images=int(out.num_images),
        truncated=bool(out.truncated),
    )


class LlavaDataset(Dataset):
    """Tokenised samples of a `Mixture` (see the module docstring for what ``__getitem__`` returns)."""

    def __init__(
        self,
        mixture: Mixture,
        tokenizer: Any,
        template: Any,
        tokens_per_image: int,
        max_length: int,
        image_processor: Optional[ImageProcessor] = None,
        policy: Policy = "skip",
        image_token_id: int = IMAGE_TOKEN_ID,
        preflight: bool = True,
        allow_images_outside: bool = False,
    ):
        if policy not in ("skip", "fail"):
            raise ValueError(f"bad-sample policy {policy!r} is unknown; use 'skip' or 'fail'")
        from cumo_megatron.data.templates import get_template

        get_template(template)  # an unknown template name fails here, not at the first sample
        self.mixture = mixture
        self.tokenizer = tokenizer
        self.template = template
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.image_processor = image_processor
        self.policy = policy
        self.image_token_id = image_token_id
        self.allow_images_outside = allow_images_outside
        self._has_image = mixture.has_image()
        if image_processor is None and self._has_image.any():
            first = int(np.flatnonzero(self._has_image)[0])
            raise DataError(f"{mixture[first].source} has image records but no image processor was given")
        self._check_image_folders()
        if preflight:
            self._preflight()

    def _check_image_folders(self) -> None:
        """A folder that does not exist would turn every image record into a skip: stop at start."""
        import os

        for source, records in self.mixture.file_records():
            folder = source.image_folder or self.mixture.default_image_folder
            if folder is not None and not os.path.isdir(folder) and any(record_images(r.data) for r in records):
                raise DataError(
                    f"{source.path}: its image folder {folder} is not a directory; check data.image_folder (or --images)"
                )

    def _preflight(self) -> None:
        """Structural checks of every file once, at start: fail now (policy fail) or announce skips."""
        problems = []
        for source, records in self.mixture.file_records():
            # Image paths that leave the folder by their text alone are found here, on every rank;
            # links resolving elsewhere need the file system and are found when the image is read.
            check_paths = not self.allow_images_outside and (source.image_folder or self.mixture.default_image_folder)
            for raw in records:
                found = check_record(raw)[:1]
                if not found and check_paths:
                    outside = [name for name in record_images(raw.data) if leaves_folder(name)]
                    if outside:
                        found = [raw.problem(
                            ProblemKind.IMAGE_OUTSIDE_FOLDER,
                            f"image {outside[0]!r} is outside the image folder; move it into the folder, or "
                            "allow it with data.allow_images_outside=true",
                        )]
                problems.extend(found)
        if not problems:
            return
        shown = "\n  ".join(str(p) for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        if self.policy == "fail":
            raise DataError(
                f"{len(problems)} bad record(s) (policy 'fail'; run tools/validate_data.py for a full report, "
                f"or set data.policy=skip to skip them):\n  {shown}{more}"
            )
        logger.warning("%d bad record(s) will be skipped when met:\n  %s%s", len(problems), shown, more)

    def __len__(self) -> int:
        return len(self.mixture)

    def lengths(self) -> np.ndarray:
        """Approximate token lengths (the sampler's grouping key)."""
        return self.mixture.lengths(self.tokens_per_image)

    def has_image(self) -> np.ndarray:
        """Per-entry modality (the sampler groups by it)."""
        return self._has_image

    def _bad(self, index: int, problem: Problem) -> Skipped:
        if self.policy == "fail":
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:  # in a worker: the main process raises (see `Skipped`)
                return Skipped(index, problem, fatal=True)
            raise fail_error(problem)
        return Skipped(index, problem)

    def __getitem__(self, index: int) -> Sample | Skipped:
        raw: RawRecord = self.mixture[index]
        problems = check_record(raw)
        if problems:
            return self._bad(index, problems[0])
        names = record_images(raw.data)
        enc = encode_conversation(
            raw.data["conversations"],
            template=self.template,
            tokenizer=self.tokenizer,
            tokens_per_image=self.tokens_per_image,
            max_length=self.max_length,
            image_token_id=self.image_token_id,
            has_image=bool(names),
            sample_id=raw.record_id,
        )
        if isinstance(enc, EncodeFailure):
            return self._bad(index, raw.problem(enc.kind, enc.message))
        if enc.num_images != len(names):
            return self._bad(
                index,
                raw.problem(ProblemKind.TOKENIZE_FAILED, f"the template placed {enc.num_images} image(s), the record has {len(names)}"),
            )
        # Images last: decoding is the expensive part, not worth doing for a sample that is skipped.
        images = None
        if names:
            folder = self.mixture.image_folder(index)
            try:
                images = torch.stack(
                    [self.image_processor.load(image_path(folder, name, self.allow_images_outside)) for name in names]
                )
            except ImageError as exc:
                return self._bad(index, raw.problem(exc.kind, str(exc)))
        truncated = raw.problem(TRUNCATED, f"truncated to max_length {self.max_length}") if enc.truncated else None
        return Sample(enc.input_ids, enc.labels, enc.loss_mask, images, index, raw.record_id, truncated)


def dataset_for_run(cfg, files, tokenizer, image_folder: Optional[str] = None) -> "LlavaDataset":
    """A `LlavaDataset` of ``files`` prepared as the run ``cfg`` (an `ExperimentConfig`) prepares data.

    Template, max length, image preprocessing (from the vision config and ``data.aspect``), bad-record
    policy, image placeholder id and mixture seed all come from ``cfg``; ``image_folder`` defaults to
    ``cfg.data.image_folder``. The trainer and the held-out evaluation build their data with it.
    """
    from cumo_megatron.data.records import Mixture

    data = cfg.data
    mixture = Mixture.from_specs(list(files), image_folder or data.image_folder, seed=cfg.seed)
    return LlavaDataset(
        mixture,
        tokenizer,
        data.template,
        tokens_per_image=cfg.model.vision.tokens_per_image,
        max_length=data.max_length,
        image_processor=ImageProcessor.from_vision_config(
            cfg.model.vision, aspect=data.aspect, max_aspect_ratio=data.max_aspect_ratio
        ),
        policy=data.policy,
        image_token_id=cfg.model.image_token_id,
        allow_images_outside=data.allow_images_outside,
    )
