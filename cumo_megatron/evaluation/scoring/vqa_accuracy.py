"""VQA accuracy: a predicted answer against the (usually ten) human answers.

An answer scores ``min(#humans who gave it / 3, 1)``, computed as the official evaluators do:
for each human left out in turn, min(#matches among the other nine / 3, 1), averaged over the
ten; so an answer three humans gave scores 0.9, not 1.
"""

from __future__ import annotations

from typing import Sequence

from cumo_megatron.evaluation.scoring.vqa_normalize import digits_and_articles, normalize_answer, strip_punctuation


def leave_one_out_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Mean over humans ``i`` of min(#(j != i with answer_j == prediction) / 3, 1), in [0, 1]."""
    if not human_answers:
        return 0.0
    matches = sum(answer == prediction for answer in human_answers)
    # leaving out a matching human removes one match; leaving out another removes none
    per_human = [min(1.0, (matches - (answer == prediction)) / 3.0) for answer in human_answers]
    return sum(per_human) / len(per_human)


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """TextVQA's evaluator (LLaVA's ``TextVQAAccuracyEvaluator``): EvalAI's processor on the
    prediction and on every human answer, then the leave-one-out accuracy."""
    return leave_one_out_accuracy(normalize_answer(prediction), [normalize_answer(a) for a in human_answers])


def vqa_accuracy(prediction: str, human_answers: Sequence[str], *, vizwiz: bool = False) -> float:
    """The official VQA evaluator (or VizWiz's, ``vizwiz=True``) on a prediction already through
    EvalAI's processor (LLaVA's submission files hold processed answers).

    The prediction gets the punctuation and word steps again. VQA's human answers get the
    punctuation step only, and only when they disagree; VizWiz's are compared as they are.
    """
    prediction = digits_and_articles(strip_punctuation(prediction.replace("\n", " ").replace("\t", " ").strip()))
    humans = list(human_answers)
    if not vizwiz and len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    return leave_one_out_accuracy(prediction, humans)


__all__ = ["leave_one_out_accuracy", "textvqa_accuracy", "vqa_accuracy"]
