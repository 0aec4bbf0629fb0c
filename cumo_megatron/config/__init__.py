"""Configuration: one dataclass tree, YAML + dotted overrides."""

from cumo_megatron.config.loader import ConfigError, load_config, parse_cli, save_config
from cumo_megatron.config.schema import (
    ConnectorConfig,
    DataConfig,
    ExperimentConfig,
    LanguageConfig,
    MoEConfig,
    ModelConfig,
    ParallelConfig,
    VisionConfig,
)

__all__ = [
    "ConfigError",
    "ConnectorConfig",
    "DataConfig",
    "ExperimentConfig",
    "LanguageConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "VisionConfig",
    "load_config",
    "parse_cli",
    "save_config",
]
