"""Rank-side functions of the runner tests (launched by `tests.helpers.distributed`)."""

from __future__ import annotations

from pathlib import Path


def count_calls(session) -> list[int]:
    """Wrap ``session.answer_many`` to record the size of every batch it is asked; returns the list."""
    sizes: list[int] = []
    inner = session.answer_many

    def counted(questions, **kwargs):
        sizes.append(len(questions))
        return inner(questions, **kwargs)

    session.answer_many = counted
    return sizes


def run_sharded(load: str, questions: str, answers: str, batch_size: int, max_new_tokens: int,
                tp: int = 1, pp: int = 1) -> dict:
    """Load ``load`` at ``tp`` x ``pp`` (data parallel over the rest of the world) and run the questions."""
    import torch

    from cumo_megatron.evaluation.questions import load_questions
    from cumo_megatron.evaluation.runner import load_session, run_questions

    session = load_session(load, tp=tp, pp=pp)
    sizes = count_calls(session)
    result = run_questions(session, load_questions(questions), Path(answers), model_id="tiny",
                           batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    return {"rank": torch.distributed.get_rank(), "asked": sum(sizes), "generated": result.generated}
