"""The configuration tree: one set of dataclasses for every run, loadable from YAML.

Each node checks itself in ``validate()`` (called by the loader, children first), so a bad
configuration fails with a clear message before anything is allocated. Cross-cutting checks that
need the parallel layout live in `ExperimentConfig.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from cumo_megatron.config.loader import ConfigError

TEMPLATES = ("plain", "vicuna_v1", "mistral_instruct")
SPECS = ("local", "te")
IMAGE_TOKEN_ID = -200  # LLaVA's placeholder id; replaced by image features before the embedding


@dataclass
class MoEConfig:
    """A sparse top-k MoE replacing an MLP: ``num_experts`` copies of its shape, top-k routing."""

    num_experts: int = 4
    top_k: int = 2
    balance_coeff: float = 0.1
    z_loss_coeff: float = 0.01

    def check(self, where: str) -> None:
        """Reject impossible routing; ``where`` is this node's dotted path (``vision.moe``).

        Called by the owning node's ``validate()``, which knows the path, so the message names
        the exact field (the loader's tree walk does not pass paths to hooks).
        """
        if self.num_experts < 1:
            raise ConfigError(f"{where}.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"{where}.top_k={self.top_k} must be between 1 and {where}.num_experts={self.num_experts}"
            )


@dataclass
class VisionConfig:
    """CLIP ViT (OpenAI CLIP or OpenCLIP LAION) with optional CLIP-MoE and S2 multi-scale."""

    hidden_size: int = 1024
    num_layers: int = 24  # layers of the source checkpoint
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    layernorm_eps: float = 1e-5
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Features come from this layer (negative: from the end; -2 = penultimate as in LLaVA/CuMo).
    # Layers after it are not built.
    feature_layer: int = -2
    drop_cls: bool = True
    moe: Optional[MoEConfig] = None
    moe_layers: Optional[list[int]] = None  # indices of built layers that are MoE; None = all
    s2_scales: list[int] = field(default_factory=lambda: [1])  # [1, 3] enables S2
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @property
    def built_layers(self) -> int:
        """Number of transformer layers actually built (up to the feature layer)."""
        return self.feature_layer + 1 if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer

    @property
    def patches_per_side(self) -> int:
        """Patch grid size."""
        return self.image_size // self.patch_size

    @property
    def feature_channels(self) -> int:
        """Channels the connector receives (concatenated over S2 scales)."""
        return self.hidden_size * len(self.s2_scales)

    @property
    def tokens_per_image(self) -> int:
        """Image tokens spliced into the LLM sequence per image."""
        return self.patches_per_side**2 + (0 if self.drop_cls else 1)

    def moe_layer_indices(self) -> list[int]:
        """Built-layer indices that carry an MoE MLP."""
        if self.moe is None:
            return []
        return list(range(self.built_layers)) if self.moe_layers is None else list(self.moe_layers)

    def validate(self) -> None:
        """Shapes that a ViT can take."""
        if self.moe is not None:
            self.moe.check("vision.moe")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} is not divisible by "
                f"vision.patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size={self.hidden_size} is not divisible by vision.num_heads={self.num_heads}"
            )
        if not 1 <= self.built_layers <= self.num_layers:
            raise ConfigError(
                f"vision.feature_layer={self.feature_layer} selects no layer of {self.num_layers}"
            )
        for index in self.moe_layers or []:
            if not 0 <= index < self.built_layers:
                raise ConfigError(
                    f"vision.moe_layers has {index}, outside the {self.built_layers} built layers"
                )
        if not self.s2_scales or self.s2_scales[0] != 1 or any(s < 1 for s in self.s2_scales):
            raise ConfigError(f"vision.s2_scales must start with 1 and be positive, got {self.s2_scales}")
        if self.s2_scales != [1] and not self.drop_cls:
            raise ConfigError("vision.s2_scales needs vision.drop_cls=true (the crops are stitched)")


@dataclass
class ConnectorConfig:
    """The vision -> language connector: 2-layer GELU MLP (LLaVA's mlp2x_gelu) or its MoE."""

    hidden_size: Optional[int] = None  # None: the language model's hidden size
    moe: Optional[MoEConfig] = None

    def validate(self) -> None:
        """Routing of the MoE connector."""
        if self.moe is not None:
            self.moe.check("connector.moe")


@dataclass
class LanguageConfig:
    """LLaMA-architecture LLM (Vicuna, Mistral) or Mixtral (``moe`` set)."""

    arch: Literal["llama", "mistral", "mixtral"] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None  # None: multi-head attention
    ffn_hidden_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    moe: Optional[MoEConfig] = None

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (query groups)."""
        return self.num_kv_heads or self.num_heads

    def validate(self) -> None:
        """Shapes a LLaMA-style model can take."""
        if self.moe is not None:
            self.moe.check("language.moe")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"language.hidden_size={self.hidden_size} is not divisible by "
                f"language.num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"language.num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}"
            )
        if self.arch == "mixtral" and self.moe is None:
            raise ConfigError("language.arch=mixtral needs language.moe (8 experts, top-2 for Mixtral)")


@dataclass
class ModelConfig:
    """The whole CuMo model and how it is built."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    spec: str = "local"  # "local" (runs anywhere) or "te" (Transformer Engine, GPU)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # TE spec only
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    recompute: Optional[Literal["full", "selective"]] = None
    token_dispatcher: Literal["auto", "allgather", "alltoall"] = "auto"  # auto: alltoall on GPU
    fusions: Optional[bool] = None  # fused kernels where the spec supports them; None: on with CUDA
    init_std: float = 0.02
    image_token_id: int = IMAGE_TOKEN_ID
    # Dropout probabilities of the ViT and LLM transformer layers; 0 as
    # in CuMo/LLaVA fine-tuning. Dropout draws from the RNG streams a checkpoint restores.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def connector_hidden(self) -> int:
        """Connector hidden and output width."""
        return self.connector.hidden_size or self.language.hidden_size

    def validate(self) -> None:
        """Model-level consistency."""
        if self.spec not in SPECS:
            raise ConfigError(f"model.spec={self.spec!r} is unknown; choose one of {', '.join(SPECS)}")
        if self.fp8 is not None and self.spec != "te":
            raise ConfigError("model.fp8 needs model.spec=te (Transformer Engine)")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        # megatron's FP8 sits on top of its bf16/fp16 mixed precision (Float16Module weights,
        # fp32 main parameters; fp8_utils casts main params to "bf16/fp16" before quantizing).
        if self.fp8 is not None and self.precision == "fp32":
            raise ConfigError("model.fp8 needs model.precision=bf16 (or fp16); set model.fp8=null for fp32")
        if self.connector_hidden != self.language.hidden_size:
            raise ConfigError(
                f"connector output width {self.connector_hidden} must equal "
                f"language.hidden_size={self.language.hidden_size}"
            )


@dataclass
class ParallelConfig:
    """Tensor, pipeline, expert (and expert-tensor) parallel sizes; DP is what the world leaves."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # None: on whenever tp > 1 (MoE requires it)

    @property
    def use_sequence_parallel(self) -> bool:
        """Resolved sequence-parallel switch."""
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def validate(self) -> None:
        """Positive sizes."""
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")


@dataclass
class DataConfig:
    """Training data: LLaVA-format files (``path[:weight]``), images, prompt template, tokenizer."""

    files: list[str] = field(default_factory=list)  # "a.json", "b.jsonl:0.5" (mixture weights)
    image_folder: Optional[str] = None
    template: str = "vicuna_v1"
    tokenizer: Optional[str] = None  # tokenizer.model file or a tokenizer directory
    max_length: int = 2048  # after <image> expansion
    aspect: Literal["pad", "crop"] = "pad"  # pad-to-square (stages 2/3) or resize + center crop
    policy: Literal["skip", "fail"] = "skip"  # bad records at train time
    # Image paths must stay inside their image folder (no absolute paths, no `..`, no links leading
    # out); true lets a record name any file.
    allow_images_outside: bool = False
    # Longest side / shortest side above which an image is a bad record: pad-to-square of a 1x8000
    # strip would build an 8000x8000 canvas. Checked from the file header, before decoding.
    max_aspect_ratio: float = 20.0
    grouping: Literal["modality_length", "length", "none"] = "modality_length"
    num_workers: int = 0
    # Held-out LLaVA files: evaluated every train.eval_interval steps and at the end
    # (`training.validation`), through the same template, tokenizer and image processing.
    eval_files: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Known templates, positive lengths, an aspect-ratio bound of at least 1."""
        if self.template not in TEMPLATES:
            raise ConfigError(
                f"data.template={self.template!r} is unknown; choose one of {', '.join(TEMPLATES)}"
            )
        if self.max_length < 1:
            raise ConfigError(f"data.max_length must be >= 1, got {self.max_length}")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError(f"data.max_aspect_ratio must be >= 1 (long side / short side), got {self.max_aspect_ratio}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, stage and checkpointing of one training run."""

    stage: Literal[1, 2, 3] = 3  # 1: connector only; 2: everything dense; 3: everything, MoE + aux
    lr: float = 4e-6
    min_lr: float = 0.0
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    global_batch_size: int = 256
    micro_batch_size: int = 1
    epochs: int = 1
    train_steps: Optional[int] = None  # None: epochs over the data
    distributed_optimizer: bool = True
    load: Optional[str] = None  # initial weights (converted / upcycled checkpoint); resume wins
    save: str = "runs/cumo"  # output directory: checkpoints, metrics.jsonl, config.yaml, tensorboard
    save_interval: int = 500
    keep_last: int = 2
    log_interval: int = 1
    eval_interval: int = 0  # validate on data.eval_files every N steps; 0: only at the end
    max_bad_steps: int = 3  # consecutive NaN/Inf steps before the run stops
    # fp16 only (model.precision=fp16): a fixed loss scale, or dynamic scaling (null) that starts at
    # initial_loss_scale, halves after loss_scale_hysteresis overflowing steps (each skipped and
    # counted, not a bad step) and doubles after loss_scale_window clean ones.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000
    loss_scale_hysteresis: int = 2
    min_loss_scale: float = 1.0
    # Throughput switches (training.performance); None: automatic (overlapped gradient reduce and
    # parameter gather on with CUDA; variable sequence lengths wherever parallel.pp > 1 allows).
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None  # needs distributed_optimizer
    variable_seq_lengths: Optional[bool] = None
    # Parameters per DDP gradient bucket (megatron-LM's --ddp-bucket-size); None: megatron's
    # default (max(4e7, 1e6 x DP)). Smaller buckets start their overlapped reduce sooner.
    ddp_bucket_size: Optional[int] = None
    # Checkpoint writes in a forked process while training goes on (training.async_save); None:
    # automatic (on with CUDA). `latest` moves only once a checkpoint is complete, either way.
    async_save: Optional[bool] = None

    def validate(self) -> None:
        """Positive sizes and a sane schedule."""
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be >= "
                f"train.micro_batch_size={self.micro_batch_size} >= 1"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"train.loss_scale must be > 0 (or null for dynamic scaling), got {self.loss_scale}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ConfigError(
                f"train.min_loss_scale={self.min_loss_scale} must be > 0 and <= "
                f"train.initial_loss_scale={self.initial_loss_scale}"
            )
        if self.loss_scale_window < 1 or self.loss_scale_hysteresis < 1:
            raise ConfigError("train.loss_scale_window and train.loss_scale_hysteresis must be >= 1")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError("train.overlap_param_gather=true needs train.distributed_optimizer=true")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(f"train.ddp_bucket_size must be >= 1 (or null for megatron's default), got {self.ddp_bucket_size}")
        if self.eval_interval < 0:
            raise ConfigError(f"train.eval_interval must be >= 0 (0: validate only at the end), got {self.eval_interval}")


@dataclass
class ExperimentConfig:
    """Root of the tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 1234

    def validate(self) -> None:
        """Checks that need both the model and the parallel layout."""
        check_parallel_layout(self.model, self.parallel)
        check_sequence_length(self.model, self.parallel, self.data)
        if self.train.eval_interval and not self.data.eval_files:
            raise ConfigError(
                f"train.eval_interval={self.train.eval_interval} but data.eval_files is empty: "
                "give held-out files or set train.eval_interval=0"
            )


def check_parallel_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise `ConfigError` if ``model`` cannot be split as ``parallel`` asks."""
    lang, tp = model.language, parallel.tp
    if lang.num_heads % tp:
        raise ConfigError(f"language.num_heads={lang.num_heads} is not divisible by parallel.tp={tp}")
    if lang.kv_heads % tp:
        raise ConfigError(f"language.num_kv_heads={lang.kv_heads} is not divisible by parallel.tp={tp}")
    if lang.ffn_hidden_size % tp:
        raise ConfigError(f"language.ffn_hidden_size={lang.ffn_hidden_size} is not divisible by parallel.tp={tp}")
    if lang.vocab_size % tp:
        raise ConfigError(f"language.vocab_size={lang.vocab_size} is not divisible by parallel.tp={tp}")
    if lang.num_layers % parallel.pp:
        raise ConfigError(
            f"language.num_layers={lang.num_layers} is not divisible by parallel.pp={parallel.pp}"
        )
    # The vision experts are spread over EP only at TP = 1; at TP > 1 they stay local
    # (`models.parallelize.vision_uses_expert_parallel`), whatever parallel.ep is.
    vision_moe = model.vision.moe if tp == 1 else None
    for name, moe in (("language", lang.moe), ("vision", vision_moe)):
        if moe is not None and moe.num_experts % parallel.ep:
            raise ConfigError(
                f"{name}.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={parallel.ep}"
            )
    if parallel.ep > 1 and lang.moe is None and model.vision.moe is None:
        raise ConfigError("parallel.ep > 1 needs an MoE module (vision.moe or language.moe)")
    if tp > 1 and not parallel.use_sequence_parallel and (lang.moe is not None):
        raise ConfigError("MoE with parallel.tp > 1 requires sequence parallelism (megatron-core)")


def check_sequence_length(model: ModelConfig, parallel: ParallelConfig, data: DataConfig) -> None:
    """Raise `ConfigError` if ``data.max_length`` cannot be a pipeline's fixed sequence length.

    Under pipeline parallelism without variable sequence lengths every micro-batch is padded to
    ``data.max_length``, which must then be a multiple of `models.fp8.sequence_multiple` (TP under
    sequence parallelism, times 16 or 32 under FP8). Checked whenever PP > 1, so that the run
    stays valid whichever way the variable-length decision goes.
    """
    from cumo_megatron.models.fp8 import fp8_align, nearest_multiple, sequence_multiple

    multiple = sequence_multiple(model, parallel)
    if parallel.pp > 1 and data.max_length % multiple:
        why = [f"sequence parallelism over parallel.tp={parallel.tp}"] if parallel.use_sequence_parallel else []
        if model.fp8 is not None:
            why.append(f"model.fp8_recipe={model.fp8_recipe} needs {fp8_align(model.fp8_recipe)}")
        raise ConfigError(
            f"data.max_length={data.max_length} must be a multiple of {multiple} with parallel.pp={parallel.pp} "
            f"({'; '.join(why)}): use data.max_length={nearest_multiple(data.max_length, multiple)}"
        )
