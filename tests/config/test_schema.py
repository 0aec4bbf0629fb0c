"""The configuration schema: bad settings fail in validation, before anything is built."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from cumo_megatron.config.loader import ConfigError, load_config, save_config, to_dict
from cumo_megatron.config.presets import PRESETS
from cumo_megatron.config.schema import ExperimentConfig

# (overrides, fragments the message must contain: the field and the offending values)
BAD = {
    "vision top-k > experts": (
        ["model.vision.moe={num_experts: 4, top_k: 5}"],
        ["vision.moe.top_k=5", "vision.moe.num_experts=4"],
    ),
    "connector top-k > experts": (
        ["model.connector.moe={num_experts: 2, top_k: 3}"],
        ["connector.moe.top_k=3", "connector.moe.num_experts=2"],
    ),
    "language top-k > experts": (
        ["model.language.arch=mixtral", "model.language.moe={num_experts: 8, top_k: 9}"],
        ["language.moe.top_k=9", "language.moe.num_experts=8"],
    ),
    "zero experts": (
        ["model.vision.moe={num_experts: 0, top_k: 0}"],
        ["vision.moe.num_experts", "got 0"],
    ),
    "heads not divisible by tp": (
        ["parallel.tp=3"],
        ["language.num_heads=32", "parallel.tp=3"],
    ),
    "kv heads not divisible by tp": (
        ["model.language.num_kv_heads=2", "parallel.tp=4"],
        ["language.num_kv_heads=2", "parallel.tp=4"],
    ),
    "llm experts not divisible by ep": (
        ["model.language.arch=mixtral", "model.language.moe={num_experts: 8, top_k: 2}", "parallel.ep=3"],
        ["language.moe.num_experts=8", "parallel.ep=3"],
    ),
    "vision experts not divisible by ep": (
        ["model.vision.moe={num_experts: 4, top_k: 2}", "parallel.ep=8"],
        ["vision.moe.num_experts=4", "parallel.ep=8"],
    ),
    "image size not divisible by patch": (
        ["model.vision.image_size=300"],
        ["vision.image_size=300", "vision.patch_size=14"],
    ),
    "unknown template": (
        ["data.template=llama3"],
        ["data.template='llama3'", "vicuna_v1", "mistral_instruct", "plain"],
    ),
    "unknown spec": (
        ["model.spec=apex"],
        ["model.spec='apex'", "local", "te"],
    ),
    "hidden dropout of 1": (
        ["model.hidden_dropout=1.0"],
        ["model.hidden_dropout", "[0, 1)", "got 1.0"],
    ),
    "negative attention dropout": (
        ["model.attention_dropout=-0.1"],
        ["model.attention_dropout", "got -0.1"],
    ),
    "fp8 in fp32": (
        ["model.spec=te", "model.fp8=hybrid"],
        ["model.fp8", "model.precision=bf16"],
    ),
    "pipeline length not a multiple of tp": (
        ["parallel.tp=2", "parallel.pp=2", "data.max_length=2047"],
        ["data.max_length=2047", "multiple of 2", "parallel.tp=2", "use data.max_length=2048"],
    ),
    "pipeline length not a multiple of fp8 x tp": (
        ["model.spec=te", "model.precision=bf16", "model.fp8=hybrid", "parallel.tp=2", "parallel.pp=2",
         "data.max_length=2000"],
        ["data.max_length=2000", "multiple of 32", "model.fp8_recipe=delayed needs 16", "use data.max_length=2016"],
    ),
    "pipeline length not a multiple of mxfp8": (
        ["model.spec=te", "model.precision=bf16", "model.fp8=e4m3", "model.fp8_recipe=mxfp8", "parallel.pp=2",
         "data.max_length=2040"],
        ["data.max_length=2040", "multiple of 32", "mxfp8 needs 32", "use data.max_length=2048"],
    ),
    "overlapped gathers without the distributed optimizer": (
        ["train.overlap_param_gather=true", "train.distributed_optimizer=false"],
        ["train.overlap_param_gather", "train.distributed_optimizer=true"],
    ),
}


def _nested(overrides: list[str]) -> dict:
    """The YAML document equivalent to ``dotted.key=value`` overrides."""
    root: dict = {}
    for text in overrides:
        key, value = text.split("=", 1)
        *parents, last = key.split(".")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return root


def _check_message(err: pytest.ExceptionInfo, fragments: list[str]) -> None:
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_rejected_by_overrides(case):
    overrides, fragments = BAD[case]
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, overrides=overrides)
    _check_message(err, fragments)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_rejected_from_yaml(case, tmp_path):
    overrides, fragments = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_nested(overrides)))
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, path)
    _check_message(err, fragments)


def test_validation_runs_without_building_anything():
    """The checks are pure config: loading a bad config imports neither torch nor the model code."""
    script = (
        "import sys\n"
        "from cumo_megatron.config.loader import ConfigError, load_config\n"
        "from cumo_megatron.config.schema import ExperimentConfig\n"
        "try:\n"
        "    load_config(ExperimentConfig, overrides=['parallel.tp=3'])\n"
        "except ConfigError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no ConfigError')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')\n"
        "                or m.startswith('cumo_megatron.models'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_defaults_validate():
    cfg = load_config(ExperimentConfig)
    assert cfg == ExperimentConfig()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name, tmp_path):
    cfg = ExperimentConfig(model=PRESETS[name]())
    assert load_config(ExperimentConfig, base=cfg) == cfg
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    loaded = load_config(ExperimentConfig, path)
    assert loaded == cfg
    assert to_dict(loaded) == to_dict(cfg)


def test_published_layouts_validate():
    """Layouts a CuMo-8x7B run uses: Mixtral experts over EP=8 with the LLM at TP=2 (+SP)."""
    mixtral = PRESETS["cumo-8x7b"]()
    base = ExperimentConfig(model=mixtral)
    cfg = load_config(ExperimentConfig, base=base, overrides=["parallel.tp=2", "parallel.ep=8", "parallel.pp=4"])
    assert (cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.pp) == (2, 8, 4)
    # At TP > 1 the vision experts stay local, so their 4 need not divide EP=8 ...
    assert cfg.model.vision.moe.num_experts == 4
    # ... but at TP = 1 they are spread over EP and must.
    with pytest.raises(ConfigError, match=re.escape("vision.moe.num_experts=4 is not divisible by parallel.ep=8")):
        load_config(ExperimentConfig, base=base, overrides=["parallel.ep=8"])

