"""`python -m cumo_megatron.generate`: the answer alone on stdout (single mode), answers as JSON
lines (batch mode), prompts as the reference's evaluation builds them, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.config.loader import ConfigError
from cumo_megatron.data.templates import SYSTEM_PROMPT
from cumo_megatron.data.tokenizer import load_tokenizer
from cumo_megatron.generate import main
from cumo_megatron.inference.prompts import first_question, generation_prompt, prompt_input_ids
from cumo_megatron.inference.session import InferenceSession, default_tokenizer_path, load_model
from tests.fixtures.tiny_models import save_images

ROOT = Path(__file__).resolve().parents[2]
SAMPLING = ["--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9", "--seed", "4"]


@pytest.fixture(scope="module")
def setup(release_factory, tmp_path_factory):
    """A tiny Mistral release with its tokenizer, its model loaded as the CLI loads it, two images."""
    release = release_factory("mistral")
    model, cfg = load_model(release.path)
    tokenizer = load_tokenizer(default_tokenizer_path(release.path))
    session = InferenceSession(model, cfg, tokenizer)
    images = save_images(tmp_path_factory.mktemp("images"), 2, size=48)
    return release, session, images


def test_generation_prompts_match_the_reference_evaluation():
    assert generation_prompt("vicuna_v1", "What is it?") == f"{SYSTEM_PROMPT} USER: <image>\nWhat is it? ASSISTANT:"
    assert generation_prompt("mistral_instruct", "<image> What is it?") == (
        f"<s>[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n<image>\nWhat is it? [/INST]"
    )
    assert generation_prompt("vicuna_v1", "Hi", has_image=False) == f"{SYSTEM_PROMPT} USER: Hi ASSISTANT:"
    assert generation_prompt("plain", "ignored") == "<image>"
    with pytest.raises(ValueError, match="unknown template"):
        generation_prompt("chatml", "x")
    assert first_question([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]) == ("Q", "A")
    with pytest.raises(ValueError, match="id='r7'"):
        first_question([{"from": "gpt", "value": "A"}], "r7")


def test_prompt_ids_expand_each_image(setup):
    _, session, _ = setup
    ids = prompt_input_ids("<image>\nWhat?", session.tokenizer, tokens_per_image=4)
    assert ids[0] == session.tokenizer.bos_id and ids[1:5] == [-200] * 4 and -200 not in ids[5:]


def test_single_mode_prints_the_answer_alone(setup):
    release, session, images = setup
    expected = session.answer("What shape is it?", [images[0]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert expected.text  # the seeded sample is a non-empty answer, so the comparison means something
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "cumo_megatron.generate", "--load", str(release.path), "--image", str(images[0]),
         "--prompt", "What shape is it?", *SAMPLING],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected.text + "\n"
    assert "loaded" in proc.stderr  # logs go to stderr


def test_batch_mode_writes_json_lines(setup, tmp_path):
    release, session, images = setup
    questions = tmp_path / "q.jsonl"
    rows = [
        {"id": "a", "image": images[0].name,
         "conversations": [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "a circle"}]},
        {"question_id": 7, "image": images[1].name, "text": "Which colour?"},  # LLaVA eval question line
        {"id": "t", "conversations": [{"from": "human", "value": "Say hi."}]},  # text only
    ]
    questions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    asked = [("<image>\nWhat shape?", [images[0]]), ("Which colour?", [images[1]]), ("Say hi.", [])]
    out = tmp_path / "out" / "answers.jsonl"
    # Sampled answers one question at a time equal the session's own.
    assert main(["--load", str(release.path), "--batch", str(questions), "--out", str(out),
                 "--image-folder", str(images[0].parent), "--batch-size", "1", *SAMPLING]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", 7, "t"]
    assert got[0]["reference"] == "a circle" and got[1]["reference"] is None
    assert got[0]["prompt"].endswith("<image>\nWhat shape? [/INST]")
    assert "<image>" not in got[2]["prompt"]
    for row, (question, imgs) in zip(got, asked):
        expected = session.answer(question, imgs, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
        assert row["text"] == expected.text
    # --batch-size 2: the questions go to the session in order, two at a time (2 + 1); greedy
    # batches giving each question's own tokens is tested in test_generation.py.
    batched = tmp_path / "batched.jsonl"
    assert main(["--load", str(release.path), "--batch", str(questions), "--out", str(batched),
                 "--image-folder", str(images[0].parent), "--batch-size", "2", *SAMPLING]) == 0
    sampling = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    expected = session.answer_many(asked[:2], **sampling) + session.answer_many(asked[2:], **sampling)
    texts = [json.loads(line)["text"] for line in batched.read_text().splitlines()]
    assert texts == [a.text for a in expected]
    assert texts[:2] != [row["text"] for row in got[:2]]  # batched sampling differs from one at a time


def test_cli_errors(setup, tmp_path, capsys):
    release, _, images = setup
    with pytest.raises(SystemExit):
        main(["--load", str(release.path)])  # neither --prompt nor --batch
    with pytest.raises(SystemExit):
        main(["--load", str(release.path), "--batch", "q.json"])  # no --out
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--load", str(release.path), "--batch", "q.json", "--out", "a.jsonl", "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--load", str(release.path), "--prompt", "Q", "--pp", "2", "--contrast-weak-topk", "1",
              "--contrast-alpha", "1"])
    assert "--pp 1" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="carries no tokenizer.*pass --tokenizer"):
        default_tokenizer_path(tmp_path / "nothing")
    _, session, _ = setup
    with pytest.raises(ValueError, match="2 image"):
        session.answer("<image>\nQ", images, max_new_tokens=1)


def test_user_errors_are_one_line_with_their_status(setup, tmp_path, capsys, monkeypatch):
    """A missing --tokenizer, an <image> count that does not fit --image and a bad batch record end
    the command with one line naming the flag or record, their class's exit status, no traceback."""
    from cumo_megatron.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA

    monkeypatch.delenv("CUMO_DEBUG", raising=False)
    release, _, images = setup
    bad_batch = tmp_path / "q.jsonl"
    bad_batch.write_text(json.dumps({"id": "r1", "conversations": [{"from": "gpt", "value": "A"}]}) + "\n")
    cases = [
        (["--prompt", "Q", "--tokenizer", str(tmp_path / "missing.model")], EXIT_CHECKPOINT,
         ["checkpoint error:", "missing.model", "--tokenizer"]),
        (["--prompt", "<image>\nQ", "--image", str(images[0]), "--image", str(images[1])], EXIT_CONFIG,
         ["configuration error: --prompt/--image:", "2 image"]),
        (["--batch", str(bad_batch), "--out", str(tmp_path / "a.jsonl")], EXIT_DATA,
         ["data error:", "q.jsonl record", "no human turn"]),
    ]
    for argv, status, parts in cases:
        capsys.readouterr()
        assert main(["--load", str(release.path), "--max-new-tokens", "1", *argv]) == status
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and all(p in last for p in parts), err
