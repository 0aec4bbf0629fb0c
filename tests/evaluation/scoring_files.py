"""Writers of small benchmark files in their real formats, shared by the scoring tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """``records`` as JSON lines at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def answer(question_id, text: str, prompt: str = "") -> dict:
    """One LLaVA answer line as ``model_vqa_loader`` writes it."""
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "tiny", "metadata": {}}
