"""Install cumo-megatron: CuMo (co-upcycled MoE multimodal LLMs) trained on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="cumo-megatron",
    version="0.1.0",
    description="CuMo-style sparse MoE multimodal LLM training on megatron-core",
    packages=find_packages(include=["cumo_megatron", "cumo_megatron.*"]),
    # Ranges, not pins: GPU users install into images with their own torch build (NGC: Python 3.12,
    # torch 2.11 + CUDA). CI pins exact versions through constraints.txt.
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # megatron-core 0.16's own floor
        "megatron-core>=0.16.1,<0.17",  # the API this code is written and tested against
        "transformers",
        "safetensors",
        "sentencepiece",
        "protobuf",  # sentencepiece tokenizers in non-legacy mode
        # megatron's dist_checkpointing writer hangs forever without psutil.
        "psutil",
        "pyyaml",
        "tqdm",
        "numpy",
        "scipy",  # the scaling-law fitter's optimiser (L-BFGS-B on the Huber objective)
        "pillow",
        "matplotlib",  # the quickstart's expert-load plot
        "tensorboard",  # training metrics beside metrics.jsonl
    ],
    extras_require={
        # The tests build tiny OpenCLIP towers to convert; the package never imports open_clip, and
        # leaving it (and the torchvision it pulls in) out keeps a GPU image's torch untouched.
        "test": ["pytest", "open_clip_torch", "torchvision"],
        # GPU-only: fused kernels and FP8. Never required on CPU.
        "gpu": ["transformer-engine[pytorch]"],
        # lmms-eval and its ~100 dependencies, for `lmms-eval --model cumo_megatron` (never imported by
        # the core; CI does not install it).
        "eval": ["lmms-eval"],
    },
    # lmms-eval finds model classes through this entry-point group (lmms_eval.models.registry_v2).
    entry_points={
        "lmms_eval.models": ["cumo_megatron = cumo_megatron.evaluation.lmms_eval_model:manifest"],
    },
)
