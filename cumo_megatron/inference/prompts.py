"""Generation prompts as the reference's evaluation builds them, and their token ids.

LLaVA/CuMo evaluation appends the question as the user's message and ``None`` as the assistant's,
so the prompt ends where the answer starts: ``... USER: <image>\\nQ ASSISTANT:`` (vicuna_v1),
``<s>[INST] <<SYS>>...<</SYS>>\\n\\n<image>\\nQ [/INST]`` (mistral_instruct). We reuse the training
templates (token-for-token equal to the reference) by rendering a placeholder answer and cutting
it off, so both stay in one place. ``plain`` (stage 1) prompts with the image alone, as the
stage-1 training sequences begin.
"""

from __future__ import annotations

from typing import Optional

from cumo_megatron.data.templates import IMAGE_TOKEN, get_template, render, tokenizer_image_token
from cumo_megatron.data.tokenizer import Tokenizer

_ANSWER = "ANSWER_PLACEHOLDER"


def generation_prompt(template: str, question: str, has_image: bool = True) -> str:
    """The prompt string (``<image>`` kept as text) that asks ``question`` with ``template``.

    When ``has_image`` and the question holds no ``<image>``, it is put first, as the reference's
    evaluation scripts do (``<image>\\n`` + question).
    """
    tpl = get_template(template)
    if has_image and IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + "\n" + question
    if tpl.style == "plain":
        if not has_image:
            raise ValueError("the plain template (stage 1) needs an image")
        return IMAGE_TOKEN
    rendered = render(
        tpl, [{"from": "human", "value": question}, {"from": "gpt", "value": _ANSWER}], has_image=has_image
    )
    tail = {"two": f" {_ANSWER}{tpl.sep2}", "llama_2": f" {_ANSWER} {tpl.sep2}"}[tpl.style]
    if not rendered.endswith(tail):
        raise AssertionError(f"template {tpl.name} rendered an unexpected ending: {rendered[-80:]!r}")
    return rendered[: -len(tail)]


def prompt_input_ids(
    prompt: str,
    tokenizer: Tokenizer,
    tokens_per_image: int,
    image_token_id: int = -200,
) -> list[int]:
    """Token ids of ``prompt`` with each ``<image>`` expanded to ``tokens_per_image`` placeholders."""
    ids = tokenizer_image_token(prompt, tokenizer, image_token_id)
    out: list[int] = []
    for i in ids:
        out.extend([image_token_id] * tokens_per_image if i == image_token_id else [i])
    return out


def first_question(conversations, record_id: Optional[str] = None) -> tuple[str, Optional[str]]:
    """The first human turn of a LLaVA ``conversations`` list and the gpt answer after it (or None)."""
    where = f"record id={record_id!r}" if record_id is not None else "record"
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    for k, turn in enumerate(conversations):
        if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
            nxt = conversations[k + 1] if k + 1 < len(conversations) else None
            answer = nxt.get("value") if isinstance(nxt, dict) and nxt.get("from") == "gpt" else None
            return turn["value"], answer
    raise ValueError(f"{where}: no human turn with a string 'value' in 'conversations'")


__all__ = ["generation_prompt", "prompt_input_ids", "first_question"]
