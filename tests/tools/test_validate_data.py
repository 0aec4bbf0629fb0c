"""tools/validate_data.py: every kind of problem is detected, located, counted; exit status."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from cumo_megatron.data.records import DataSource, ProblemKind
from cumo_megatron.data.validate import validate_sources
from tests.fixtures.tiny_models import save_images, tiny_sentencepiece
from tests.helpers.tools import load_tool

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 300


def _load_cli():
    return load_tool("validate_data")


def good(i, image=True):
    q = "What shapes are in the picture?"
    out = {"id": f"good{i}", "conversations": [{"from": "human", "value": ("<image>\n" + q) if image else q}, {"from": "gpt", "value": "A red circle."}]}
    if image:
        out["image"] = f"img_{i % 4:04d}.png"
    return out


# id -> the kind tools/validate_data.py must report for it
EXPECTED = {
    "bad_missing": ProblemKind.MISSING_IMAGE,
    "bad_corrupt": ProblemKind.UNREADABLE_IMAGE,
    "bad_noplace": ProblemKind.MISSING_IMAGE_TOKEN,
    "bad_token": ProblemKind.UNEXPECTED_IMAGE_TOKEN,
    "bad_roles": ProblemKind.ROLE_ORDER,
    "bad_shape": ProblemKind.MALFORMED,
    "bad_long": ProblemKind.TOO_LONG,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """a.json (list), b.jsonl (with an unparseable line), broken.json (not JSON), images, tokenizer."""
    root = tmp_path_factory.mktemp("vdata")
    images = root / "images"
    save_images(images, 4, size=32)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    a = [good(0), good(1, image=False)] + [
        {**good(2), "id": "bad_missing", "image": "absent.png"},
        {**good(3), "id": "bad_corrupt", "image": "corrupt.jpg"},
        {**good(4, image=False), "id": "bad_noplace", "image": "img_0001.png"},
        {**good(5, image=False), "id": "bad_token", "conversations": good(0)["conversations"]},
    ]
    b = [
        good(10),
        {"id": "bad_roles", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "again"}]},
        {"id": "bad_shape", "conversations": [{"from": "human", "text": "no value key"}]},
        {"id": "bad_long", "conversations": [{"from": "human", "value": "big " * 400}, {"from": "gpt", "value": "ok"}]},
        good(11, image=False),
    ]
    (root / "a.json").write_text(json.dumps(a, indent=1))
    lines = [json.dumps(r) for r in b]
    lines.insert(1, '{"id": "bad_json", "conversations": [{"from": "human"')
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    (root / "broken.json").write_text('[{"id": "x"},, ]')
    (root / "clean.json").write_text(json.dumps([good(20), good(21, image=False)]))
    tok = tiny_sentencepiece(root / "tok")
    return root, images, tok


def run_cli(argv, capsys):
    status = _load_cli().main(argv)
    return status, capsys.readouterr().out


def test_each_kind_is_detected_with_file_index_and_id(dataset, capsys):
    root, images, tok = dataset
    argv = ["--data", f"{root / 'a.json'}:0.5", str(root / "b.jsonl"), str(root / "broken.json"), "--images", str(images),
            "--tokenizer", str(tok), "--template", "vicuna_v1", "--max-length", str(MAX_LEN), "--tokens-per-image", "4",
            "--workers", "2", "--show", "50"]
    status, out = run_cli(argv, capsys)
    assert status == 1
    for rid, kind in EXPECTED.items():
        lines = [ln for ln in out.splitlines() if f"id={rid!r}" in ln]
        assert lines, f"{rid} not reported"
        assert any(f"[{kind}]" in ln for ln in lines), (rid, lines)
    assert "b.jsonl record 1 (line 2, no id): [bad_json]" in out
    assert "broken.json: [bad_json]" in out and "UNREADABLE" in out
    assert "a.json record 2 (id='bad_missing')" in out
    assert not any("id='good" in ln for ln in out.splitlines())
    # Summary table: per-file records / image / text counts, and counts per kind.
    row_a = next(ln for ln in out.splitlines() if ln.startswith(str(root / "a.json")))
    assert row_a.split()[1:6] == ["0.5", "6", "4", "2", "4"]
    row_b = next(ln for ln in out.splitlines() if ln.startswith(str(root / "b.jsonl")))
    assert row_b.split()[2:6] == ["6", "1", "5", "4"]
    for kind in set(EXPECTED.values()) | {ProblemKind.BAD_JSON}:
        assert any(ln.split()[:2] == [kind, "2" if kind == ProblemKind.BAD_JSON else "1"] for ln in out.splitlines()), kind


def test_library_report_matches_exactly_the_bad_records(dataset):
    root, images, tok = dataset
    from cumo_megatron.data.tokenizer import load_tokenizer
    from cumo_megatron.data.validate import TokenizerCheck

    tokens = TokenizerCheck(load_tokenizer(tok), "vicuna_v1", MAX_LEN, 4)
    report = validate_sources([DataSource(str(root / "a.json")), DataSource(str(root / "b.jsonl"))], str(images), tokens)
    assert report.bad_ids() == set(EXPECTED) | {None}
    assert {p.record_id: p.kind for p in report.problems if p.record_id} == EXPECTED
    assert report.files[0].max_tokens > 0
    # Without a tokenizer the length check is off; everything else is still found.
    no_tok = validate_sources([DataSource(str(root / "b.jsonl"))], str(images))
    assert {p.record_id for p in no_tok.problems} == {None, "bad_roles", "bad_shape"}
    # --no-decode: a corrupt file passes, a missing one does not.
    fast = validate_sources([DataSource(str(root / "a.json"))], str(images), decode_images=False)
    assert "bad_corrupt" not in fast.bad_ids() and "bad_missing" in fast.bad_ids()


def test_script_run_as_main_exits_with_the_status(dataset, capsys, monkeypatch):
    root, images, _ = dataset
    # runpy runs the file as __main__ (its guard and sys.exit) without a new interpreter (~5 s).
    script = str(ROOT / "tools" / "validate_data.py")
    monkeypatch.setattr(sys, "argv", [script, "--data", str(root / "clean.json"), "--images", str(images)])
    with pytest.raises(SystemExit) as clean:
        runpy.run_path(script, run_name="__main__")
    assert clean.value.code == 0 and "no problems found" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [script, "--data", str(root / "broken.json")])
    with pytest.raises(SystemExit) as broken:
        runpy.run_path(script, run_name="__main__")
    assert broken.value.code == 1 and "not valid JSON" in capsys.readouterr().out
    # Imported (not run), the script does nothing.
    runpy.run_path(script, run_name="not_main")
    assert capsys.readouterr().out == ""


def test_bad_arguments_are_refused(dataset, capsys):
    root, _, tok = dataset
    with pytest.raises(SystemExit):
        _load_cli().main(["--data", str(root / "clean.json"), "--tokenizer", str(tok)])
    with pytest.raises(SystemExit):
        _load_cli().main(["--data", str(root / "clean.json"), "--template", "chatml"])
    assert "unknown template" in capsys.readouterr().err


def test_readme_command_works_without_max_length(dataset, capsys):
    """The README's command, as written: the max length is data.max_length's default, printed."""
    root, images, tok = dataset
    status, out = run_cli(["--data", str(root / "clean.json"), "--images", str(images), "--tokenizer", str(tok),
                           "--template", "vicuna_v1"], capsys)
    assert status == 0 and "max length: 2048 tokens" in out and "no problems found" in out


@pytest.fixture(scope="module")
def image_cases(tmp_path_factory):
    """Records whose images leave the folder (.., absolute, a link), a 1x8000 strip, deep nesting."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vimages")
    images = root / "images"
    save_images(images, 4, size=32)
    Image.new("L", (1, 8000)).save(images / "strip.png")
    save_images(root / "elsewhere", 1, size=32)
    (images / "link.png").symlink_to(root / "elsewhere" / "img_0000.png")
    cases = {
        "dotdot": "../elsewhere/img_0000.png",
        "absolute": str(root / "elsewhere" / "img_0000.png"),
        "link": "link.png",
        "strip": "strip.png",
    }
    records = [good(0)] + [{**good(1), "id": rid, "image": name} for rid, name in cases.items()]
    (root / "imgs.json").write_text(json.dumps(records))
    deep_line = "[" * 100000 + "]" * 100000
    (root / "deep.jsonl").write_text(json.dumps(good(2)) + "\n" + deep_line + "\n")
    (root / "deep.json").write_text(deep_line)
    return root, images


def test_json_report_outside_images_aspect_bound_and_deep_nesting(image_cases, capsys, tmp_path):
    root, images = image_cases
    report_path = tmp_path / "out" / "report.json"
    argv = ["--data", str(root / "imgs.json"), str(root / "deep.jsonl"), str(root / "deep.json"),
            "--images", str(images), "--json", str(report_path)]
    status, out = run_cli(argv, capsys)
    assert status == 1
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["settings"]["max_aspect_ratio"] == 20.0
    by_id = {p["id"]: p for p in report["problems"] if p["id"]}
    assert {rid: p["kind"] for rid, p in by_id.items()} == {
        "dotdot": ProblemKind.IMAGE_OUTSIDE_FOLDER, "absolute": ProblemKind.IMAGE_OUTSIDE_FOLDER,
        "link": ProblemKind.IMAGE_OUTSIDE_FOLDER, "strip": ProblemKind.IMAGE_ASPECT_RATIO}
    assert by_id["strip"] == {"file": str(root / "imgs.json"), "index": 4, "line": None, "id": "strip",
                              "kind": ProblemKind.IMAGE_ASPECT_RATIO, "at_train_time": by_id["strip"]["at_train_time"],
                              "reason": f"image {images / 'strip.png'} is 1x8000, an aspect ratio above 20; crop or "
                                        "drop it, or raise data.max_aspect_ratio (validate_data: --max-aspect-ratio)"}
    deep_line, = [p for p in report["problems"] if p["file"].endswith("deep.jsonl")]
    assert (deep_line["index"], deep_line["line"], deep_line["kind"]) == (1, 2, ProblemKind.BAD_JSON)
    deep_file, = [p for p in report["problems"] if p["file"].endswith("deep.json")]
    assert deep_file["index"] is None and "nested too deeply" in deep_file["reason"]
    assert report["counts"] == {ProblemKind.BAD_JSON: 2, ProblemKind.IMAGE_ASPECT_RATIO: 1,
                                ProblemKind.IMAGE_OUTSIDE_FOLDER: 3}
    assert [f["bad_records"] for f in report["files"]] == [4, 1, 0] and report["bad_records"] == 5
    assert "[image_outside_folder]" in out  # the text report is still printed
    # The explicit options: outside paths accepted, a looser bound; JSON on stdout with '-'.
    status, out = run_cli(["--data", str(root / "imgs.json"), "--images", str(images), "--allow-images-outside",
                           "--max-aspect-ratio", "8000", "--json", "-"], capsys)
    assert status == 0 and json.loads(out)["problems"] == []


def test_bad_paths_and_bounds_exit_2(dataset, capsys, tmp_path):
    root, _, tok = dataset
    for argv in (["--images", str(tmp_path / "nowhere")], ["--max-aspect-ratio", "0.5"],
                 ["--tokenizer", str(tok)]):
        with pytest.raises(SystemExit) as info:
            _load_cli().main(["--data", str(root / "clean.json"), *argv])
        assert info.value.code == 2
    capsys.readouterr()
    # A tokenizer path that does not exist is a user error: one line, exit status 2, no traceback.
    status = _load_cli().main(["--data", str(root / "clean.json"), "--tokenizer", str(tmp_path / "none.model"),
                               "--template", "vicuna_v1"])
    err = capsys.readouterr().err
    assert status == 2 and "none.model does not exist" in err and "Traceback" not in err
