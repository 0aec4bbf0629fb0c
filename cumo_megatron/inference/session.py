"""A loaded model with its tokenizer and image processor, answering questions about images.

`load_model` accepts our checkpoint directory (``model_config.yaml`` + a megatron dist checkpoint;
any TP layout, megatron reshards; a trainer's save directory stands for its ``latest``) or an
original CuMo release directory (HF-style ``config.json`` + safetensors), converted on the fly
with the checkpoint adapters (world of one; ``clip_dir`` for a release whose vision tower is not
local). `default_tokenizer_path` and `generation_settings` find what the checkpoint carries
(`cumo_megatron.checkpoint.assets`).

A tokenizer with fewer ids than the model's vocabulary is accepted (a padded embedding table, as
the trainer accepts it): `InferenceSession` generates only ids the tokenizer has. One with more is
refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from cumo_megatron.checkpoint import assets
from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.schema import ModelConfig, ParallelConfig
from cumo_megatron.data.images import ImageProcessor, load_rgb
from cumo_megatron.data.tokenizer import Tokenizer
from cumo_megatron.inference.generation import generate, left_pad, strip_after_eos
from cumo_megatron.inference.prompts import generation_prompt, prompt_input_ids
from cumo_megatron.models.cumo import build_model
from cumo_megatron.models.parallelize import placement_for, place_for_inference

log = logging.getLogger(__name__)


def _is_release(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def load_model(load: str | Path, clip_dir: Optional[str | Path] = None) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the model (this rank's pipeline stage) for the initialised TP and PP sizes and load
    weights from ``load`` (eval mode). Parallel state must be initialised
    (`cumo_megatron.platform.initialize`). ``clip_dir``: for a release, the local CLIP checkpoint
    its ``mm_vision_tower`` names (``--clip-dir``); our checkpoints hold their vision tower."""
    from cumo_megatron.checkpoint import ours

    directory = ours.resolve_checkpoint_dir(load)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if ours.is_model_checkpoint(directory):
        if clip_dir is not None:
            raise ConfigError(
                f"--clip-dir is for an original CuMo release; {directory} is a cumo-megatron checkpoint, "
                "which holds its vision tower: leave --clip-dir out"
            )
        cfg = ours.read_model_config(directory)
        model = build_model(cfg, ParallelConfig(tp=tp, pp=pp))
        ours.load_model_checkpoint(model, directory)
    elif directory.is_dir() and _is_release(directory):
        from cumo_megatron.checkpoint.adapters.cumo_release import model_config_from_release, release_to_megatron
        from cumo_megatron.checkpoint.io import load_into, open_checkpoint

        if tp != 1 or pp != 1:
            raise CheckpointError(
                f"{directory} is an original CuMo release; it loads on the fly at TP=1, PP=1 only. Convert it "
                "first (tools/upcycle_checkpoint.py) to load it at TP > 1 or PP > 1"
            )
        cfg = model_config_from_release(directory, clip_dir=clip_dir)
        model = build_model(cfg, ParallelConfig())
        load_into(model, release_to_megatron(open_checkpoint(directory), cfg), strict=True)
    else:
        raise CheckpointError(
            f"{directory} is neither a cumo-megatron checkpoint (model_config.yaml + metadata.json) nor an "
            "original CuMo release (config.json + safetensors)"
        )
    # On the GPU when there is one, in the dtype the checkpoint was trained in.
    model = place_for_inference(model, placement_for(cfg))
    return model.eval(), cfg


def default_tokenizer_path(load: str | Path) -> Path:
    """The tokenizer ``load`` carries: our checkpoint's ``tokenizer/``, else a ``tokenizer.model``
    inside the directory or beside it (a release; checkpoints written before tokenizers were
    carried), else the directory itself when it holds an HF tokenizer. `ConfigError` naming
    ``--tokenizer`` when there is none."""
    from cumo_megatron.checkpoint import ours

    directory = ours.resolve_checkpoint_dir(load)
    carried = assets.carried_tokenizer(directory)
    if carried is not None:
        return carried
    for candidate in (directory / "tokenizer.model", directory.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    if (directory / "tokenizer.json").is_file():
        return directory
    raise ConfigError(
        f"{directory} carries no tokenizer (no {assets.TOKENIZER_DIR}/, no tokenizer.model inside or beside it, "
        "no tokenizer.json): pass --tokenizer (a tokenizer.model file or tokenizer directory), or convert the "
        "checkpoint again with tools/upcycle_checkpoint.py --tokenizer"
    )


def generation_settings(load: str | Path, cfg: ModelConfig) -> assets.GenerationSettings:
    """The template and image aspect handling ``load`` carries (``generation.json``), else the
    defaults: the template of the LLM family, pad-to-square (a release: its ``image_aspect_ratio``)."""
    from cumo_megatron.checkpoint import ours

    directory = ours.resolve_checkpoint_dir(load)
    carried = assets.read_generation_settings(directory)
    if carried is not None:
        return carried
    settings = assets.GenerationSettings(default_template(cfg))
    if (directory / "config.json").is_file() and not ours.is_model_checkpoint(directory):
        settings.aspect = assets.aspect_of_release(json.loads((directory / "config.json").read_text()))
    return settings


def default_template(cfg: ModelConfig) -> str:
    """The chat template the released models use for their LLM family."""
    return assets.default_template(cfg.language.arch)


@dataclass
class Answer:
    """One generated answer: its text, the prompt string and the generated token ids."""

    text: str
    prompt: str
    tokens: list[int]


class InferenceSession:
    """Model + tokenizer + image processor + template; `answer` asks one question, `answer_many`
    a batch of them."""

    def __init__(
        self,
        model,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        template: Optional[str] = None,
        aspect: str = "pad",
    ):
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template or default_template(cfg)
        self.processor = ImageProcessor.from_vision_config(cfg.vision, aspect=aspect)
        assets.check_tokenizer_fits(tokenizer, cfg.language.vocab_size, repr(tokenizer))
        # Rows of a padded embedding table beyond the tokenizer are never generated.
        self.vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < cfg.language.vocab_size else None
        if self.vocab_limit is not None:
            log.info("the model's vocabulary has %d ids, the tokenizer %d: ids %d and up are never generated",
                     cfg.language.vocab_size, tokenizer.vocab_size, tokenizer.vocab_size)

    def answer(
        self,
        question: str,
        image_paths: Sequence[str | Path] = (),
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        contrast=None,
    ) -> Answer:
        """Generate the answer to ``question`` about the images (none: a text-only question).

        ``contrast``: `cumo_megatron.inference.contrast.ContrastSettings` for self-contrast
        decoding of an MoE model (None: plain decoding).
        """
        return self.answer_many([(question, image_paths)], max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, contrast=contrast)[0]

    def answer_many(
        self,
        questions: Sequence[tuple[str, Sequence[str | Path]]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        contrast=None,
    ) -> list[Answer]:
        """Answer ``(question, image paths)`` pairs in one left-padded batch, in order.

        Greedy answers are each question's own answer asked alone (tested); sampled ones draw from
        one generator for the batch, so they depend on how questions are batched.
        """
        prompts, ids, images = [], [], []
        for question, image_paths in questions:
            prompt, prompt_ids, prompt_images = self._prompt(question, image_paths)
            prompts.append(prompt)
            ids.append(prompt_ids)
            if prompt_images is not None:
                images.append(prompt_images)
        param = next(self.model.parameters())
        input_ids, left_pad_b = left_pad(ids)
        tokens_bn = generate(
            self.model,
            input_ids.to(param.device),
            torch.cat(images).to(device=param.device, dtype=param.dtype) if images else None,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=self.tokenizer.eos_id,
            seed=seed,
            contrast=contrast,
            left_pad_b=left_pad_b,
            vocab_limit=self.vocab_limit,
        )
        answers = []
        for prompt, row in zip(prompts, tokens_bn.tolist()):
            text = self.tokenizer.decode(strip_after_eos(row, self.tokenizer.eos_id)).strip()
            answers.append(Answer(text=text, prompt=prompt, tokens=row))
        return answers

    def _prompt(self, question: str, image_paths: Sequence[str | Path]) -> tuple[str, list[int], Optional[torch.Tensor]]:
        """The templated prompt, its ids (images expanded to placeholders) and its pixel values."""
        has_image = len(image_paths) > 0
        prompt = generation_prompt(self.template, question, has_image=has_image)
        ids = prompt_input_ids(prompt, self.tokenizer, self.cfg.vision.tokens_per_image, self.cfg.image_token_id)
        n_placeholders = sum(1 for i in ids if i == self.cfg.image_token_id) // self.cfg.vision.tokens_per_image
        if n_placeholders != len(image_paths):
            raise ValueError(
                f"the prompt holds {n_placeholders} <image> but {len(image_paths)} image(s) were given"
            )
        images = torch.stack([self.processor(load_rgb(p)) for p in image_paths]) if has_image else None
        return prompt, ids, images


__all__ = ["load_model", "default_tokenizer_path", "generation_settings", "default_template", "Answer",
           "InferenceSession"]
