"""Install cumo-megatron: CuMo (co-upcycled MoE multimodal LLMs) trained on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="cumo-megatron",
    version="0.1.0",
    description="CuMo-style sparse MoE multimodal LLM training on megatron-core",
    packages=find_packages(include=["cumo_megatron", "cumo_megatron.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "megatron-core==0.16.1",
        "open_clip_torch",
        "transformers",
        "safetensors",
        "sentencepiece",
        "protobuf",  # sentencepiece tokenizers in non-legacy mode
        # megatron's dist_checkpointing writer hangs forever without psutil.
        "psutil",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",  # the quickstart's expert-load plot
        "tensorboard",  # training metrics beside metrics.jsonl
    ],
    extras_require={
        "test": ["pytest"],
        # GPU-only: fused kernels and FP8. Never required on CPU.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
