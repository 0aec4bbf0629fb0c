"""Scoring benchmark answers as each benchmark publishes its figures (LLaVA-1.5's evaluation).

One module per benchmark family, a registry, and one entry point::

    from cumo_megatron.evaluation.scoring import score_benchmark, BENCHMARKS, NotScorable
    result = score_benchmark("pope", questions, answers, annotations)
    # {"benchmark": "pope", "metrics": {"f1": ..., ...}, "counts": {"questions": ..., ...}}

A question without an answer is scored as wrong and counted in ``counts["missing"]`` (see
``inputs``). Pure Python; no torch.

Modules: ``registry`` (``BENCHMARKS``, ``score_benchmark``), ``inputs`` (reading and pairing
LLaVA files), one scorer per benchmark family (``pope``, ``mme``, ``scienceqa``, ``textvqa``,
``vqav2`` for VQAv2 and VizWiz, ``gqa``, ``mmbench``, ``seed``, ``mmmu`` with ``mmmu_parse``),
the VQA answer rules (``vqa_normalize``, ``vqa_accuracy``), ``submission`` (files for the
evaluation servers) and ``errors``.
"""

from cumo_megatron.evaluation.scoring.errors import NotScorable, ScoringInputError, UnknownBenchmark
from cumo_megatron.evaluation.scoring.registry import BENCHMARKS, Benchmark, score_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "NotScorable", "ScoringInputError", "UnknownBenchmark", "score_benchmark"]
