"""A tokenizer smaller than the model's vocabulary (a padded embedding table) is handled: generation
never picks an id the tokenizer lacks. One larger than the vocabulary is refused with a message
naming ``--tokenizer``."""

from __future__ import annotations

import pytest
import torch

from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.data.tokenizer import load_tokenizer
from cumo_megatron.inference.generation import forward_last_logits, generate
from cumo_megatron.inference.prompts import generation_prompt, prompt_input_ids
from cumo_megatron.inference.session import InferenceSession
from tests.fixtures.tiny_models import tiny_sentencepiece
from tests.inference.conftest import load_release_model

SMALL = 304  # tokenizer ids (sentencepiece needs >= 301 here); the tiny model's vocabulary is 320


@pytest.fixture(scope="module")
def padded(release_factory, tmp_path_factory):
    """The tiny Mixtral release's model with its 16 padding rows (ids 304..319) made the likeliest
    first answer token, and a 304-piece tokenizer."""
    release = release_factory("mixtral")
    model, cfg = load_release_model(release.path)
    tokenizer = load_tokenizer(tiny_sentencepiece(tmp_path_factory.mktemp("small-tok"), vocab_size=SMALL))
    assert tokenizer.vocab_size == SMALL < cfg.language.vocab_size
    prompt = generation_prompt("mistral_instruct", "Say hi.", has_image=False)
    ids = torch.tensor([prompt_input_ids(prompt, tokenizer, cfg.vision.tokens_per_image, cfg.image_token_id)])
    with torch.no_grad():
        logits = forward_last_logits(model, ids, None)[0]
        best = int(logits.argmax())
        weight = model.language_model.output_layer.weight
        # Padding rows: the best row scaled up (sign kept), so without a limit they win.
        weight[SMALL:] = weight[best] * (4.0 if logits[best] > 0 else -4.0)
    return model, cfg, tokenizer, ids


def test_generation_is_limited_to_the_tokenizer_ids(padded):
    model, cfg, tokenizer, ids = padded
    logits = forward_last_logits(model, ids, None)[0]
    unlimited = generate(model, ids, max_new_tokens=1)
    assert int(unlimited[0, 0]) >= SMALL  # the failure this guards against: an id the tokenizer lacks
    with pytest.raises(ValueError, match="this tokenizer has ids 0..303 only"):
        tokenizer.decode(unlimited[0].tolist())
    limited = generate(model, ids, max_new_tokens=1, vocab_limit=SMALL)
    assert int(limited[0, 0]) == int(logits[:SMALL].argmax())  # the best id the tokenizer has


def test_session_with_a_smaller_tokenizer_answers(padded):
    model, cfg, tokenizer, _ = padded
    session = InferenceSession(model, cfg, tokenizer)
    assert session.vocab_limit == SMALL
    # Unlimited, the first token would be a padding id and decoding the answer would fail.
    for temperature in (0.0, 1.0):
        answer = session.answer("Say hi.", max_new_tokens=8, temperature=temperature, seed=3)
        assert answer.tokens and max(answer.tokens) < SMALL


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(release_factory, tmp_path):
    release = release_factory("mixtral")
    model, cfg = load_release_model(release.path)
    big = load_tokenizer(tiny_sentencepiece(tmp_path, vocab_size=400))
    with pytest.raises(CheckpointError, match=r"has 400 ids but the model's vocabulary has 320 .*--tokenizer"):
        InferenceSession(model, cfg, big)
