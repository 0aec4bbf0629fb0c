"""The benchmarks CuMo reports, what each expects, and ``score_benchmark``, the one entry point.

Every scorer takes (questions, answers, annotations) paths and returns
``{"benchmark": name, "metrics": {...}, "counts": {...}}``: metrics under their published names,
rates in percent (MME in its points), breakdowns as nested dicts; counts say how many questions
were scored, answered, missing (scored as wrong), extra, duplicated and unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cumo_megatron.evaluation.scoring.errors import NotScorable, ScoringInputError, UnknownBenchmark
from cumo_megatron.evaluation.scoring.gqa import score_gqa
from cumo_megatron.evaluation.scoring.mmbench import score_mmbench
from cumo_megatron.evaluation.scoring.mme import score_mme
from cumo_megatron.evaluation.scoring.mmmu import score_mmmu
from cumo_megatron.evaluation.scoring.pope import score_pope
from cumo_megatron.evaluation.scoring.scienceqa import score_scienceqa
from cumo_megatron.evaluation.scoring.seed import score_seed
from cumo_megatron.evaluation.scoring.textvqa import score_textvqa
from cumo_megatron.evaluation.scoring.vqav2 import score_vizwiz, score_vqav2

# The prompt suffixes of LLaVA-1.5's evaluation question files (they are already in those files'
# ``text``; a runner appends the suffix only to a question whose text lacks it).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."

Scorer = Callable[[Path, Path, Optional[Path]], dict]


@dataclass(frozen=True)
class Benchmark:
    """What the registry knows of one benchmark.

    ``scorer`` is None where a GPT judge publishes the figure (``judge`` says which). ``server``
    names the evaluation server that scores the split without public annotations (scoring then
    needs the annotations of a split that has them). ``headline`` is the metric the CuMo paper's
    table shows; ``answer_kind`` is ``yes_no``, ``short``, ``option`` or ``open``.
    """

    name: str
    title: str
    scorer: Optional[Scorer]
    needs_annotations: bool
    prompt_suffix: str
    answer_kind: str
    headline: str
    annotations: str = ""
    judge: str = ""
    server: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "pope", "POPE", score_pope, True, SHORT_ANSWER, "yes_no", "f1",
            annotations="POPE's coco folder of coco_pope_<category>.json files",
        ),
        Benchmark(
            "scienceqa", "SQA-IMG", score_scienceqa, True, OPTION_LETTER, "option", "accuracy_img",
            annotations="ScienceQA's problems.json (or its folder)",
        ),
        Benchmark(
            "textvqa", "TextVQA", score_textvqa, True, SHORT_ANSWER, "short", "accuracy",
            annotations="TextVQA's TextVQA_0.5.1_val.json",
        ),
        Benchmark(
            "vqav2", "VQAv2", score_vqav2, True, SHORT_ANSWER, "short", "accuracy",
            annotations="VQAv2 val annotations (v2_mscoco_val2014_annotations.json)",
            server="the EvalAI VQAv2 server (test-dev)",
        ),
        Benchmark(
            "vizwiz", "VizWiz", score_vizwiz, True, UNANSWERABLE + "\n" + SHORT_ANSWER, "short", "accuracy",
            annotations="VizWiz's val.json", server="the EvalAI VizWiz-VQA server (test)",
        ),
        Benchmark(
            "gqa", "GQA", score_gqa, True, SHORT_ANSWER, "short", "accuracy",
            annotations="GQA's testdev_balanced_questions.json",
        ),
        Benchmark(
            "mme", "MME", score_mme, True, SHORT_ANSWER, "yes_no", "perception",
            annotations="MME's MME_Benchmark_release_version folder",
        ),
        Benchmark(
            "mmbench", "MMBench", score_mmbench, False, OPTION_LETTER, "option", "accuracy",
            annotations="nothing: the dev TSV holds the answers", server="the MMBench server (test split)",
        ),
        Benchmark(
            "seed", "SEED", score_seed, True, OPTION_LETTER, "option", "accuracy_image",
            annotations="SEED's SEED-Bench.json",
        ),
        Benchmark(
            "mmmu", "MMMU", score_mmmu, True, OPTION_LETTER, "option", "accuracy",
            annotations="MMMU's answer_dict_val.json",
        ),
        Benchmark(
            "mmvet", "MM-Vet", None, False, "", "open", "total",
            judge="MM-Vet's GPT-4 grader; scoring.submission.write_mmvet_submission writes its JSON",
        ),
        Benchmark(
            "llava_wild", "LLaVA-W", None, False, "", "open", "relative_score",
            judge="LLaVA's eval_gpt_review_bench.py (GPT-4 review against answers_gpt4.jsonl) and summarize_gpt_review.py",
        ),
    )
}


def score_benchmark(
    name: str,
    questions: str | Path,
    answers: str | Path,
    annotations: str | Path | None = None,
) -> dict:
    """Score ``answers`` (LLaVA answer lines) to the ``questions`` of benchmark ``name``.

    Raises :class:`UnknownBenchmark` for a name not in :data:`BENCHMARKS`, :class:`NotScorable`
    for a GPT-judged benchmark or a server-scored split, and :class:`ScoringInputError` for
    files that cannot be read or matched.
    """
    if name not in BENCHMARKS:
        raise UnknownBenchmark(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if bench.scorer is None:
        raise NotScorable(
            f"{bench.title} is scored by a GPT judge ({bench.judge}), not here; "
            f"the answers `run` wrote are in {answers}"
        )
    if bench.needs_annotations and annotations is None:
        if bench.server:
            raise NotScorable(
                f"{bench.title} without annotations is scored by {bench.server} "
                f"(cumo_megatron.evaluation.scoring.submission writes its file); the answers `run` "
                f"wrote are in {answers}; to score locally, pass {bench.annotations}"
            )
        raise ScoringInputError(f"{bench.title} needs annotations: pass {bench.annotations}")
    return bench.scorer(Path(questions), Path(answers), None if annotations is None else Path(annotations))


__all__ = ["BENCHMARKS", "Benchmark", "OPTION_LETTER", "SHORT_ANSWER", "UNANSWERABLE", "score_benchmark"]
