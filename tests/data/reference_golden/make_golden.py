"""Regenerate ``cumo_preprocess.json``: the reference's own preprocessing run on ``tokenizer.model``.

Not a test. It runs SHI-Labs/CuMo's ``preprocess_multimodal`` / ``preprocess`` (``cumo/train/train.py``)
and ``tokenizer_image_token`` (``cumo/mm_utils.py``), read from a local git mirror of the repository,
with the tokenizer the reference pins (transformers 4.37.2, slow ``LlamaTokenizer``), and records
input_ids / labels / whether the reference reported a "tokenization mismatch". The tests compare
``cumo_megatron.data.templates.reference_tokenize`` with these records, so they check the real
reference, not our reading of it. ``tokenizer.model`` is ``tests.fixtures.tiny_models.tiny_sentencepiece``
(vocab 320), frozen here so the records stay valid if that fixture changes.

Run with transformers 4.37.2 and sentencepiece importable ahead of the project's transformers, e.g.::

    pip install --target /tmp/refsite --no-deps transformers==4.37.2 tokenizers==0.15.1 \
        huggingface_hub==0.20.3 sentencepiece==0.1.99 requests urllib3 idna certifi charset_normalizer
    PYTHONPATH=/tmp/refsite:. python tests/data/reference_golden/make_golden.py /path/to/SHI-Labs+CuMo/repo
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import io
import json
import random
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, Sequence

HERE = Path(__file__).resolve().parent
TEMPLATES = (("plain", "plain"), ("vicuna_v1", "vicuna_v1"), ("mistral_instruct", "mistral_instruct_system"))
WORDS = "a red blue circle square is on the left of big small There are 3 shapes What colour it How many ? . , \n".split(" ")


def _load_reference(repo: str) -> dict:
    """The reference's functions, executed from the mirror (git show) into one namespace."""
    import torch
    import transformers

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout

    def functions(src: str, names: set) -> str:
        tree = ast.parse(src)
        return "\n\n".join(
            ast.get_source_segment(src, n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names
        )

    conversation_lib = types.ModuleType("conversation_lib")
    # dont_inherit: this file's `from __future__ import annotations` must not leak into the reference code.
    exec(compile(show("cumo/conversation.py"), "cumo/conversation.py", "exec", dont_inherit=True), conversation_lib.__dict__)
    constants: dict = {}
    exec(compile(show("cumo/constants.py"), "cumo/constants.py", "exec", dont_inherit=True), constants)
    ns = dict(
        DataArguments=object, torch=torch, copy=copy, transformers=transformers, conversation_lib=conversation_lib,
        Dict=Dict, Sequence=Sequence, IS_TOKENIZER_GREATER_THAN_0_14=True,  # tokenizers==0.15.1 is pinned
        **{k: v for k, v in constants.items() if k.isupper()},
    )
    exec(compile(functions(show("cumo/mm_utils.py"), {"tokenizer_image_token"}), "mm_utils", "exec", dont_inherit=True), ns)
    names = {"preprocess_multimodal", "preprocess_llama_2", "preprocess_v1", "preprocess_plain", "preprocess"}
    exec(compile(functions(show("cumo/train/train.py"), names), "train", "exec", dont_inherit=True), ns)
    return ns


def _text(rng: random.Random, image: bool) -> str:
    t = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
    if rng.random() < 0.2:
        t = " " + t
    if rng.random() < 0.2:
        t = t + " "
    if image:
        where = rng.choice(["front", "back", "mid"])
        t = {"front": "<image>\n" + t, "back": t + "\n<image>", "mid": t[:3] + "<image>" + t[3:]}[where]
    return t


def cases(n: int = 8, seed: int = 1) -> list:
    """Hand-picked conversations, then random ones (1-3 rounds, image or not, odd spacing)."""
    q1, a1, q2, a2 = "What colour is the circle?", "It is red.", "How many squares are there?", "There are 3."
    out = [
        (True, [dict(**{"from": "human", "value": "<image>\n" + q1}), {"from": "gpt", "value": a1},
                {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]),
        (False, [{"from": "human", "value": q1}, {"from": "gpt", "value": a1},
                 {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]),
    ]
    # Adversarial: separators inside messages (the reference's round split breaks), a leading gpt turn.
    out += [
        (True, [{"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": a1 + "</s>"}]),
        (False, [{"from": "human", "value": q1 + " ASSISTANT: " + q2}, {"from": "gpt", "value": a1}]),
        (False, [{"from": "human", "value": q1}, {"from": "gpt", "value": "[/INST] " + a1}]),
        (True, [{"from": "gpt", "value": a2}, {"from": "human", "value": q1 + " <image>"}, {"from": "gpt", "value": a1}]),
    ]
    rng = random.Random(seed)
    for _ in range(n):
        has_image = rng.random() < 0.6
        conv = []
        for r in range(rng.randint(1, 3)):
            conv.append({"from": "human", "value": _text(rng, has_image and r == 0)})
            conv.append({"from": "gpt", "value": _text(rng, False)})
        out.append((has_image, conv))
    return out


def main(repo: str) -> None:
    import transformers
    from transformers import LlamaTokenizer

    assert transformers.__version__ == "4.37.2", transformers.__version__
    ns = _load_reference(repo)
    model = HERE / "tokenizer.model"

    class DataArgs:
        is_multimodal = True
        mm_use_im_start_end = False

    records = []
    for legacy in (True, False):
        tok = LlamaTokenizer(str(model), legacy=legacy, model_max_length=100000, padding_side="right")
        tok.pad_token = tok.unk_token  # as the reference's train()
        for name, ref_name in TEMPLATES:
            ns["conversation_lib"].default_conversation = ns["conversation_lib"].conv_templates[ref_name]
            for has_image, conv in cases():
                if name == "plain":
                    if not has_image or conv[0]["from"] != "human":
                        continue
                    conv = conv[:2]
                sources = copy.deepcopy([conv])
                if has_image:
                    sources = ns["preprocess_multimodal"](sources, DataArgs)
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    out = ns["preprocess"](sources, tok, has_image=has_image)
                labels = [int(x) for x in out["labels"][0]]
                assert all(lab in (-100, i) for lab, i in zip(labels, out["input_ids"][0].tolist()))
                records.append(dict(
                    legacy=legacy, template=name, has_image=has_image, conversations=conv,
                    input_ids=[int(x) for x in out["input_ids"][0]],
                    # labels are input_ids or -100: "1" where the label is the token, "0" where ignored
                    supervised="".join("0" if int(x) == -100 else "1" for x in out["labels"][0]),
                    mismatch="tokenization mismatch" in printed.getvalue(),
                ))
    meta = dict(
        generator="tests/data/reference_golden/make_golden.py", transformers="4.37.2",
        reference="SHI-Labs/CuMo cumo/train/train.py preprocess(), cumo/mm_utils.py tokenizer_image_token()",
        tokenizer_md5=hashlib.md5(model.read_bytes()).hexdigest(), ignore_index=-100, image_token_index=-200,
        supervised="labels[t] = input_ids[t] where supervised[t] == '1', else ignore_index",
    )
    (HERE / "cumo_preprocess.json").write_text(json.dumps(dict(meta=meta, records=records), separators=(",", ":")) + "\n")
    print(f"wrote {len(records)} records")


if __name__ == "__main__":
    main(sys.argv[1])
