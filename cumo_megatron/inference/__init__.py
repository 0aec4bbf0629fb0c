"""Inference: autoregressive generation with a KV cache (`generation`), prompt building (`prompts`)."""

from cumo_megatron.inference.generation import forward_last_logits, generate, sample_next, strip_after_eos

__all__ = ["generate", "sample_next", "forward_last_logits", "strip_after_eos"]
