"""tools/upcycle_checkpoint.py and tools/export_checkpoint.py (library: cumo_megatron.checkpoint.convert).

Round trips are bit-exact (same keys, dtypes and values) at the world of one, and after the
checkpoint was loaded and re-saved at TP2 (SP), EP2 and PP2 by 2 gloo ranks; co-upcycling from a
dense stage-2 checkpoint copies every MLP into its experts, starts the routers fresh and keeps the
model's output; failures exit with their class's status (checkpoint 5, configuration 2,
interrupted 1) and one line of reason, and leave no output directory behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint import open_checkpoint, ours
from cumo_megatron.checkpoint.convert import (
    Sources,
    UpcycleOptions,
    build_empty_model,
    export_checkpoint,
    import_checkpoint,
)
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.errors import EXIT_CHECKPOINT, EXIT_CONFIG
from cumo_megatron.moe.upcycling import fresh_router_weight
from tests.fixtures.tiny_models import (
    random_images,
    save_cumo_release,
    save_hf_clip_vision,
    save_hf_lm,
    save_open_clip,
)
from tests.helpers.distributed import ROOT, run_distributed
from tests.helpers.tools import load_tool


upcycle_cli = load_tool("upcycle_checkpoint")
export_cli = load_tool("export_checkpoint")

CLIP_HIDDEN, LM_HIDDEN = 32, 64  # the tiny fixtures' widths


def _llava_projector(path: Path, seed: int = 0) -> None:
    """A LLaVA mlp2x_gelu ``mm_projector.bin`` for the tiny CLIP -> tiny LLM."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (LM_HIDDEN, CLIP_HIDDEN), "0.bias": (LM_HIDDEN,), "2.weight": (LM_HIDDEN, LM_HIDDEN),
              "2.bias": (LM_HIDDEN,)}
    torch.save({f"model.mm_projector.{k}": torch.randn(s, generator=gen) for k, s in shapes.items()}, path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny HF CLIP (transformers-5 layout), sharded HF LLaMA, LLaVA projector, CuMo-Mixtral release."""
    tmp = tmp_path_factory.mktemp("convert-src")
    save_hf_clip_vision(tmp / "clip", "vision_tf5")
    save_hf_lm(tmp / "llama", "llama", "safetensors_sharded")
    _llava_projector(tmp / "mm_projector.bin")
    release = save_cumo_release(tmp / "cumo-mixtral", llm_kind="mixtral", scales=(1,))
    return dict(tmp=tmp, clip=tmp / "clip", llama=tmp / "llama", projector=tmp / "mm_projector.bin",
                release=release.path)


@pytest.fixture(scope="module")
def dense(sources):
    """Our dense checkpoint from the per-module sources (stage-2-like), written by the CLI entry point."""
    out = sources["tmp"] / "ours-dense"
    rc = upcycle_cli.main(["--vision", str(sources["clip"]), "--language", str(sources["llama"]),
                           "--connector", str(sources["projector"]), "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert sorted(a.keys()) == sorted(b.keys()), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:10]}"
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{what}: {key} dtype {a[key].dtype} vs {b[key].dtype}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _tensors(path) -> dict:
    src = open_checkpoint(path)
    return {k: src[k] for k in src.keys()}


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp directory was left behind"


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_modules_round_trip_world_of_one(sources, dense, tmp_path, capsys):
    assert ours.is_model_checkpoint(dense)
    cfg = ours.read_model_config(dense)
    assert cfg.vision.moe is None and cfg.connector.moe is None and cfg.language.arch == "llama"
    out = tmp_path / "export"
    assert export_cli.main(["--checkpoint", str(dense), "--out", str(out), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "total" in report and "MiB" in report
    _assert_same_tensors(_tensors(sources["clip"]), _tensors(out / "vision"), "vision")
    _assert_same_tensors(_tensors(sources["llama"]), _tensors(out / "language"), "language")
    _assert_same_tensors(torch.load(sources["projector"], weights_only=True),
                         torch.load(out / "mm_projector.bin", weights_only=True), "mm_projector")
    # The exports load with transformers' own classes.
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    lm = AutoModelForCausalLM.from_pretrained(out / "language")
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert CLIPVisionModel.from_pretrained(out / "vision").config.hidden_size == CLIP_HIDDEN


@pytest.mark.parametrize("vision_layout, lm_kind, lm_layout", [
    ("clip_full", "mistral", "bin_sharded"),
    ("open_clip", "mixtral", "safetensors"),
], ids=["clip-full+mistral-bin", "open-clip+mixtral"])
def test_other_source_layouts_round_trip(tmp_path, vision_layout, lm_kind, lm_layout):
    """A whole CLIPModel (text tower passed through) / OpenCLIP, and Vicuna-style .bin shards / Mixtral."""
    if vision_layout == "open_clip":
        save_open_clip(tmp_path / "clip", act="quick_gelu")
    else:
        save_hf_clip_vision(tmp_path / "clip", vision_layout)
    save_hf_lm(tmp_path / "lm", lm_kind, lm_layout)
    ckpt, out = tmp_path / "ours", tmp_path / "export"
    import_checkpoint(Sources(vision=tmp_path / "clip", language=tmp_path / "lm"), ckpt)
    export_checkpoint(ckpt, out)
    _assert_same_tensors(_tensors(tmp_path / "clip"), _tensors(out / "vision"), "vision")
    _assert_same_tensors(_tensors(tmp_path / "lm"), _tensors(out / "language"), "language")


def test_release_round_trip_at_tp2_ep2_pp2(sources, tmp_path):
    """CuMo-Mixtral release -> ours -> re-saved by 2 ranks at TP2 x EP2 / EP2 / PP2 -> release: identical.

    TP2 x EP2 on 2 ranks is megatron's MoE parallel folding: attention split over TP, the LLM's
    experts over EP (expert TP 1) on the same 2 ranks.
    """
    ckpt = tmp_path / "ours-release"
    summary = import_checkpoint(Sources(cumo=sources["release"]), ckpt, parallel=ParallelConfig(tp=2, ep=2))
    assert summary.params["vision"]["active"] < summary.params["vision"]["total"]  # MoE: top-2 of 4
    layouts = [dict(tp=2, pp=1, ep=2, etp=1), dict(tp=1, pp=1, ep=2), dict(tp=1, pp=2, ep=1)]
    held = run_distributed("tests.checkpoint.convert_workers:reshard", world_size=2,
                           args=dict(checkpoint=str(ckpt), layouts=layouts, out_prefix=str(tmp_path / "re")))
    release = _tensors(sources["release"])
    total = summary.params["total"]["total"]
    for i, layout in enumerate(layouts):
        assert all(rank[i]["numel"] < total for rank in held), f"{layout}: a rank holds the whole model"
        resaved = tmp_path / f"re-tp{layout['tp']}pp{layout['pp']}ep{layout['ep']}"
        # What the import recorded beside the weights (a re-save by the trainer keeps the weights only).
        for name in (ours.CONVERSION_INFO, ours.PASSTHROUGH):
            shutil.copyfile(ckpt / name, resaved / name)
        shutil.copytree(ckpt / ours.SOURCE_DIR, resaved / ours.SOURCE_DIR)
        out = tmp_path / f"export-{i}"
        export_checkpoint(resaved, out)  # auto: release layout
        _assert_same_tensors(release, _tensors(out), f"release via {layout}")
        assert (out / "config.json").is_file()


def test_failed_reshard_load_is_clear(sources, dense, tmp_path):
    """Loading a checkpoint into a model of another shape names the directory and what to do."""
    platform.initialize(platform.ParallelSizes(), seed=0)
    cfg = ours.read_model_config(dense)
    cfg.language.ffn_hidden_size *= 2
    from cumo_megatron.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="ours-dense"):
        ours.load_model_checkpoint(build_empty_model(cfg), dense)


# ------------------------------------------------------------------------------------------------
# Co-upcycling
# ------------------------------------------------------------------------------------------------


def _load(directory):
    model = build_empty_model(ours.read_model_config(directory))
    ours.load_model_checkpoint(model, directory)
    return model.eval()


def _batch(cfg):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, cfg.language.vocab_size, (2, 12), generator=gen)
    ids[:, 1:1 + cfg.vision.tokens_per_image] = cfg.image_token_id
    return ids, random_images(2, size=cfg.vision.image_size, seed=1)


def test_upcycle_from_stage2_checkpoint(sources, dense, tmp_path):
    out = tmp_path / "stage3"
    rc = upcycle_cli.main(["--from-checkpoint", str(dense), "--vision-experts", "4", "--connector-experts", "4",
                           "--top-k", "2", "--router-seed", "11", "--ep", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    cfg = ours.read_model_config(out)
    assert cfg.vision.moe.num_experts == 4 and cfg.connector.moe.top_k == 2 and cfg.language.moe is None
    platform.initialize(platform.ParallelSizes(), seed=0)
    before, after = _load(dense), _load(out)
    b, a = before.state_dict(), after.state_dict()
    routers = [k for k in a if k.endswith("router.weight")]
    assert len(routers) == cfg.vision.built_layers + 1
    for key in routers:  # fresh, seeded by --router-seed and the router's name
        expected = fresh_router_weight(key, 4, a[key].shape[1], 11, a[key])
        assert torch.equal(a[key], expected), key
    for key, value in a.items():
        if key.endswith("_extra_state") or key in routers:
            continue
        dense_key = key.replace("experts.local_experts.", "").replace("experts.", "")
        for j in range(4):
            dense_key = dense_key.replace(f"mlp.{j}.", "mlp.").replace(f"connector.{j}.", "connector.")
        assert torch.equal(value, b[dense_key]), f"{key} is not a copy of {dense_key}"
    ids, images = _batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(after(ids, images), before(ids, images), rtol=1e-5, atol=1e-5)
    # The upcycled model exports: LLM unchanged, MoE parts in the CuMo release names.
    export = tmp_path / "stage3-export"
    export_checkpoint(out, export)
    _assert_same_tensors(_tensors(sources["llama"]), _tensors(export / "language"), "language after upcycling")
    multimodal = load_file(str(export / "multimodal.safetensors"))
    assert "model.mm_projector.gate.weight" in multimodal
    assert "model.vision_tower.vision_model.encoder.layers.0.experts.3.fc1.weight" in multimodal


def test_llm_upcycling_gives_a_mixtral_with_the_dense_output(sources, dense, tmp_path):
    """Optional LLM upcycling: a LLaMA becomes a Mixtral whose experts copy its MLPs (HF-checked)."""
    out, export = tmp_path / "llm-moe", tmp_path / "llm-moe-export"
    import_checkpoint(Sources(from_checkpoint=dense), out, UpcycleOptions(llm_experts=2, top_k=1, seed=3))
    assert ours.read_model_config(out).language.arch == "mixtral"
    export_checkpoint(out, export)
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(sources["llama"]).eval()
    mixtral = AutoModelForCausalLM.from_pretrained(export / "language").eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mixtral(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_upcycling_refuses_an_impossible_layout(dense, tmp_path, capsys):
    out = tmp_path / "stage3"
    rc = upcycle_cli.main(["--from-checkpoint", str(dense), "--vision-experts", "3", "--ep", "2",
                           "--out", str(out), "--quiet"])
    assert rc == EXIT_CONFIG
    assert "num_experts=3 is not divisible by parallel.ep=2" in capsys.readouterr().err
    _no_leftovers(out)


# ------------------------------------------------------------------------------------------------
# Failures: a clear message, the error class's exit status, nothing left behind
# ------------------------------------------------------------------------------------------------


def _copy_lm(sources, tmp_path) -> Path:
    lm = tmp_path / "lm"
    shutil.copytree(sources["llama"], lm)
    return lm


def _truncate(lm: Path) -> str:
    shard = sorted(lm.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _wrong_arch(lm: Path) -> str:
    import json

    cfg = json.loads((lm / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (lm / "config.json").write_text(json.dumps(cfg))
    return "only SiLU"


def _missing_key(lm: Path) -> str:
    for shard in sorted(lm.glob("model-*.safetensors")):
        tensors = load_file(str(shard))
        key = next((k for k in tensors if "layers.1.mlp.down_proj" in k), None)
        if key is not None:
            del tensors[key]
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return "model.layers.1.mlp.down_proj.weight"
    raise AssertionError("fixture has no layer-1 down_proj")


@pytest.mark.parametrize("damage", [_truncate, _wrong_arch, _missing_key], ids=["truncated", "arch", "missing-key"])
def test_damaged_language_source_fails_cleanly(sources, tmp_path, capsys, damage):
    lm = _copy_lm(sources, tmp_path)
    expected = damage(lm)
    out = tmp_path / "out"
    rc = upcycle_cli.main(["--vision", str(sources["clip"]), "--language", str(lm), "--out", str(out), "--quiet"])
    assert rc == EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert err.startswith("checkpoint error: ") and expected in err and "Traceback" not in err, err
    _no_leftovers(out)


def test_failure_while_streaming_removes_the_partial_output(sources, tmp_path, capsys):
    """A projector of the wrong width passes the key checks and fails mid-stream."""
    bad = tmp_path / "mm_projector.bin"
    sd = torch.load(sources["projector"], weights_only=True)
    sd["model.mm_projector.2.weight"] = torch.zeros(LM_HIDDEN, LM_HIDDEN + 1)
    torch.save(sd, bad)
    out = tmp_path / "out"
    rc = upcycle_cli.main(["--vision", str(sources["clip"]), "--language", str(sources["llama"]),
                           "--connector", str(bad), "--out", str(out), "--quiet"])
    assert rc == EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert "model.mm_projector.2.weight" in err and "[64, 65]" in err, err
    _no_leftovers(out)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_with_objects_are_refused_and_existing_output_kept(sources, dense, tmp_path, capsys):
    evil = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "x": _Evil()}, evil)
    out = tmp_path / "out"
    rc = upcycle_cli.main(["--vision", str(sources["clip"]), "--language", str(sources["llama"]),
                           "--connector", str(evil), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    # Refused by the weights-only unpickler (io.py words it as "damaged ... Weights only load failed").
    assert rc == EXIT_CHECKPOINT and "mm_projector.bin" in captured.err and "Weights only load failed" in captured.err
    assert "pwned" not in captured.out + captured.err
    _no_leftovers(out)
    # An existing output is refused (and kept) unless --overwrite.
    rc = upcycle_cli.main(["--from-checkpoint", str(dense), "--out", str(dense), "--quiet"])
    assert rc == EXIT_CHECKPOINT and "already exists" in capsys.readouterr().err
    assert ours.is_model_checkpoint(dense)
    rc = upcycle_cli.main(["--cumo", str(sources["release"]), "--vision", str(sources["clip"]),
                           "--out", str(out), "--quiet"])
    assert rc == EXIT_CONFIG and "give either" in capsys.readouterr().err


def _start_cli(args, env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "upcycle_checkpoint.py"), *args, "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(out: Path, proc, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not list(out.parent.glob(f".{out.name}.tmp-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the conversion never started writing"
        time.sleep(0.1)


def test_conversion_killed_half_way_leaves_nothing(sources, tmp_path):
    args = ["--vision", str(sources["clip"]), "--language", str(sources["llama"])]
    slow = {"CUMO_CONVERT_DELAY_S": "0.5"}
    terminated, killed = tmp_path / "terminated", tmp_path / "killed"
    # Both runs at once (each start costs seconds of imports).
    term_proc = _start_cli([*args, "--out", str(terminated)], slow)
    kill_proc = _start_cli([*args, "--out", str(killed)], slow)
    # Each is signalled as soon as it writes: waiting for the other first could let it finish
    # (on a loaded machine one start can take as long as the other's whole slowed conversion).
    _wait_for_temp(terminated, term_proc)
    # SIGTERM: the tool cleans up and exits non-zero.
    term_proc.send_signal(signal.SIGTERM)
    _wait_for_temp(killed, kill_proc)
    # SIGKILL: no chance to clean up, but no output directory appears.
    kill_proc.kill()
    _, err = term_proc.communicate(timeout=180)
    kill_proc.communicate(timeout=180)
    assert term_proc.returncode == 1 and "interrupted by signal SIGTERM" in err, err
    _no_leftovers(terminated)
    assert not killed.exists()
    # The next run removes the dead run's temp directory and succeeds.
    assert upcycle_cli.main([*args, "--out", str(killed), "--quiet"]) == 0
    assert ours.is_model_checkpoint(killed)
    assert not list(tmp_path.glob(".killed.tmp-*"))
