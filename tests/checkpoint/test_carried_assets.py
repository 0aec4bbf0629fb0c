"""Every checkpoint the tools write carries what generation needs (`cumo_megatron.checkpoint.assets`).

``tools/upcycle_checkpoint.py`` copies the source's tokenizer into ``tokenizer/`` and writes
``generation.json`` (template, aspect), so ``python -m cumo_megatron.generate --load CKPT`` needs no
other flag on a release import, an HF import and an upcycled checkpoint; the answers equal those of
the release loaded on the fly. ``--clip-dir`` loads a release whose vision tower is not local. The
split export's ``language/`` loads with ``AutoTokenizer`` and tokenises as our tokenizer does.
Errors are one line naming the flag, with their class's exit status and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict

import pytest

from cumo_megatron.checkpoint import assets, ours
from cumo_megatron.data.images import ImageProcessor
from cumo_megatron.data.tokenizer import load_tokenizer
from cumo_megatron.errors import EXIT_CHECKPOINT, EXIT_CONFIG
from cumo_megatron.generate import main as generate
from tests.fixtures.tiny_models import save_cumo_release, save_hf_clip_vision, save_hf_lm, tiny_sentencepiece
from tests.helpers.distributed import ROOT
from tests.helpers.tools import load_tool


upcycle_cli = load_tool("upcycle_checkpoint")
export_cli = load_tool("export_checkpoint")

SAMPLING = ["--max-new-tokens", "6", "--temperature", "1.0", "--top-p", "0.9", "--seed", "4"]
TEXTS = ["A red circle is above the blue square.", "How many triangles are there? There are 3.",
         "Describe the picture: a small green star and a purple heart."]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny CuMo-Mistral release with its tokenizer.model; a tiny HF CLIP and LLaMA whose
    directory holds a tokenizer.model, and the same LLaMA without one."""
    tmp = tmp_path_factory.mktemp("assets-src")
    release = save_cumo_release(tmp / "cumo-mistral", llm_kind="mistral", scales=(1,))
    tiny_sentencepiece(release.path)
    save_hf_clip_vision(tmp / "clip", "vision_tf5")
    save_hf_lm(tmp / "llama", "llama", "safetensors")
    shutil.copytree(tmp / "llama", tmp / "llama-no-tok")
    tiny_sentencepiece(tmp / "llama")
    return dict(tmp=tmp, release=release, clip=tmp / "clip", llama=tmp / "llama", bare_llama=tmp / "llama-no-tok")


@pytest.fixture(scope="module")
def release_ckpt(src):
    """``upcycle_checkpoint.py --cumo RELEASE``, run under umask 027."""
    out = src["tmp"] / "ckpt-release"
    old = os.umask(0o027)
    try:
        assert upcycle_cli.main(["--cumo", str(src["release"].path), "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    return out


@pytest.fixture(scope="module")
def hf_ckpt(src):
    """An HF import (CLIP + LLaMA whose directory has a tokenizer)."""
    out = src["tmp"] / "ckpt-hf"
    assert upcycle_cli.main(["--vision", str(src["clip"]), "--language", str(src["llama"]),
                             "--out", str(out), "--quiet"]) == 0
    return out


def _answer(capsys, *argv) -> str:
    capsys.readouterr()
    assert generate(list(argv)) == 0
    text = capsys.readouterr().out
    assert text.strip()  # a non-empty sampled answer, so comparisons mean something
    return text


def _fails(capsys, main, argv, status: int, *parts: str) -> str:
    """``main(argv)`` exits with ``status`` and one stderr line holding ``parts``, no traceback."""
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and all(p in last for p in parts), err
    return last


def test_release_import_carries_the_tokenizer_and_generate_needs_no_flag(src, release_ckpt, capsys):
    release = src["release"].path
    assert (release_ckpt / "tokenizer" / "tokenizer.model").read_bytes() == (release / "tokenizer.model").read_bytes()
    assert assets.read_generation_settings(release_ckpt) == assets.GenerationSettings("mistral_instruct", "pad")
    on_the_fly = _answer(capsys, "--load", str(release), "--prompt", "Say hi.", *SAMPLING)
    assert _answer(capsys, "--load", str(release_ckpt), "--prompt", "Say hi.", *SAMPLING) == on_the_fly


def test_files_written_under_a_umask_get_its_mode(release_ckpt):
    for name in (ours.MODEL_CONFIG, assets.GENERATION_FILE, "tokenizer/tokenizer.model", ours.CONVERSION_INFO):
        assert stat.S_IMODE((release_ckpt / name).stat().st_mode) == 0o640, name  # 0666 & ~027


def test_hf_import_and_upcycling_carry_the_tokenizer(src, hf_ckpt, tmp_path, capsys):
    assert (hf_ckpt / "tokenizer" / "tokenizer.model").read_bytes() == (src["llama"] / "tokenizer.model").read_bytes()
    assert assets.read_generation_settings(hf_ckpt).template == "vicuna_v1"
    up = tmp_path / "upcycled"
    assert upcycle_cli.main(["--from-checkpoint", str(hf_ckpt), "--llm-experts", "2", "--out", str(up), "--quiet"]) == 0
    assert ours.read_model_config(up).language.arch == "mixtral"
    # The chat template is the source's (a Vicuna upcycled to Mixtral still speaks Vicuna).
    assert assets.read_generation_settings(up) == assets.read_generation_settings(hf_ckpt)
    assert (up / "tokenizer" / "tokenizer.model").read_bytes() == (src["llama"] / "tokenizer.model").read_bytes()
    # Upcycled experts are copies of the dense MLP: the same answer as the dense checkpoint.
    dense = _answer(capsys, "--load", str(hf_ckpt), "--prompt", "Say hi.", *SAMPLING)
    assert _answer(capsys, "--load", str(up), "--prompt", "Say hi.", *SAMPLING) == dense


def test_a_source_without_tokenizer_warns_and_generate_names_the_flag(src, tmp_path, capsys):
    out = tmp_path / "ckpt"
    capsys.readouterr()
    assert upcycle_cli.main(["--vision", str(src["clip"]), "--language", str(src["bare_llama"]),
                             "--out", str(out), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "holds no tokenizer" in report and "pass --tokenizer" in report
    assert assets.carried_tokenizer(out) is None
    _fails(capsys, generate, ["--load", str(out), "--prompt", "Hi"], EXIT_CONFIG,
           "configuration error:", "carries no tokenizer", "--tokenizer")
    # --tokenizer to the tool carries one; a path without a tokenizer is refused, naming the flag.
    _fails(capsys, upcycle_cli.main, ["--from-checkpoint", str(out), "--tokenizer", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "x"), "--quiet"],
           EXIT_CHECKPOINT, "checkpoint error:", "--tokenizer", "holds no tokenizer")
    fixed = tmp_path / "fixed"
    assert upcycle_cli.main(["--from-checkpoint", str(out), "--tokenizer", str(src["llama"] / "tokenizer.model"),
                             "--out", str(fixed), "--quiet"]) == 0
    assert (fixed / "tokenizer" / "tokenizer.model").is_file()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_conversion(src, tmp_path, capsys):
    big = tiny_sentencepiece(tmp_path / "big", vocab_size=400)
    out = tmp_path / "out"
    _fails(capsys, upcycle_cli.main, ["--cumo", str(src["release"].path), "--tokenizer", str(big),
                                      "--out", str(out), "--quiet"],
           EXIT_CHECKPOINT, "has 400 ids but the model's vocabulary has 320", "--tokenizer")
    assert not out.exists()
    # The source's own misfit tokenizer is left out with a warning: the weights still convert.
    release = tmp_path / "release"
    shutil.copytree(src["release"].path, release)
    shutil.copyfile(big, release / "tokenizer.model")
    capsys.readouterr()
    assert upcycle_cli.main(["--cumo", str(release), "--out", str(out), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "warning:" in report and "has 400 ids" in report and "carries no tokenizer" in report
    assert assets.carried_tokenizer(out) is None


def test_generate_loads_a_release_with_clip_dir(src, tmp_path, capsys):
    release = src["release"]
    moved = tmp_path / "cumo-hub-named"
    shutil.copytree(release.path, moved)
    config = json.loads((moved / "config.json").read_text())
    config["mm_vision_tower"] = "someone/unknown-clip"  # a hub id, as real releases have
    (moved / "config.json").write_text(json.dumps(config))
    _fails(capsys, generate, ["--load", str(moved), "--prompt", "Say hi."], EXIT_CHECKPOINT,
           "checkpoint error:", "pass --clip-dir")
    expected = _answer(capsys, "--load", str(release.path), "--prompt", "Say hi.", *SAMPLING)
    assert _answer(capsys, "--load", str(moved), "--clip-dir", str(release.clip_path), "--prompt", "Say hi.",
                   *SAMPLING) == expected
    # The conversion tool's message names the same flag.
    _fails(capsys, upcycle_cli.main, ["--cumo", str(moved), "--out", str(tmp_path / "x"), "--quiet"],
           EXIT_CHECKPOINT, "pass --clip-dir")


def test_clip_dir_with_our_checkpoint_is_refused(release_ckpt, src, capsys):
    _fails(capsys, generate, ["--load", str(release_ckpt), "--clip-dir", str(src["release"].clip_path),
                              "--prompt", "Hi"], EXIT_CONFIG, "--clip-dir is for an original CuMo release")


def test_split_export_carries_an_autotokenizer(hf_ckpt, release_ckpt, tmp_path):
    from transformers import AutoTokenizer

    ours_tok = load_tokenizer(hf_ckpt / "tokenizer")
    out = tmp_path / "split"
    assert export_cli.main(["--checkpoint", str(hf_ckpt), "--out", str(out), "--quiet"]) == 0
    language = out / "language"
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (language / name).is_file(), name
    hf = AutoTokenizer.from_pretrained(str(language), local_files_only=True)
    assert len(hf) == ours_tok.vocab_size
    for text in TEXTS:
        assert hf(text).input_ids == ours_tok.encode(text, add_bos=True), text
    assert (out / "vision" / "preprocessor_config.json").is_file()
    # An MoE vision tower goes to multimodal.safetensors: its image processor is beside it.
    moe = tmp_path / "split-moe"
    assert export_cli.main(["--checkpoint", str(release_ckpt), "--format", "split", "--out", str(moe), "--quiet"]) == 0
    cfg = ours.read_model_config(release_ckpt)
    assert asdict(ImageProcessor.from_preprocessor_config(moe)) == asdict(ImageProcessor.from_vision_config(cfg.vision))
    hf = AutoTokenizer.from_pretrained(str(moe / "language"), local_files_only=True)
    assert hf(TEXTS[0]).input_ids == load_tokenizer(release_ckpt / "tokenizer").encode(TEXTS[0], add_bos=True)


def test_entry_points_report_user_errors_without_traceback(tmp_path):
    """As scripts: one line on stderr and the error's exit status (`cumo_megatron.errors.run_cli`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUMO_DEBUG"):
        env.pop(key, None)
    runs = [
        ([sys.executable, "-m", "cumo_megatron.generate", "--load", str(tmp_path), "--prompt", "Hi"],
         EXIT_CHECKPOINT, "is neither a cumo-megatron checkpoint"),
        ([sys.executable, "tools/export_checkpoint.py", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
         EXIT_CHECKPOINT, "is not a cumo-megatron model checkpoint"),
        ([sys.executable, "tools/upcycle_checkpoint.py", "--language", str(tmp_path), "--vision", str(tmp_path),
          "--out", str(tmp_path / "o")], EXIT_CHECKPOINT, "no weights found"),
    ]
    for argv, status, message in runs:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == status, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and message in proc.stderr.strip().splitlines()[-1], proc.stderr
