"""The registry: every CuMo benchmark is known, GPT-judged ones refuse with where the answers are."""

from __future__ import annotations

import pytest

from cumo_megatron.errors import EXIT_CONFIG, UserError
from cumo_megatron.evaluation.scoring import BENCHMARKS, NotScorable, ScoringInputError, UnknownBenchmark, score_benchmark


@pytest.mark.parametrize("name", ["mmvet", "llava_wild"])
def test_gpt_judged_benchmarks_are_not_scorable_and_say_where_the_answers_are(name, tmp_path):
    with pytest.raises(NotScorable, match=f"GPT judge.*{tmp_path / 'answers.jsonl'}") as info:
        score_benchmark(name, tmp_path / "q.jsonl", tmp_path / "answers.jsonl", None)
    assert isinstance(info.value, UserError)


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(UnknownBenchmark, match="unknown benchmark 'popee'; known: pope") as info:
        score_benchmark("popee", "q", "a", None)
    assert info.value.exit_status == EXIT_CONFIG


def test_missing_annotations_name_what_to_pass(tmp_path):
    with pytest.raises(ScoringInputError, match="POPE needs annotations: pass POPE's coco folder"):
        score_benchmark("pope", tmp_path / "q.jsonl", tmp_path / "a.jsonl", None)


def test_every_benchmark_says_its_headline_and_answer_kind():
    for bench in BENCHMARKS.values():
        assert bench.headline and bench.answer_kind in ("yes_no", "short", "option", "open")
        assert (bench.scorer is None) == bool(bench.judge)


def test_scoring_imports_no_torch():
    # answers are scored on machines without the training stack: the package must stay light
    import subprocess
    import sys

    code = "import sys, cumo_megatron.evaluation.scoring, cumo_megatron.evaluation.results_table; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
