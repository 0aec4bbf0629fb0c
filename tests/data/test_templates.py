"""Prompt templates: rendered strings, token ids and loss masks against hand-written expectations,
against the reference's own preprocessing (reference_golden/), image expansion and truncation.

Expected token ids are raw sentencepiece encodings of hand-chosen pieces of the prompt: the slow
tokenizer encodes each piece between special tokens / images on its own, and sentencepiece never
merges across a space, so "...ASSISTANT: It is red." = enc("...ASSISTANT:") + enc("It is red.").
Expected masks are written by hand as (piece, supervised) pairs in the reference's alignment
(a token is supervised when it is a target); `shifted` turns that into our convention.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from cumo_megatron.data.records import DataError, ProblemKind
from cumo_megatron.data.templates import (
    IGNORE_INDEX,
    SKIP_ALL_TRUNCATED,
    SKIP_IMAGE_TRUNCATED,
    SKIP_MISMATCH,
    SYSTEM_PROMPT,
    TEMPLATES,
    SkippedSample,
    TokenizedSample,
    get_template,
    reference_tokenize,
    render,
    tokenize_conversation,
)
from cumo_megatron.data.tokenizer import SentencePieceTokenizer
from tests.fixtures.tiny_models import tiny_sentencepiece

BOS, EOS, IMG = 1, 2, -200
GOLDEN = Path(__file__).parent / "reference_golden"

Q1, A1 = "What colour is the circle?", "It is red."
Q2, A2 = "How many squares are there?", "There are 3."
CONV_IMAGE = [
    {"from": "human", "value": "<image>\n" + Q1},
    {"from": "gpt", "value": A1},
    {"from": "human", "value": Q2},
    {"from": "gpt", "value": A2},
]
CONV_TEXT = [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}, {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]
CAPTION = [{"from": "human", "value": "Describe the picture.\n<image>"}, {"from": "gpt", "value": "A small red circle."}]
MISTRAL_SYS = f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def tok(model_path):
    return SentencePieceTokenizer(model_path)


@pytest.fixture(scope="module")
def enc(model_path):
    """Raw sentencepiece encoding (dummy prefix on), one hand-chosen piece of the prompt."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return sp.encode


@pytest.fixture(scope="module")
def space(model_path):
    """The lone "▁" piece: what a space with nothing after it (before </s> or <image>) becomes."""
    return spm.SentencePieceProcessor(model_file=str(model_path)).piece_to_id("\u2581")


def shifted(parts, tokens_per_image=1):
    """(ids, supervised) parts in the reference's alignment -> (input_ids, labels, loss_mask) ours.

    ``IMG`` in a part stands for one image and becomes ``tokens_per_image`` placeholders.
    """
    ids, sup = [], []
    for piece, flag in parts:
        for i in piece:
            n = tokens_per_image if i == IMG else 1
            ids += [i] * n
            sup += [flag and i != IMG] * n
    labels = [ids[t + 1] if sup[t + 1] else 0 for t in range(len(ids) - 1)] + [0]
    mask = [int(sup[t + 1]) for t in range(len(ids) - 1)] + [0]
    return ids, labels, mask


def assert_sample(out, parts, tokens_per_image=1, num_images=None):
    assert isinstance(out, TokenizedSample), out
    ids, labels, mask = shifted(parts, tokens_per_image)
    assert out.input_ids == ids
    assert out.loss_mask == mask
    assert out.labels == labels
    assert out.supervised_tokens == sum(mask)
    if num_images is not None:
        assert out.num_images == num_images


# --------------------------------------------------------------------------------------------
# Rendered strings
# --------------------------------------------------------------------------------------------


def test_render_vicuna_v1():
    sys = SYSTEM_PROMPT
    assert render("vicuna_v1", CONV_IMAGE) == (
        f"{sys} USER: <image>\nWhat colour is the circle? ASSISTANT: It is red.</s>"
        "USER: How many squares are there? ASSISTANT: There are 3.</s>"
    )
    assert render("vicuna_v1", CONV_TEXT) == (
        f"{sys} USER: What colour is the circle? ASSISTANT: It is red.</s>"
        "USER: How many squares are there? ASSISTANT: There are 3.</s>"
    )
    assert sys == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )


def test_render_mistral_instruct():
    sys = SYSTEM_PROMPT
    assert render("mistral_instruct", CONV_IMAGE) == (
        f"<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n<image>\nWhat colour is the circle? [/INST] It is red. </s>"
        "[INST] How many squares are there? [/INST] There are 3. </s>"
    )
    assert render("mistral_instruct", CONV_TEXT) == (
        f"<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\nWhat colour is the circle? [/INST] It is red. </s>"
        "[INST] How many squares are there? [/INST] There are 3. </s>"
    )
    # CuMo's scripts name it mistral_instruct_system.
    assert get_template("mistral_instruct_system") is TEMPLATES["mistral_instruct"]


def test_render_plain_keeps_only_image_and_caption():
    assert render("plain", CAPTION) == "<image>A small red circle.\n"


def test_render_moves_a_single_image_to_the_front_and_strips_only_that_turn():
    conv = [
        {"from": "human", "value": "  What is this?\n<image> "},
        {"from": "gpt", "value": " A circle. "},
        {"from": "human", "value": " And this? "},
        {"from": "gpt", "value": "A square."},
    ]
    assert render("vicuna_v1", conv) == (
        f"{SYSTEM_PROMPT} USER: <image>\nWhat is this? ASSISTANT:  A circle. </s>USER:  And this?  ASSISTANT: A square.</s>"
    )
    # Several <image> in one turn stay where they are (the reference would merge them into one).
    two = [{"from": "human", "value": "Left <image> right <image>"}, {"from": "gpt", "value": "Two."}]
    assert render("vicuna_v1", two) == f"{SYSTEM_PROMPT} USER: Left <image> right <image> ASSISTANT: Two.</s>"


def test_render_drops_a_leading_gpt_turn():
    assert render("vicuna_v1", [{"from": "gpt", "value": "Hello."}] + CONV_TEXT) == render("vicuna_v1", CONV_TEXT)


# --------------------------------------------------------------------------------------------
# Tokens and loss masks, hand-written
# --------------------------------------------------------------------------------------------


def test_vicuna_v1_tokens_and_mask(tok, enc, space):
    out = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=3, max_length=4096)
    assert_sample(
        out,
        [
            ([BOS], False),
            (enc(f"{SYSTEM_PROMPT} USER:"), False),
            ([space], False),  # "USER: " before the image
            ([IMG], False),
            (enc(f"\n{Q1} ASSISTANT:"), False),  # after an image: a new text, "▁" + "\n" ...
            (enc(A1), True),
            ([EOS], True),  # "</s>" ends each answer and is learnt
            (enc(f"USER: {Q2} ASSISTANT:"), False),
            (enc(A2), True),
            ([EOS], True),
        ],
        tokens_per_image=3,
        num_images=1,
    )
    out = tokenize_conversation("vicuna_v1", CONV_TEXT, tok, tokens_per_image=3, max_length=4096)
    assert_sample(
        out,
        [
            ([BOS], False),
            (enc(f"{SYSTEM_PROMPT} USER: {Q1} ASSISTANT:"), False),
            (enc(A1), True),
            ([EOS], True),
            (enc(f"USER: {Q2} ASSISTANT:"), False),
            (enc(A2), True),
            ([EOS], True),
        ],
        num_images=0,
    )
    assert not out.truncated


def test_mistral_instruct_tokens_and_mask(tok, enc, space):
    out = tokenize_conversation("mistral_instruct", CONV_IMAGE, tok, tokens_per_image=2, max_length=4096)
    assert_sample(
        out,
        [
            ([BOS, BOS], False),  # tokenizer BOS + the prompt's literal "<s>"
            (enc(MISTRAL_SYS), False),
            ([IMG], False),
            (enc(f"\n{Q1} [/INST]"), False),
            (enc(A1), True),
            ([space], True),  # " </s>": the space before </s> is learnt with the answer
            ([EOS], True),
            (enc(f"[INST] {Q2} [/INST]"), False),
            (enc(A2), True),
            ([space], True),
            ([EOS], True),
        ],
        tokens_per_image=2,
        num_images=1,
    )
    out = tokenize_conversation("mistral_instruct", CONV_TEXT, tok, tokens_per_image=2, max_length=4096)
    assert_sample(
        out,
        [
            ([BOS, BOS], False),
            (enc(MISTRAL_SYS + Q1 + " [/INST]"), False),
            (enc(A1), True),
            ([space], True),
            ([EOS], True),
            (enc(f"[INST] {Q2} [/INST]"), False),
            (enc(A2), True),
            ([space], True),
            ([EOS], True),
        ],
    )


def test_plain_tokens_and_mask(tok, enc):
    out = tokenize_conversation("plain", CAPTION, tok, tokens_per_image=4, max_length=4096)
    # BOS and the image are masked; the caption and its "\n" are learnt; no </s>.
    assert_sample(out, [([BOS], False), ([IMG], False), (enc("A small red circle.\n"), True)], tokens_per_image=4, num_images=1)
    assert out.input_ids[-1] == 13  # "\n" is the byte piece <0x0A>
    # Written out in full for one short caption, tokens_per_image=2:
    c = enc("A small red circle.\n")
    out = tokenize_conversation("plain", CAPTION, tok, tokens_per_image=2, max_length=4096)
    assert out.input_ids == [BOS, IMG, IMG] + c
    assert out.labels == [0, 0] + c + [0]
    assert out.loss_mask == [0, 0] + [1] * len(c) + [0]


def test_vicuna_v1_non_legacy_tokenizer_corrects_later_rounds(model_path, enc):
    # legacy=False: after "</s>" the next round has no leading "▁"; preprocess_v1 subtracts one
    # token from every later round, so the mask still lines up.
    tok = SentencePieceTokenizer(model_path, legacy=False)
    round2 = enc(f"USER: {Q2} ASSISTANT:")
    assert round2[0] == enc(" ")[0]  # it starts with a lone "▁" when tokenized alone
    out = tokenize_conversation("vicuna_v1", CONV_TEXT, tok, tokens_per_image=1, max_length=4096)
    assert_sample(
        out,
        [
            ([BOS], False),
            (enc(f"{SYSTEM_PROMPT} USER: {Q1} ASSISTANT:"), False),
            (enc(A1), True),
            ([EOS], True),
            (round2[1:], False),
            (enc(A2), True),
            ([EOS], True),
        ],
    )


def test_mistral_non_legacy_multi_turn_is_a_mismatch(model_path):
    # preprocess_llama_2 has no non-legacy correction: with a tokenizer where "[" after "</s>" is
    # one token fewer than "▁[" alone, the reference masks the whole sample. We skip and count it.
    tok = SentencePieceTokenizer(model_path, legacy=False)
    out = tokenize_conversation("mistral_instruct", CONV_TEXT, tok, tokens_per_image=1, max_length=4096, sample_id="m1")
    assert isinstance(out, SkippedSample) and not out
    assert out.reason == SKIP_MISMATCH and out.kind == ProblemKind.TOKENIZE_FAILED and "m1" in out.detail
    one_round = tokenize_conversation("mistral_instruct", CONV_TEXT[:2], tok, tokens_per_image=1, max_length=4096)
    assert isinstance(one_round, TokenizedSample)


@pytest.mark.parametrize(
    "template,conv",
    [
        ("vicuna_v1", [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1 + "</s>"}]),
        ("vicuna_v1", [{"from": "human", "value": Q1 + " ASSISTANT: " + Q2}, {"from": "gpt", "value": A1}]),
        ("mistral_instruct", [{"from": "human", "value": Q1}, {"from": "gpt", "value": "[/INST] " + A1}]),
    ],
)
def test_separator_inside_a_message_is_a_mismatch(tok, template, conv):
    out = tokenize_conversation(template, conv, tok, tokens_per_image=1, max_length=4096)
    assert isinstance(out, SkippedSample) and out.reason == SKIP_MISMATCH


# --------------------------------------------------------------------------------------------
# The reference itself (transformers 4.37.2 + CuMo's preprocess), recorded in reference_golden/
# --------------------------------------------------------------------------------------------


def _ours_from_reference(ids, supervised, tokens_per_image, image_token_id):
    """The reference's aligned sample -> our shifted one, stated directly."""
    x, s = [], []
    for i, f in zip(ids, supervised):
        if i == IMG:
            x += [image_token_id] * tokens_per_image
            s += [False] * tokens_per_image
        else:
            x.append(i)
            s.append(f == "1")
    labels = [x[t + 1] if s[t + 1] else 0 for t in range(len(x) - 1)] + [0]
    mask = [int(s[t + 1]) for t in range(len(x) - 1)] + [0]
    return x, labels, mask


def test_matches_reference_preprocess_golden():
    golden = json.loads((GOLDEN / "cumo_preprocess.json").read_text())
    model = GOLDEN / "tokenizer.model"
    assert hashlib.md5(model.read_bytes()).hexdigest() == golden["meta"]["tokenizer_md5"]
    toks = {legacy: SentencePieceTokenizer(model, legacy=legacy) for legacy in (True, False)}
    seen = set()
    for k, rec in enumerate(golden["records"]):
        tok = toks[rec["legacy"]]
        where = f"record {k} ({rec['template']}, legacy={rec['legacy']})"
        ref = reference_tokenize(rec["template"], rec["conversations"], tok, has_image=rec["has_image"])
        assert ref.input_ids == rec["input_ids"], where
        assert ref.mismatch == rec["mismatch"], where
        assert ref.labels == [i if f == "1" else IGNORE_INDEX for i, f in zip(rec["input_ids"], rec["supervised"])], where
        out = tokenize_conversation(
            rec["template"], rec["conversations"], tok, tokens_per_image=3, max_length=None,
            image_token_id=-7, has_image=rec["has_image"],
        )
        if rec["mismatch"]:
            assert isinstance(out, SkippedSample) and out.reason == SKIP_MISMATCH, where
        else:
            ids, labels, mask = _ours_from_reference(rec["input_ids"], rec["supervised"], 3, -7)
            assert (out.input_ids, out.labels, out.loss_mask) == (ids, labels, mask), where
        seen.add((rec["template"], rec["legacy"], rec["has_image"], rec["mismatch"]))
    # The records cover every template, both tokenizer modes, images or not, and mismatches.
    assert {t for t, *_ in seen} == set(TEMPLATES)
    assert {(t, m) for t, _, _, m in seen} >= {("vicuna_v1", True), ("mistral_instruct", True), ("vicuna_v1", False)}


# --------------------------------------------------------------------------------------------
# Images: expansion and counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens_per_image", [1, 5, 576])
def test_image_expands_to_tokens_per_image_placeholders(tok, tokens_per_image):
    base = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=1, max_length=None)
    out = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=tokens_per_image, max_length=None, image_token_id=-5)
    assert out.num_images == 1
    assert out.input_ids.count(-5) == tokens_per_image and IMG not in out.input_ids
    start = out.input_ids.index(-5)
    assert out.input_ids[start : start + tokens_per_image] == [-5] * tokens_per_image  # contiguous
    assert len(out.input_ids) == len(base.input_ids) + tokens_per_image - 1
    assert out.supervised_tokens == base.supervised_tokens
    # Nothing predicts or is predicted inside the image: positions start-1 .. end-1 are not in the loss.
    assert not any(out.loss_mask[start - 1 : start + tokens_per_image])


def test_two_images(tok):
    conv = [
        {"from": "human", "value": "<image>\nFirst?"},
        {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Second? <image>"},
        {"from": "gpt", "value": "A square."},
    ]
    out = tokenize_conversation("vicuna_v1", conv, tok, tokens_per_image=4, max_length=None)
    assert out.num_images == 2 and out.input_ids.count(IMG) == 8
    side = tokenize_conversation(
        "vicuna_v1", [{"from": "human", "value": "Left <image> right <image>"}, {"from": "gpt", "value": "Two."}],
        tok, tokens_per_image=4, max_length=None,
    )
    assert side.num_images == 2 and side.input_ids.count(IMG) == 8


# --------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------


def test_plain_truncation_rules(tok, enc):
    c = enc("A small red circle.\n")
    # Cut after the first caption token: it is still predicted (from the last image position);
    # the last kept position has nothing after it.
    out = tokenize_conversation("plain", CAPTION, tok, tokens_per_image=2, max_length=4)
    assert out.input_ids == [BOS, IMG, IMG, c[0]]
    assert out.labels == [0, 0, c[0], 0] and out.loss_mask == [0, 0, 1, 0]
    assert out.truncated and out.supervised_tokens == 1
    # Cut right after the image: nothing left to learn.
    out = tokenize_conversation("plain", CAPTION, tok, tokens_per_image=2, max_length=3, sample_id="cap-1")
    assert isinstance(out, SkippedSample) and out.reason == SKIP_ALL_TRUNCATED == "all supervised tokens truncated"
    assert out.kind == ProblemKind.NO_SUPERVISION and "cap-1" in out.detail
    # Cut inside the image: the whole sample is dropped, never a partial image.
    out = tokenize_conversation("plain", CAPTION, tok, tokens_per_image=2, max_length=2)
    assert isinstance(out, SkippedSample) and out.reason == SKIP_IMAGE_TRUNCATED and out.kind == ProblemKind.TOO_LONG
    # Exactly long enough: not truncated.
    out = tokenize_conversation("plain", CAPTION, tok, tokens_per_image=2, max_length=3 + len(c))
    assert not out.truncated and out.supervised_tokens == len(c)


def test_vicuna_truncation_in_second_answer(tok):
    full = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=8, max_length=None)
    n = len(full.input_ids)
    for cut in (n - 1, n - 3):
        out = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=8, max_length=cut)
        assert out.truncated and len(out.input_ids) == cut
        assert out.input_ids == full.input_ids[:cut]
        # Same targets as the full sample, except the last kept position (its target was cut off).
        assert out.loss_mask == full.loss_mask[: cut - 1] + [0]
        assert out.labels == full.labels[: cut - 1] + [0]
        assert out.supervised_tokens == sum(full.loss_mask[: cut - 1])
    # A cut through the image drops the sample; a cut in the first instruction leaves nothing.
    start = full.input_ids.index(IMG)
    out = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=8, max_length=start + 4)
    assert isinstance(out, SkippedSample) and out.reason == SKIP_IMAGE_TRUNCATED
    out = tokenize_conversation("vicuna_v1", CONV_IMAGE, tok, tokens_per_image=8, max_length=start + 8 + 2)
    assert isinstance(out, SkippedSample) and out.reason == SKIP_ALL_TRUNCATED
    # An image entirely beyond the cut is dropped too (its features would have nowhere to go).
    late = CONV_TEXT[:2] + [{"from": "human", "value": "<image>\n" + Q2}, {"from": "gpt", "value": A2}]
    full_late = tokenize_conversation("vicuna_v1", late, tok, tokens_per_image=8, max_length=None)
    out = tokenize_conversation("vicuna_v1", late, tok, tokens_per_image=8, max_length=full_late.input_ids.index(IMG) - 1)
    assert isinstance(out, SkippedSample) and out.reason == SKIP_IMAGE_TRUNCATED


# --------------------------------------------------------------------------------------------
# Malformed conversations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv,has_image,match",
    [
        ([], None, "non-empty"),
        ([{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}], None, "role 'system'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], None, "alternating"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}], None, "ending with gpt"),
        ([{"from": "gpt", "value": "a"}], None, "alternating"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], None, "empty"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], None, "gpt turn"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], True, "no <image>"),
        ([{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "b"}], False, "has no image"),
        ([{"from": "human", "value": "a"}, {"value": "b"}], None, "role None"),
    ],
)
def test_malformed_conversations_raise_naming_the_sample(tok, conv, has_image, match):
    with pytest.raises(DataError, match=match) as info:
        tokenize_conversation("vicuna_v1", conv, tok, tokens_per_image=1, max_length=64, has_image=has_image, sample_id="s-42")
    assert "id='s-42'" in str(info.value)


def test_plain_needs_one_image_and_two_turns(tok):
    with pytest.raises(DataError, match="plain"):
        render("plain", [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A circle."}])
    with pytest.raises(DataError, match="exactly one human and one gpt"):
        render("plain", CONV_IMAGE)


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'llava_v0'"):
        render("llava_v0", CONV_TEXT)
