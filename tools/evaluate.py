"""Run and score CuMo on the benchmarks of its paper, from LLaVA's evaluation files.

    # answer a benchmark's questions (greedy, batched; under torchrun sharded over data-parallel ranks)
    python tools/evaluate.py run --benchmark pope --load CKPT --questions llava_pope_test.jsonl \\
        --images coco/val2014 --out runs/eval
    torchrun --nproc_per_node 8 tools/evaluate.py run ... [--tp 2] [--pp 1]

    # score the answers with the benchmark's published metric (last line: one JSON object)
    python tools/evaluate.py score --benchmark pope --questions llava_pope_test.jsonl \\
        --answers runs/eval/pope.jsonl --annotations pope/coco

    # several benchmarks from one YAML file; writes OUT/results.md and OUT/results.json
    python tools/evaluate.py suite --config suite.yaml [--out runs/eval]

``run`` writes LLaVA's answer lines to ``OUT/<benchmark>.jsonl`` and is resumable: answers already
there (or in the part files of a killed run) are not generated again. MM-Vet and LLaVA-Wild need a
GPT judge: ``run`` writes their answers and ``score`` says where to send them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.errors import run_cli

log = logging.getLogger("cumo_megatron.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """The command line: verbs run, score and suite."""
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="answer a benchmark's questions with a checkpoint")
    run.add_argument("--benchmark", required=True, help="registry name (pope, scienceqa, mmbench, ...)")
    run.add_argument("--questions", required=True, help="the benchmark's LLaVA question file")
    run.add_argument("--images", default=None, help="folder of the images (default: the question file's)")
    run.add_argument("--out", required=True, help="folder of the answer file <benchmark>.jsonl")
    _model_options(run)

    score = verbs.add_parser("score", help="score an answer file with the benchmark's published metric")
    score.add_argument("--benchmark", required=True)
    score.add_argument("--questions", required=True, help="the question file the answers answer")
    score.add_argument("--answers", required=True, help="LLaVA answer lines (any order)")
    score.add_argument("--annotations", default=None, help="the benchmark's ground truth (file or folder)")

    suite = verbs.add_parser("suite", help="run and score several benchmarks listed in a YAML file")
    suite.add_argument("--config", required=True, help="the suite YAML (see cumo_megatron/evaluation/suite.py)")
    suite.add_argument("--out", default=None, help="output folder (default: the file's 'out')")
    _parallel_options(suite)
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="our checkpoint directory or an original CuMo release")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: tokenizer.model in or beside --load)")
    p.add_argument("--template", default=None, help="vicuna_v1 | mistral_instruct (default: the LLM family's)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default 128, LLaVA's)")
    p.add_argument("--all-rounds", action="store_true",
                   help="MMBench: ask each question once per option rotation (CircularEval)")
    _parallel_options(p)


def _parallel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1; data parallel over the rest)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")


def _benchmarks():
    from cumo_megatron.evaluation.scoring import BENCHMARKS

    return BENCHMARKS


def _check_benchmark(name: str):
    """The registry entry of ``name``, or a ConfigError listing the known names."""
    benchmarks = _benchmarks()
    if name not in benchmarks:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(benchmarks)}")
    return benchmarks[name]


def _check_sizes(tp: int, pp: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} must divide the world size {world} (data parallel is the rest)")


def _rank() -> int:
    """This process's rank; `score` never imports torch, so it is asked only when already loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _say(text: str) -> None:
    """Print on rank 0 only (every rank runs the command under torchrun)."""
    if _rank() == 0:
        _STDOUT.write(text + "\n")
        _STDOUT.flush()


def _run_one(session, model_id: str, name: str, questions, images, out: Path, batch_size: int,
             max_new_tokens: int, all_rounds: bool):
    from cumo_megatron.evaluation.questions import load_questions
    from cumo_megatron.evaluation.runner import run_questions

    bench = _check_benchmark(name)
    asked = load_questions(questions, images, suffix=bench.prompt_suffix, all_rounds=all_rounds)
    result = run_questions(session, asked, out / f"{name}.jsonl", model_id, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    _say(f"{name}: {result.total} questions, {result.generated} answered now, {result.already_answered} "
         f"already answered; answers in {result.answers}")
    return result


def cmd_run(args) -> int:
    """``run``: answer one benchmark's questions."""
    from cumo_megatron.evaluation.runner import load_session, model_id_for

    _check_benchmark(args.benchmark)
    _check_sizes(args.tp, args.pp)
    session = load_session(args.load, args.tokenizer, args.template, tp=args.tp, pp=args.pp)
    _run_one(session, model_id_for(args.load), args.benchmark, args.questions, args.images, Path(args.out),
             args.batch_size, args.max_new_tokens, args.all_rounds)
    return 0


def _summary(result: dict) -> str:
    """Readable lines of a scoring result: the metrics, then the counts."""
    lines = [f"{result['benchmark']}:"]
    for key, value in result["metrics"].items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            lines.append(f"  {key}: {inner}")
        else:
            lines.append(f"  {key}: {_number(value)}")
    counts = result.get("counts") or {}
    if counts:
        lines.append("  counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def cmd_score(args) -> int:
    """``score``: the published metric of one answer file; the last line is one JSON object."""
    from cumo_megatron.evaluation.scoring import score_benchmark

    _check_benchmark(args.benchmark)
    result = score_benchmark(args.benchmark, args.questions, args.answers, args.annotations)
    _say(_summary(result))
    _say(json.dumps({"benchmark": result["benchmark"], "metrics": result["metrics"]}))
    return 0


def cmd_suite(args) -> int:
    """``suite``: run every benchmark of the YAML file with one loaded model, score them, write the table."""
    from cumo_megatron.evaluation.runner import load_session, model_id_for
    from cumo_megatron.evaluation.suite import read_suite
    from cumo_megatron.evaluation.suite_results import score_suite, write_results

    suite = read_suite(args.config, known_benchmarks=list(_benchmarks()))
    out = Path(args.out) if args.out else suite.out
    if out is None:
        raise ConfigError(f"{args.config}: no 'out' folder in the file; pass --out DIR")
    _check_sizes(args.tp, args.pp)
    session = load_session(suite.load, suite.tokenizer, suite.template, tp=args.tp, pp=args.pp)
    model_id = model_id_for(suite.load)
    for bench in suite.benchmarks:
        _run_one(session, model_id, bench.name, bench.questions, bench.images, out, suite.batch_size,
                 bench.max_new_tokens or suite.max_new_tokens, bench.all_rounds)
    if _rank() == 0:
        scored = score_suite(suite, out)
        for entry in scored:
            _say(_summary(entry.result) if entry.result else f"{entry.name}: not scored: {entry.reason}")
        table = write_results(scored, out, suite.model_name or model_id)
        _say(table.markdown)
        _say(f"wrote {table.markdown_path} and {table.json_path}")
    return 0


_STDOUT = sys.stdout


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; library prints go to stderr so stdout holds the summaries and the JSON line."""
    global _STDOUT
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    _STDOUT = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return {"run": cmd_run, "score": cmd_score, "suite": cmd_suite}[args.verb](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
