"""The CuMo model: images -> CLIP(-MoE) -> connector (MLP-MoE) -> embeddings spliced into the LLM.

Data convention: every image is already expanded in ``input_ids`` to ``tokens_per_image`` copies of
``image_token_id`` (the data pipeline does it, so that sequence lengths, labels and loss masks are
known on every pipeline stage). On the first stage the model replaces those positions, image by
image in order, with the connector's output, then scatters the sequence to the sequence-parallel
ranks. The vision tower and connector live on the first pipeline stage.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.schema import ModelConfig, ParallelConfig
from cumo_megatron.models.connector import build_connector
from cumo_megatron.models.language import build_language_model
from cumo_megatron.models.parallelize import broadcast_tp_replicas
from cumo_megatron.models.vision import CLIPVisionTower


def splice_image_features(
    text_bsh: torch.Tensor, features_nth: torch.Tensor, image_positions_bs: torch.Tensor
) -> torch.Tensor:
    """Put image features (image-major, token order) at the image positions (sample-major).

    Raises a clear error when the number of image positions does not match the features.
    """
    expected = int(image_positions_bs.sum())
    given = features_nth.shape[0] * features_nth.shape[1]
    if expected != given:
        raise ValueError(
            f"the batch has {expected} image-token positions but the images give {given} feature "
            f"tokens ({features_nth.shape[0]} images x {features_nth.shape[1]}); every image must be "
            "expanded to exactly tokens_per_image placeholders and none may be truncated"
        )
    return text_bsh.masked_scatter(image_positions_bs.unsqueeze(-1), features_nth.to(text_bsh.dtype))


class CuMoModel(MegatronModule):
    """CLIP(-MoE) vision tower + (MoE) connector + GPT language model, one pipeline stage of it."""

    def __init__(
        self,
        model: ModelConfig,
        parallel: ParallelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ):
        language_model = build_language_model(model, parallel, pre_process, post_process, vp_stage)
        super().__init__(config=language_model.config)
        self.cfg = model
        self.parallel = parallel
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = model.image_token_id
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # finalize_model_grads looks for these attributes on the outermost model.
        self.share_embeddings_and_output_weights = model.language.tie_embeddings
        if pre_process:
            self.vision = CLIPVisionTower(model, parallel)
            self.connector = build_connector(model)
        else:
            self.vision = None
            self.connector = None
        self.language_model = language_model

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive hidden states here (megatron schedules)."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """Delegated for megatron's tied-embedding gradient all-reduce."""
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """``[images, tokens_per_image, llm_hidden]`` from pixel values."""
        return self.connector(self.vision(images_bchw))

    def embed(self, input_ids_bs: torch.Tensor, images_bchw: Optional[torch.Tensor]) -> torch.Tensor:
        """Text embeddings with image features spliced in, ``[s, b, h]`` (full sequence)."""
        image_positions_bs = input_ids_bs == self.image_token_id
        has_images = images_bchw is not None and images_bchw.shape[0] > 0
        if not has_images and bool(image_positions_bs.any()):
            raise ValueError("input_ids contain image placeholders but no images were given")
        # The towers run before the text embedding: the order in which the modules are
        # registered, which is the order megatron lays out (and gathers) their parameters in
        # (`parallelize.order_bucket_collectives`).
        features_nth = self.image_features(images_bchw) if has_images else None
        text_ids_bs = input_ids_bs.masked_fill(image_positions_bs, 0)
        text_sbh = self.language_model.embedding(input_ids=text_ids_bs, position_ids=None)
        if features_nth is None:
            return text_sbh
        combined_bsh = splice_image_features(text_sbh.transpose(0, 1), features_nth, image_positions_bs)
        return combined_bsh.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inference_context=None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-token LM loss ``[b, s]`` when ``labels`` are given, else logits ``[b, s, vocab/tp]``
        (full ``vocab`` with an ``inference_context``: the KV-cache path gathers them).

        ``labels[b, t]`` is the token expected after position t (already shifted by the data).
        ``padding_mask`` ``[b, s]`` (True = padding, megatron's convention) keeps padding out of
        the LLM routers' aux losses and load counts; pass it on every pipeline stage.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, images)
            if self.config.sequence_parallel:
                decoder_input = scatter_to_sequence_parallel_region(decoder_input)
        if padding_mask is not None and self.config.sequence_parallel:
            # GPTModel splits the mask for SP only when it embeds the tokens itself; we embed.
            padding_mask = scatter_to_sequence_parallel_region(padding_mask.t().contiguous()).t().contiguous()
        return self.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            # megatron's inference path insists on full-vocabulary logits (gathered over TP).
            runtime_gather_output=True if inference_context is not None else None,
            padding_mask=padding_mask,
        )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    vp_stage: Optional[int] = None,
) -> CuMoModel:
    """The CuMo model for this rank's pipeline stage (parallel state must be initialised).

    Built where megatron builds (plain ``torch.nn`` parts on the CPU) in ``model.precision``'s
    parameter dtype, TP replicas made identical; `models.parallelize.place` then puts it on its
    device and in its training dtype.
    """
    if parallel_state.get_tensor_model_parallel_world_size() != parallel.tp or (
        parallel_state.get_pipeline_model_parallel_world_size() != parallel.pp
    ):
        raise ConfigError(
            "parallel sizes in the config differ from the initialised process groups: "
            f"config tp={parallel.tp} pp={parallel.pp}, groups tp="
            f"{parallel_state.get_tensor_model_parallel_world_size()} pp="
            f"{parallel_state.get_pipeline_model_parallel_world_size()}"
        )
    built = CuMoModel(
        model,
        parallel,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    broadcast_tp_replicas(built)
    return built
