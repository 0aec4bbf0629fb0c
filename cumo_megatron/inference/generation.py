"""Autoregressive generation with a `CuMoModel`: greedy or temperature + top-p sampling, KV cache,
optionally self-contrast decoding of an MoE model (`contrast`).

The KV cache is megatron-core's static inference context (`StaticInferenceContext`): every
attention layer stores its keys and values there and RoPE positions come from the context's
``sequence_len_offset``. The prompt (with the image placeholders) runs once ("prefill"); each
decode step then feeds only the previous token, without images.

Tensor parallelism: logits come out vocab-parallel and are gathered over the TP group (megatron
gathers them itself on the KV-cache path); the chosen
token is broadcast from TP rank 0 so every rank continues with the same sequence. With sequence
parallelism every chunk fed to the model must be a multiple of TP long: chunks are padded at the
end and an explicit attention mask keeps each real position from seeing the padding; the KV-cache
offset advances by the real length only, so the padding slots are overwritten by the next step.

Prompts of different lengths share a batch left-padded (`left_pad`): an explicit mask hides each
row's padding from every other position at prefill and at every decode step; rotary positions
are relative, so a row's tokens are those it gets alone.

Pipeline parallelism: every stage runs the same loop. A stage receives the previous stage's hidden
states (``[s, b, h]``, the sequence split over TP with SP), runs its layers with its own KV cache
and sends its output on; the last stage picks the token, which is broadcast to every stage.
Self-contrast decoding runs with one pipeline stage.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from cumo_megatron.inference.contrast import (
    ContrastSettings,
    check_contrast,
    contrast_scores,
    weak_routing,
)


def _tp_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def _pp_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def _check_model(model) -> None:
    whole = getattr(model, "pre_process", True) and getattr(model, "post_process", True)
    if not whole and _pp_size() == 1:
        raise ValueError("the model is one pipeline stage but no pipeline-parallel group is initialised")
    if model.training:
        raise ValueError("call model.eval() before generating (dropout and MoE statistics depend on it)")


def _chunk_multiple(model) -> int:
    """Chunk lengths must be multiples of TP when the LM scatters the sequence (SP)."""
    return _tp_size() if getattr(model.config, "sequence_parallel", False) else 1


def _full_vocab(logits_bsv: torch.Tensor) -> torch.Tensor:
    """Gather vocab-parallel logits to the full vocabulary on every TP rank."""
    if _tp_size() == 1:
        return logits_bsv
    return gather_from_tensor_model_parallel_region(logits_bsv.contiguous())


def _broadcast_tp(tokens_b: torch.Tensor) -> torch.Tensor:
    """Every TP rank continues with TP rank 0's token (guards against rank-to-rank rounding)."""
    if _tp_size() == 1:
        return tokens_b
    torch.distributed.broadcast(
        tokens_b,
        src=parallel_state.get_tensor_model_parallel_src_rank(),
        group=parallel_state.get_tensor_model_parallel_group(),
    )
    return tokens_b


def _broadcast_from_last_stage(tokens_b: torch.Tensor) -> torch.Tensor:
    """Every pipeline stage continues with the token the last stage chose."""
    if _pp_size() == 1:
        return tokens_b
    torch.distributed.broadcast(
        tokens_b,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return tokens_b


def _run_stage(model, ids_bs: torch.Tensor, images, attention_mask, context) -> Optional[torch.Tensor]:
    """This stage's forward: the previous stage's hidden states in, this stage's out to the next.
    Returns the model's output on the last stage, None on the others."""
    if not model.pre_process:
        s = ids_bs.shape[1] // (_tp_size() if model.config.sequence_parallel else 1)
        param = next(model.parameters())
        hidden_sbh = torch.empty(s, ids_bs.shape[0], model.config.hidden_size,
                                 dtype=model.config.pipeline_dtype or param.dtype, device=param.device)
        torch.distributed.recv(hidden_sbh, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden_sbh)
        images = None
    out = model(ids_bs, images, attention_mask=attention_mask, inference_context=context)
    if not model.post_process:
        torch.distributed.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _attention_mask(b: int, s: int, offset: int, left_pad_b: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[b or 1, 1, s, offset + s]``, True where a query may NOT look (megatron's convention).

    Bottom-right causal over cache + chunk; with ``left_pad_b``, the first ``left_pad_b[i]``
    positions of row i are hidden from every other position. A padding position still sees itself:
    a row with nothing to attend to would make softmax NaN, and 0 * NaN poisons the real rows.
    """
    q_pos = offset + torch.arange(s, device=device)
    k_pos = torch.arange(offset + s, device=device)
    future_qk = k_pos.view(1, -1) > q_pos.view(-1, 1)
    if left_pad_b is None:
        return future_qk.view(1, 1, s, offset + s)
    pad_bk = k_pos.view(1, -1) < left_pad_b.to(device).view(-1, 1)
    self_qk = k_pos.view(1, -1) == q_pos.view(-1, 1)
    hidden_bqk = future_qk.unsqueeze(0) | (pad_bk.unsqueeze(1) & ~self_qk.unsqueeze(0))
    return hidden_bqk.view(b, 1, s, offset + s)


def forward_last_logits(
    model,
    input_ids_bs: torch.Tensor,
    images: Optional[torch.Tensor],
    context: Optional[StaticInferenceContext] = None,
    left_pad_b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Full-vocabulary float logits ``[b, vocab]`` of the last position of ``input_ids_bs`` (None on a
    pipeline stage other than the last, which passes its hidden states on).

    With a ``context``, ``input_ids_bs`` continues the sequence cached there (its first position is
    ``context.sequence_len_offset``) and the context advances by its length. ``left_pad_b`` ``[b]``:
    how many positions at the start of each row's whole sequence (cache included) are padding.
    """
    b, s = input_ids_bs.shape
    multiple = _chunk_multiple(model)
    pad = (-s) % multiple
    ids = input_ids_bs
    if pad:
        # Padding goes after the real tokens; 0 is a real id (never an image placeholder).
        ids = torch.cat([ids, ids.new_zeros(b, pad)], dim=1)
    attention_mask = None
    offset = context.sequence_len_offset if context is not None else 0
    padded_rows = left_pad_b is not None and bool((left_pad_b > 0).any())
    if padded_rows or context is not None and (pad or offset > 0 and s > 1):
        attention_mask = _attention_mask(b, s + pad, offset, left_pad_b if padded_rows else None, ids.device)
    logits_bsv = _run_stage(model, ids, images, attention_mask, context)
    if context is not None:
        context.sequence_len_offset += s
    if logits_bsv is None:
        return None
    last_bv = logits_bsv[:, s - 1]
    if context is None:  # with a context megatron already gathered the vocabulary
        last_bv = _full_vocab(last_bv)
    return last_bv.float()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: ``(input_ids [b, s], left_pad_b [b])``, each row
    right-aligned behind ``pad_id``s (the masks of `generate` hide them)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt, none of them empty")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
    return ids, torch.tensor([width - len(p) for p in prompts], dtype=torch.long)


def sample_next(
    logits_bv: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids ``[b]``: argmax when ``temperature <= 0``, else top-p (nucleus) sampling.

    Top-p keeps the smallest set of most probable tokens whose probability reaches ``top_p``
    (at least one token).
    """
    if temperature <= 0.0:
        return logits_bv.argmax(dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    probs_bv = torch.softmax(logits_bv.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_bv, order_bv = probs_bv.sort(dim=-1, descending=True)
        before_bv = sorted_bv.cumsum(dim=-1) - sorted_bv  # mass of strictly more probable tokens
        sorted_bv = sorted_bv.masked_fill(before_bv >= top_p, 0.0)
        probs_bv = torch.zeros_like(probs_bv).scatter(-1, order_bv, sorted_bv)
    return torch.multinomial(probs_bv, 1, generator=generator).squeeze(-1)


class _NextLogits:
    """Next-token logits of one growing sequence: KV-cached (the prompt once, then one token per
    call) or, without a cache, the whole sequence recomputed each call."""

    def __init__(self, model, input_ids: torch.Tensor, images: Optional[torch.Tensor], max_new_tokens: int,
                 use_cache: bool, left_pad_b: Optional[torch.Tensor] = None):
        self.model = model
        self.images = images
        self.sequence = input_ids
        self.left_pad_b = left_pad_b
        self.context = None
        if use_cache:
            b, s = input_ids.shape
            slack = _chunk_multiple(model)  # room for the padding of the last chunks
            self.context = StaticInferenceContext(max_batch_size=b, max_sequence_length=s + max_new_tokens + 2 * slack)
            self.context.materialize_only_last_token_logits = False  # we pick the last real position ourselves

    def __call__(self, last_b: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits ``[b, vocab]`` after appending ``last_b`` (None on the first call: the prompt)."""
        b = self.sequence.shape[0]
        if self.context is None:
            if last_b is not None:
                self.sequence = torch.cat([self.sequence, last_b.view(b, 1)], dim=1)
            return forward_last_logits(self.model, self.sequence, self.images, left_pad_b=self.left_pad_b)
        if last_b is None:
            logits_bv = forward_last_logits(self.model, self.sequence, self.images, self.context, self.left_pad_b)
            self.context.enable_decode_mode()
            return logits_bv
        return forward_last_logits(self.model, last_b.view(b, 1), None, self.context, self.left_pad_b)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    images: Optional[torch.Tensor] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    seed: int = 0,
    use_cache: bool = True,
    contrast: Optional[ContrastSettings] = None,
    left_pad_b: Optional[torch.Tensor] = None,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """New tokens ``[b, n <= max_new_tokens]`` after the prompts ``input_ids [b, s]``.

    ``input_ids`` hold each image pre-expanded to ``tokens_per_image`` placeholders (as in training);
    ``images [n, 3, H, W]`` (the rows' images in row order) or None. Prompts of different lengths
    are left-padded (`left_pad`), ``left_pad_b [b]`` saying how many ids of each row are padding:
    masks hide them and rotary positions are relative, so each row's tokens are those it gets
    alone, up to float rounding.
    Greedy when ``temperature`` is 0; otherwise temperature + top-p sampling from a CPU generator
    seeded with ``seed`` (reproducible). A sequence that produced ``eos_id`` keeps emitting it and
    decoding stops once all have. ``use_cache=False`` recomputes the whole sequence each step (the
    slow path, kept to check the cache). The model must be in eval mode.

    ``contrast`` (`contrast.ContrastSettings`; None: plain decoding) turns
    on self-contrast decoding: a second pass with weak routing, with its own KV cache, and the
    choice made on `contrast.contrast_scores` of the two.

    ``vocab_limit``: only ids below it are chosen (None: the whole vocabulary). An embedding table
    padded beyond the tokenizer has rows no text maps to; their logits are cut off before
    sampling (and before the contrast), so the distribution is the one over the tokenizer's ids.
    """
    _check_model(model)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length>0], got shape {tuple(input_ids.shape)}")
    if contrast is not None:
        if _pp_size() > 1:
            raise ValueError("self-contrast decoding runs with one pipeline stage (use TP to split the model)")
        check_contrast(model, contrast)
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
    b = input_ids.shape[0]
    generator = torch.Generator().manual_seed(seed)
    finished_b = torch.zeros(b, dtype=torch.bool)
    new_tokens: list[torch.Tensor] = []
    if left_pad_b is not None:
        left_pad_b = torch.as_tensor(left_pad_b, dtype=torch.long).cpu()
        if left_pad_b.shape != (b,) or bool((left_pad_b < 0).any()) or bool((left_pad_b >= input_ids.shape[1]).any()):
            raise ValueError(f"left_pad_b must hold one count in [0, {input_ids.shape[1]}) per row, got {left_pad_b.tolist()}")
    strong = _NextLogits(model, input_ids, images, max_new_tokens, use_cache, left_pad_b)
    weak = (_NextLogits(model, input_ids, images, max_new_tokens, use_cache, left_pad_b)
            if contrast is not None else None)
    for _ in range(max_new_tokens):
        last_b = new_tokens[-1] if new_tokens else None
        logits_bv = _limited(strong(last_b), vocab_limit)
        if weak is not None:
            with weak_routing(model, contrast):
                weak_bv = _limited(weak(last_b), vocab_limit)
            logits_bv = contrast_scores(logits_bv, weak_bv, contrast.alpha, contrast.beta)
        if logits_bv is None:  # not the last pipeline stage: the token comes from there
            nxt_b = input_ids.new_empty(b)
        else:
            nxt_b = sample_next(logits_bv.cpu(), temperature, top_p, generator).to(input_ids.device)
            nxt_b = _broadcast_tp(nxt_b.to(input_ids.dtype).contiguous())
        nxt_b = _broadcast_from_last_stage(nxt_b)
        if eos_id is not None:
            nxt_b = torch.where(finished_b.to(nxt_b.device), torch.full_like(nxt_b, eos_id), nxt_b)
            finished_b |= (nxt_b == eos_id).cpu()
        new_tokens.append(nxt_b)
        if eos_id is not None and bool(finished_b.all()):
            break
    if not new_tokens:
        return input_ids.new_zeros(b, 0)
    return torch.stack(new_tokens, dim=1)


def _limited(logits_bv: Optional[torch.Tensor], vocab_limit: Optional[int]) -> Optional[torch.Tensor]:
    """The logits of the first ``vocab_limit`` ids (all of them when None; None off the last stage)."""
    if logits_bv is None or vocab_limit is None:
        return logits_bv
    return logits_bv[:, :vocab_limit]


def strip_after_eos(tokens: list[int], eos_id: Optional[int]) -> list[int]:
    """The tokens before the first ``eos_id`` (all of them when there is none)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id)]
    return tokens


__all__ = ["generate", "sample_next", "forward_last_logits", "left_pad", "strip_after_eos"]
