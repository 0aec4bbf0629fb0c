"""Connector adapters: LLaVA's dense ``mm_projector`` and CuMo's MLP-MoE -> our connector gives the
reference connector's output (and, for the MoE, its balance and z losses); round trips are exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint.adapters.common import CheckpointError, MissingKeyError
from cumo_megatron.checkpoint.adapters.connector import (
    connector_to_megatron,
    detect_connector_layout,
    locate_connector,
    megatron_to_connector,
)
from cumo_megatron.checkpoint.io import load_into, open_checkpoint
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ModelConfig, MoEConfig
from cumo_megatron.models.connector import build_connector
from tests.fixtures.tiny_models import save_cumo_release
from tests.reference.cumo_reference import ReferenceConnector

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny CuMo release: MLP-MoE projector (4 experts, top-2) on S2 features (2 x 32 -> 64)."""
    return save_cumo_release(tmp_path_factory.mktemp("release") / "cumo-mistral", "mistral", scales=(1, 3))


def _model_cfg(moe: bool, s2_scales=(1,)) -> ModelConfig:
    cfg = tiny(moe=moe)  # vision width 32, LLM width 64
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, s2_scales=list(s2_scales)))


def _features(n_images: int, channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_images, 4, channels, generator=torch.Generator().manual_seed(seed))


def _save_llava_projector(path, prefix: str, seed: int = 0) -> ReferenceConnector:
    """LLaVA's stage-1 ``mm_projector.bin`` (``torch.save`` of the projector's weights)."""
    torch.manual_seed(seed)
    ref = ReferenceConnector(32, 64).eval()
    torch.save({prefix + k[len("net."):]: v.detach().clone() for k, v in ref.state_dict().items()}, path)
    return ref


@pytest.mark.parametrize("prefix", ["model.mm_projector.", "mm_projector."])
def test_llava_projector_matches_reference_and_round_trips(tmp_path, prefix):
    ref = _save_llava_projector(tmp_path / "mm_projector.bin", prefix)
    src = open_checkpoint(tmp_path / "mm_projector.bin")
    assert locate_connector(src.keys()) == ("llava", prefix)
    cfg = _model_cfg(moe=False)
    connector = build_connector(cfg).eval()
    load_into(connector, connector_to_megatron(src, cfg, "llava", prefix=""), strict=True)
    x = _features(3, 32)
    with torch.no_grad():
        ours = connector(x)
        theirs, _, _ = ref(x)
    assert ours.shape == (3, 4, 64)
    assert float((ours - theirs).abs().max()) <= TOL

    back = dict(megatron_to_connector(connector.state_dict(), cfg, "llava", source_prefix=prefix, prefix=""))
    assert sorted(back) == sorted(src.keys())
    assert all(torch.equal(back[k], src[k]) for k in src.keys())


def test_release_moe_projector_matches_reference_output_and_losses(release):
    src = open_checkpoint(release.path)
    assert detect_connector_layout(src.keys()) == "cumo_release"
    cfg = _model_cfg(moe=True, s2_scales=release.config["scales"])
    assert cfg.connector.moe == MoEConfig(num_experts=4, top_k=2)
    connector = build_connector(cfg).eval()
    # The release's whole state dict goes in: only the projector is read.
    load_into(connector, connector_to_megatron(src, cfg, "cumo_release", prefix=""), strict=True)
    x = _features(3, 64, seed=1)
    with torch.no_grad():
        ours = connector(x)
        theirs, ref_balance, ref_z = release.reference.connector(x)
    stats = connector.router.take_stats()
    assert float((ours - theirs).abs().max()) <= TOL
    assert abs(float(stats.balance) - float(ref_balance)) <= TOL
    assert abs(float(stats.z_loss) - float(ref_z)) <= TOL
    assert float(stats.balance) > 0.5 and float(stats.z_loss) > 0.1

    projector_keys = [k for k in src.keys() if k.startswith("model.mm_projector.")]
    back = dict(megatron_to_connector(connector.state_dict(), cfg, "cumo_release", prefix=""))
    assert sorted(back) == sorted(projector_keys)
    assert all(torch.equal(back[k], src[k]) for k in projector_keys)


def test_full_model_names_are_the_default(release):
    """Without ``prefix`` the names are the full CuMoModel's (``connector.*``)."""
    src = open_checkpoint(release.path)
    cfg = _model_cfg(moe=True, s2_scales=release.config["scales"])
    names = [name for name, _ in connector_to_megatron(src, cfg, None)]
    assert names[0] == "connector.router.weight"
    assert "connector.experts.3.linear_fc2.bias" in names and len(names) == 1 + 4 * 4


def test_moe_dense_mismatches_are_refused(release, tmp_path):
    src = open_checkpoint(release.path)
    with pytest.raises(CheckpointError, match="MLP-MoE but connector.moe is unset"):
        connector_to_megatron(src, _model_cfg(moe=False, s2_scales=(1, 3)), "cumo_release")
    eight = _model_cfg(moe=True, s2_scales=(1, 3))
    eight = dataclasses.replace(eight, connector=dataclasses.replace(eight.connector, moe=MoEConfig(num_experts=8)))
    with pytest.raises(CheckpointError, match=r"has experts \[0, 1, 2, 3\] but connector.moe.num_experts=8"):
        connector_to_megatron(src, eight, None)
    _save_llava_projector(tmp_path / "mm_projector.bin", "model.mm_projector.")
    with pytest.raises(CheckpointError, match="dense.*upcycle"):
        connector_to_megatron(open_checkpoint(tmp_path / "mm_projector.bin"), _model_cfg(moe=True), None)
    with pytest.raises(CheckpointError, match="'llava' layout cannot hold"):
        megatron_to_connector({}, _model_cfg(moe=True), "llava")
    with pytest.raises(ValueError, match="layout 'llava' was asked for"):
        connector_to_megatron(src, _model_cfg(moe=True, s2_scales=(1, 3)), "llava")


def test_errors_name_keys_and_shapes(release):
    sd = dict(open_checkpoint(release.path))
    cfg = _model_cfg(moe=True, s2_scales=(1, 3))
    gone = "model.mm_projector.experts.2.0.bias"
    with pytest.raises(MissingKeyError, match=gone.replace(".", r"\.")):
        connector_to_megatron({k: v for k, v in sd.items() if k != gone}, cfg, None)
    # S2 off: the configuration expects 32 input channels, the release has 64.
    with pytest.raises(CheckpointError, match=r"'model\.mm_projector\.gate\.weight' has shape \[4, 64\], "
                                              r"expected \[4, 32\]"):
        list(connector_to_megatron(sd, _model_cfg(moe=True), None))
    with pytest.raises(ValueError, match="single linear projector is not supported"):
        detect_connector_layout(["model.mm_projector.weight", "model.mm_projector.bias"])
    with pytest.raises(ValueError, match="more than two linear layers"):
        detect_connector_layout([f"mm_projector.{i}.weight" for i in (0, 2, 4)])
    with pytest.raises(ValueError, match=r"no connector found.*'lm_head\.weight'"):
        detect_connector_layout(["lm_head.weight"])
