"""tools/evaluate.py: ``score`` (summary, then one JSON line), ``suite`` end to end on a tiny model
(answers, scores, results table), and the one-line errors with their exit statuses."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.errors import run_cli
from cumo_megatron.quickstart import assets
from tests.fixtures.tiny_models import save_cumo_release, tiny_sentencepiece
from tests.helpers.tools import load_tool



def _load_cli():
    return load_tool("evaluate")


CLI = _load_cli()


def _cli(argv, capsys):
    status = run_cli(CLI.main, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def pope_files(tmp_path):
    """Four POPE questions (2 yes, 2 no) and answers, shuffled: TP 2, FP 1, TN 1 by hand."""
    qs = [{"question_id": i, "image": f"img{i // 2}.jpg", "text": f"Is there a {w} in the image?\nAnswer briefly.",
           "category": "random"} for i, w in enumerate(["cat", "dog", "car", "cup"])]
    labels = ["yes", "no", "no", "yes"]
    ann = tmp_path / "coco"
    ann.mkdir()
    _jsonl(ann / "coco_pope_random.json", [{"question_id": q["question_id"], "image": q["image"],
                                            "text": q["text"].split("\n")[0], "label": lab}
                                           for q, lab in zip(qs, labels)])
    texts = {0: "Yes", 1: "No.", 2: "Yes, there is", 3: "yes"}
    answers = [{"question_id": i, "prompt": qs[i]["text"], "text": texts[i], "answer_id": str(i), "model_id": "m",
                "metadata": {}} for i in (3, 1, 0, 2)]
    return _jsonl(tmp_path / "q.jsonl", qs), _jsonl(tmp_path / "a.jsonl", answers), ann


def test_score_prints_a_summary_then_one_json_line(pope_files, capsys):
    questions, answers, ann = pope_files
    status, out, _ = _cli(["score", "--benchmark", "pope", "--questions", str(questions), "--answers", str(answers),
                           "--annotations", str(ann)], capsys)
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0] == "pope:" and any(line.strip().startswith("f1:") for line in lines[:-1])
    last = json.loads(lines[-1])
    assert set(last) == {"benchmark", "metrics"} and last["benchmark"] == "pope"
    # TP 2, FP 1, TN 1, FN 0: precision 2/3, recall 1, F1 0.8, accuracy 3/4, yes ratio 3/4.
    assert last["metrics"]["f1"] == pytest.approx(80.0, abs=1e-9)
    assert last["metrics"]["accuracy"] == pytest.approx(75.0, abs=1e-9)
    assert last["metrics"]["yes_ratio"] == pytest.approx(75.0, abs=1e-9)


def test_score_errors_are_one_line_with_their_status(pope_files, tmp_path, capsys):
    questions, answers, ann = pope_files
    status, out, err = _cli(["score", "--benchmark", "mmvet", "--questions", str(questions), "--answers",
                             str(answers)], capsys)
    assert status == 1 and out == "" and err.startswith("not scorable: MM-Vet") and "GPT" in err
    assert len(err.strip().splitlines()) == 1
    status, _, err = _cli(["score", "--benchmark", "vqa3", "--questions", str(questions), "--answers",
                           str(answers)], capsys)
    assert status == 2 and err.strip().startswith("configuration error: unknown benchmark 'vqa3'; known: pope")
    status, _, err = _cli(["score", "--benchmark", "pope", "--questions", str(questions), "--answers",
                           str(answers)], capsys)
    assert status == 4 and "needs annotations" in err
    status, _, err = _cli(["score", "--benchmark", "pope", "--questions", str(questions), "--answers",
                           str(answers), "--annotations", str(tmp_path / "nowhere")], capsys)
    assert status == 4 and "nowhere" in err and "Traceback" not in err


def test_run_refuses_sizes_that_do_not_divide_the_world(tmp_path, capsys):
    status, _, err = _cli(["run", "--benchmark", "pope", "--load", str(tmp_path), "--questions", "q.jsonl",
                           "--out", str(tmp_path), "--tp", "2"], capsys)
    assert status == 2 and "--tp 2 x --pp 1 must divide the world size 1" in err


def _says_no(text: str) -> bool:
    """LLaVA's eval_pope.py reading, written out again: first sentence, commas dropped, split on spaces."""
    return any(w in ("No", "no", "not") for w in text.split(".")[0].replace(",", "").split(" "))


def test_suite_runs_scores_and_writes_the_table(tmp_path, capsys):
    release = save_cumo_release(tmp_path / "cumo-llama", llm_kind="llama", scales=(1,),
                                llm_overrides={"initializer_range": 0.5})
    tiny_sentencepiece(release.path)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    import random

    rng = random.Random(0)
    held_out = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "cross"), ("green", "square")]):
        name = f"images/eval_{i:05d}.png"
        assets.draw_shape(28, colour, shape, rng).save(data / name)
        held_out.append((name, colour, shape))
    files = assets.benchmark_splits(data, held_out, seed=0)
    mmvet = _jsonl(data / "mmvet.jsonl", [{"question_id": "v1_0", "image": held_out[0][0], "text": "Describe it."}])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
model: {{load: {release.path}, name: tiny}}
out: results
generation: {{batch_size: 4, max_new_tokens: 3}}
benchmarks:
  - {{name: scienceqa, questions: data/mc/llava_test_CQM-A.json, images: data, annotations: data/mc/problems.json}}
  - {{name: pope, questions: data/pope/llava_pope_test.jsonl, images: data, annotations: data/pope}}
  - {{name: mmvet, questions: {mmvet}, images: data}}
""")
    status, out, err = _cli(["suite", "--config", str(suite)], capsys)
    assert status == 0, err
    out_dir = tmp_path / "results"
    pope_answers = [json.loads(line) for line in (out_dir / "pope.jsonl").read_text().splitlines()]
    assert len(pope_answers) == 12 and len((out_dir / "scienceqa.jsonl").read_text().splitlines()) == 6
    assert (out_dir / "mmvet.jsonl").is_file() and "mmvet: not scored: MM-Vet" in out
    # POPE's F1 from the answers by hand: every question has a yes and a no twin per category.
    labels = {}
    for name in ("coco_pope_colour.json", "coco_pope_shape.json"):
        for line in (data / "pope" / name).read_text().splitlines():
            rec = json.loads(line)
            labels[rec["question_id"]] = (name, rec["label"])
    f1s = []
    for name in ("coco_pope_colour.json", "coco_pope_shape.json"):
        rows = [(labels[a["question_id"]][1], _says_no(a["text"])) for a in pope_answers
                if labels[a["question_id"]][0] == name]
        tp = sum(lab == "yes" and not no for lab, no in rows)
        fp = sum(lab == "no" and not no for lab, no in rows)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / sum(lab == "yes" for lab, _ in rows)
        f1s.append(200 * p * r / (p + r) if p + r else 0.0)
    table = json.loads((out_dir / "results.json").read_text())
    (row,) = table["rows"]
    assert row["model"] == "tiny"
    assert row["values"]["POPE"] == pytest.approx(sum(f1s) / 2, abs=1e-6)
    assert row["values"]["SQA-IMG"] is not None and row["values"]["MM-Vet"] is None
    markdown = (out_dir / "results.md").read_text()
    assert markdown.splitlines()[0].startswith("| Model | SQA-IMG |") and markdown in out
    # A second suite run finds every answer there and generates nothing.
    status, out, _ = _cli(["suite", "--config", str(suite)], capsys)
    assert status == 0 and "pope: 12 questions, 0 answered now, 12 already answered" in out
    assert files["pope/llava_pope_test.jsonl"].is_file()


def test_suite_file_errors_name_the_file_and_key(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("model: {tokenizer: t}\nbenchmarks: [{name: pope, questions: q.jsonl}]\n")
    status, _, err = _cli(["suite", "--config", str(suite), "--out", str(tmp_path)], capsys)
    assert status == 2 and err.strip() == f"configuration error: {suite}: 'model.load' is required (a checkpoint directory)"
    suite.write_text("model: {load: ckpt}\nbenchmarks: [{name: vqa3, questions: q.jsonl}]\n")
    status, _, err = _cli(["suite", "--config", str(suite), "--out", str(tmp_path)], capsys)
    assert status == 2 and "'benchmarks[0].name' is 'vqa3'; known benchmarks: " in err
    suite.write_text("model: {load: ckpt}\nbenchmarks: [{name: pope, questions: q.jsonl, answers: a}]\n")
    status, _, err = _cli(["suite", "--config", str(suite)], capsys)
    assert status == 2 and "unknown key(s) ['answers'] in 'benchmarks[0]'" in err
