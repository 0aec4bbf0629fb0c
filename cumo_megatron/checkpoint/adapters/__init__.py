"""State-dict adapters: publishers' checkpoint layouts <-> our megatron-core model, both directions.

Each adapter is a key map (plus the reshapes a layout needs, e.g. fused QKV) that streams
``(name, tensor)`` pairs, reading one source tensor at a time, so that it works on lazy readers of
multi-GB files. Adapters cover a world of one (TP = PP = EP = 1); resharding to a parallel layout
is megatron's distributed checkpointing's job.

* `common`: what every adapter shares (conversion rules, key/shape checks, QKV fusing, errors).
* `vision`: CLIP ViT (HF transformers 4/5, full ``CLIPModel``, OpenCLIP, CuMo release CLIP-MoE).
* `connector`: LLaVA ``mm_projector`` (``mlp2x_gelu``) and CuMo's MLP-MoE projector.
* the language-model adapters (LLaMA / Mistral / Mixtral) sit beside them.
"""
