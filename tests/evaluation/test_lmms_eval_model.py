"""The lmms-eval model ``cumo_megatron``: the adapter's logic against independent computations
(always), and real ``lmms-eval`` runs on local tasks (only where lmms-eval is installed; CI does
not install it: ``pip install -e ".[eval]"``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import cumo_megatron.platform as platform
from cumo_megatron.data.tokenizer import load_tokenizer
from cumo_megatron.evaluation.lmms_eval_model import CuMoEvaluator, GenerationSettings, question_with_images
from cumo_megatron.inference.generation import forward_last_logits, generate, strip_after_eos
from cumo_megatron.inference.session import InferenceSession, default_tokenizer_path, load_model
from tests.fixtures.tiny_models import save_cumo_release, save_images, tiny_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What shape is it?", "Which colour is the big square on the left?", "Describe the picture."]
# Log-probabilities summed over a few tokens in float32: batched (padded) vs one row at a time.
LOGP_ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny Mixtral CuMo release (CLIP-MoE, MLP-MoE connector, MoE LLM) with its tokenizer."""
    made = save_cumo_release(tmp_path_factory.mktemp("ckpt") / "cumo-mixtral", llm_kind="mixtral", scales=(1,))
    tiny_sentencepiece(made.path)
    return made.path


@pytest.fixture(scope="module")
def session(release):
    """The release loaded as generation loads it."""
    model, cfg = load_model(release)
    return InferenceSession(model, cfg, load_tokenizer(default_tokenizer_path(release)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three PNGs of shapes (paths) and the same images opened with PIL."""
    paths = save_images(tmp_path_factory.mktemp("img"), 3, size=48)
    return paths, [Image.open(p).convert("RGB") for p in paths]


def test_generation_settings_read_lmms_eval_kwargs():
    s = GenerationSettings.from_gen_kwargs({"until": "\n\n", "max_new_tokens": 16, "temperature": 0, "do_sample": False,
                                            "num_beams": 1})
    assert (s.until, s.max_new_tokens, s.temperature, s.top_p) == (("\n\n",), 16, 0.0, 1.0)
    assert GenerationSettings.from_gen_kwargs(None).max_new_tokens == 128 and GenerationSettings.from_gen_kwargs({}).until == ()
    # A temperature without do_sample stays greedy (HF generate's rule); with it, it samples.
    assert GenerationSettings.from_gen_kwargs({"temperature": 0.7}).temperature == 0.0
    assert GenerationSettings.from_gen_kwargs({"temperature": 0.7, "do_sample": True, "top_p": 0.9}).top_p == 0.9
    assert GenerationSettings(until=("ASSISTANT", "\n")).cut(" a red\ncircle ASSISTANT: x") == "a red"
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings.from_gen_kwargs({"max_new_tokens": -1})


def test_questions_get_one_image_placeholder_per_image():
    assert question_with_images("What?", 0) == "What?"
    assert question_with_images("What?", 2) == "<image> <image>\nWhat?"
    assert question_with_images("Look: <image> What?", 1) == "Look: <image> What?"  # placed by the task


def test_prompts_are_those_of_generation(session, images):
    paths, pil = images
    evaluator = CuMoEvaluator(session)
    prepared = evaluator.prepare(QUESTIONS[0], [pil[0]])
    # The session's own prompt building reads the image from disk: same prompt, ids and pixels.
    prompt, ids, pixels = session._prompt(QUESTIONS[0], [paths[0]])
    assert (prepared.prompt, prepared.ids) == (prompt, ids)
    assert prepared.prompt.endswith("What shape is it? [/INST]")  # the checkpoint's (Mistral) template
    torch.testing.assert_close(prepared.pixels, pixels, rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 <image> but the doc has 2"):
        evaluator.prepare("<image> one only", pil[:2])


def test_batched_generation_answers_each_question_as_asked_alone(session, images):
    paths, pil = images
    settings = GenerationSettings(max_new_tokens=6)
    got = CuMoEvaluator(session, batch_size=2).generate([(q, [img]) for q, img in zip(QUESTIONS, pil)], settings)
    alone = [session.answer(q, [p], max_new_tokens=6).text for q, p in zip(QUESTIONS, paths)]
    assert got == alone
    assert any(got), "every answer is empty: the comparison above would mean little"
    # Stop strings cut the answer at their first occurrence.
    text = next(a for a in alone if len(a.split()) > 1)
    stop = text.split()[1]
    cut = CuMoEvaluator(session, batch_size=3).generate([(q, [img]) for q, img in zip(QUESTIONS, pil)],
                                                         GenerationSettings(max_new_tokens=6, until=(stop,)))
    assert cut[alone.index(text)] == text.split(stop, 1)[0].strip()


def _reference_score(session, ids, start, pixels):
    """Sum of log p(ids[t] | ids[:t]) for t >= start and all-greedy, one unpadded prefix per token
    (`forward_last_logits`: the last position of each prefix), an independent path."""
    model = session.model
    total, greedy = 0.0, True
    for t in range(start, len(ids)):
        logits_v = forward_last_logits(model, torch.tensor([ids[:t]]), pixels)[0]
        logp_v = torch.log_softmax(logits_v, dim=-1)
        total += float(logp_v[ids[t]])
        greedy &= int(logits_v.argmax()) == ids[t]
    return total, greedy


def test_loglikelihood_matches_token_by_token_forwards(session, images):
    _, pil = images
    items = [(QUESTIONS[0], " a red circle", [pil[0]]),
             (QUESTIONS[1], " blue", [pil[1]]),
             ("Is there text?", " No, there is none.", [])]  # a row without an image in the same batch
    evaluator = CuMoEvaluator(session, batch_size=3)
    got = evaluator.loglikelihood(items)
    for (ctx, cont, imgs), (logp, greedy) in zip(items, got):
        prepared = evaluator.prepare(ctx, imgs)
        whole, start = evaluator.continuation_ids(prepared, cont)
        assert whole[:start] == prepared.ids and len(whole) > start  # the continuation follows the prompt
        assert session.tokenizer.decode(whole[start:]).strip() == cont.strip()
        ref_logp, ref_greedy = _reference_score(session, whole, start, prepared.pixels)
        assert logp < 0 and abs(logp - ref_logp) <= LOGP_ATOL, (ctx, logp, ref_logp)
        assert greedy == ref_greedy


def test_greedy_continuations_are_flagged_greedy(session, images):
    _, pil = images
    evaluator = CuMoEvaluator(session)
    prepared = evaluator.prepare(QUESTIONS[2], [pil[2]])
    tokens = generate(session.model, torch.tensor([prepared.ids]), prepared.pixels, max_new_tokens=4)[0].tolist()
    tokens = strip_after_eos(tokens, session.tokenizer.eos_id) or tokens[:1]
    wrong = tokens[:-1] + [(tokens[-1] + 1) % session.tokenizer.vocab_size]
    start = len(prepared.ids)
    (logp_greedy, is_greedy), (logp_wrong, is_greedy_wrong) = evaluator.score_ids(
        [(prepared.ids + tokens, start, prepared.pixels), (prepared.ids + wrong, start, prepared.pixels)])
    assert is_greedy and not is_greedy_wrong
    assert logp_wrong < logp_greedy  # the argmax token is the likeliest one


def test_module_imports_without_lmms_eval():
    """The core never needs lmms-eval: without it the module imports, and only the lmms-eval class
    is missing."""
    code = ("import sys; sys.modules['lmms_eval'] = None\n"
            "import cumo_megatron.evaluation.lmms_eval_model as m\n"
            "assert m.CuMoEvaluator and not hasattr(m, 'CuMoMegatron'), dir(m)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- with lmms-eval installed ----------------------------------------------------------------------

N_DOCS = 4
UTILS = '''
"""doc_to_* functions of the test's local tasks."""
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target(doc):
    return doc["label"]


def process_results(doc, results):
    return {"match": float(results[0].strip() == doc["answer"])}
'''
COMMON = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""
GENERATE_TASK = """\
task: cumo_tiny_answers
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  until: ["\\n"]
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: match
    aggregation: mean
    higher_is_better: true
"""
CHOICE_TASK = """\
task: cumo_tiny_choices
output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _write_tasks(directory: Path, image_paths) -> Path:
    """Two lmms-eval tasks over a local JSON dataset of ``N_DOCS`` shape images."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = ["circle", "square", "triangle"]
    docs = [{"image": str(image_paths[i % len(image_paths)]), "question": f"What shape is number {i}?",
             "answer": shapes[i % 3], "choices": shapes, "label": i % 3} for i in range(N_DOCS)]
    data = directory / "docs.json"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (directory / "utils.py").write_text(textwrap.dedent(UTILS))
    head = COMMON.format(data=data)
    (directory / "cumo_tiny_answers.yaml").write_text(head + GENERATE_TASK)
    (directory / "cumo_tiny_choices.yaml").write_text(head + CHOICE_TASK)
    return directory


def test_lmms_eval_finds_the_model_by_its_entry_point():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]')")
    from lmms_eval.models import get_model

    from cumo_megatron.evaluation.lmms_eval_model import CuMoMegatron

    assert get_model("cumo_megatron") is CuMoMegatron


def test_lmms_eval_runs_local_tasks_offline(release, session, images, tmp_path):
    """``python -m lmms_eval --model cumo_megatron`` on a generate_until and a multiple_choice task
    whose data the test writes, with the hub switched off: both complete with every document, and
    the logged choice log-probs are those of the adapter called here on the same docs."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]')")
    paths, pil = images
    tasks = _write_tasks(tmp_path / "tasks", paths)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # --verbosity DEBUG: at other levels lmms-eval 0.7 logs a failed run's error and exits 0.
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "cumo_megatron", "--model_args", f"load={release}",
           "--tasks", "cumo_tiny_answers,cumo_tiny_choices", "--include_path", str(tasks), "--batch_size", "2",
           "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    print(f"lmms-eval run: {time.perf_counter() - began:.1f} s")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    results = sorted(out.rglob("*_results.json"))
    assert len(results) == 1, (list(out.rglob("*")), proc.stdout[-2000:])
    summary = json.loads(results[0].read_text())
    logged = {}
    for task, metric in (("cumo_tiny_answers", "match,none"), ("cumo_tiny_choices", "acc,none")):
        assert summary["n-samples"][task]["effective"] == N_DOCS
        assert 0.0 <= summary["results"][task][metric] <= 1.0
        samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
        assert len(samples) == 1
        logged[task] = sorted((json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()),
                              key=lambda row: row["doc_id"])
        assert [row["doc_id"] for row in logged[task]] == list(range(N_DOCS))
    assert all(isinstance(row["filtered_resps"], str) for row in logged["cumo_tiny_answers"])
    # One (-log p, is greedy) per choice (lmms-eval ranks choices by argmin), as the adapter
    # computes them for the doc's context and image; acc scores the likeliest choice.
    evaluator = CuMoEvaluator(session)
    shapes = ["circle", "square", "triangle"]
    for row in logged["cumo_tiny_choices"]:
        i = row["doc_id"]
        expected = evaluator.loglikelihood([(f"What shape is number {i}?", " " + s, [pil[i % len(pil)]]) for s in shapes])
        assert len(row["filtered_resps"]) == len(shapes)
        for (loss, greedy), (ref_logp, ref_greedy) in zip(row["filtered_resps"], expected):
            assert abs(float(loss) + ref_logp) <= LOGP_ATOL and (greedy == "True") == ref_greedy
        likeliest = max(range(len(shapes)), key=lambda k: expected[k][0])
        assert row["acc"] == float(likeliest == i % 3)
