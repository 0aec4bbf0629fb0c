"""Prompt templates: LLaVA conversations -> token ids, shifted labels and a loss mask.

The three templates CuMo trains with, reproduced from the reference (SHI-Labs/CuMo
``cumo/conversation.py`` + ``cumo/train/train.py``, itself LLaVA's) so that the same conversation
and tokenizer give the same tokens and the same supervised positions:

``plain`` (stage 1, reference ``plain``)
    ``"<image>" + caption + "\\n"``. The human turn's text is dropped, only the image stays.
``vicuna_v1`` (reference ``vicuna_v1`` / ``v1``)
    ``"{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"``.
``mistral_instruct`` (reference ``mistral_instruct_system``, what CuMo's Mistral/Mixtral scripts
use; the reference's ``mistral_instruct`` is the same without a system prompt)
    ``"<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>"``.

How a sample is built (`tokenize_conversation`):

1. `normalize_turns`: roles checked; a first turn from ``gpt`` is dropped (reference); with an image,
   a human turn's single ``<image>`` moves to its front: ``"<image>\\n" + rest.strip()``.
2. `render` gives the reference's prompt string; `reference_tokenize` tokenizes it as the
   reference's ``tokenizer_image_token`` does (one placeholder id per image) and masks it with the
   reference's arithmetic, giving labels aligned with ``input_ids`` (``IGNORE_INDEX`` = -100).
3. Each placeholder becomes ``tokens_per_image`` copies of ``image_token_id`` (labels ignored),
   the sequence is cut to ``max_length`` (never through an image: such a sample is skipped), and
   labels are shifted to this project's convention: ``labels[t]`` is the token expected after
   position ``t``, ``loss_mask[t] = 1`` where it is supervised, ``labels[t] = 0`` where not.

Reference quirks reproduced (each is marked ``QUIRK`` where it happens):

* mistral_instruct: the prompt starts with a literal ``<s>`` and the tokenizer adds a BOS too, so
  sequences start with two BOS ids (CuMo changed LLaVA's ``get_prompt`` this way).
* mistral_instruct: ``" " + answer + " </s>"``: the space before ``</s>`` is a token of its own
  (usually ``▁``) and is supervised together with the answer and ``</s>``.
* vicuna_v1 / mistral_instruct: instruction length is ``len(tokens(instruction + sep)) - 2``
  (BOS and the ``▁`` the trailing space of ``"ASSISTANT: "`` / ``"[/INST] "`` becomes); the round
  length counts its BOS, which stands in for the round's ``</s>``. So ``</s>`` is supervised, the
  system prompt and the role words are not, and when the tokenizer does not split as assumed the
  boundary moves by a token.
* vicuna_v1 with a non-legacy tokenizer: rounds after the first are one token shorter
  (``round_len -= 1; instruction_len -= 1``); mistral_instruct has no such correction.
* A round split that does not add up to the whole sequence masks the whole sample in the
  reference (a "tokenization mismatch" warning); here the sample is skipped and counted.
* An answer or question containing ``</s>``, ``" ASSISTANT: "`` or ``"[/INST] "`` breaks the round
  split the same way (mismatch -> skipped). Literal ``<s>``/``</s>`` in data become special ids.
* plain: the first 2 positions (BOS, image) are masked, the caption and its ``"\\n"`` are
  supervised, there is no ``</s>``.
* Only sentences holding ``<image>`` are stripped of surrounding whitespace.

Deliberate differences, each where the reference would train on a wrong or empty target:

* Mismatch check on every sample (the reference skips it when the rounds reach
  ``model_max_length``) and on the sequence length (the reference counts tokens != pad, pad being
  unk, so text containing ``<unk>`` would be masked out).
* A human turn with several ``<image>`` keeps them in place (the reference collapses them to one).
* Structural problems (unknown role, roles not alternating, a conversation not ending with an answer,
  an empty turn, ``<image>`` in an answer, ``<image>`` count not matching ``has_image``) raise
  `DataError` naming the sample instead of training on a fully masked sample or crashing later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from cumo_megatron.config.schema import IMAGE_TOKEN_ID
from cumo_megatron.data.records import DataError, ProblemKind
from cumo_megatron.data.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "SYSTEM_PROMPT",
    "Template",
    "TEMPLATES",
    "TEMPLATE_ALIASES",
    "get_template",
    "normalize_turns",
    "render",
    "tokenizer_image_token",
    "ReferenceTokens",
    "reference_tokenize",
    "TokenizedSample",
    "SkippedSample",
    "tokenize_conversation",
    "SKIP_MISMATCH",
    "SKIP_NO_SUPERVISION",
    "SKIP_ALL_TRUNCATED",
    "SKIP_IMAGE_TRUNCATED",
]

IGNORE_INDEX = -100  # the reference's "not in the loss" label
IMAGE_TOKEN = "<image>"
_REF_IMAGE_ID = -200  # the reference's placeholder id inside reference_tokenize (IMAGE_TOKEN_INDEX)

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

SKIP_MISMATCH = "tokenization mismatch"
SKIP_NO_SUPERVISION = "no supervised tokens"
SKIP_ALL_TRUNCATED = "all supervised tokens truncated"
SKIP_IMAGE_TRUNCATED = "truncation would cut an image"


@dataclass(frozen=True)
class Template:
    """One conversation format: system prompt, role names, separators and the masking style."""

    name: str
    style: str  # "plain" | "two" (vicuna) | "llama_2" (mistral)
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = ""
    sep2: str = ""
    reference_name: str = ""


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", system="", roles=("", ""), sep="\n", sep2="", reference_name="plain"),
    "vicuna_v1": Template(
        "vicuna_v1", "two", system=SYSTEM_PROMPT, sep=" ", sep2="</s>", reference_name="vicuna_v1"
    ),
    "mistral_instruct": Template(
        "mistral_instruct", "llama_2", system=SYSTEM_PROMPT, sep="", sep2="</s>", reference_name="mistral_instruct_system"
    ),
}

# Reference names that mean the same template (the CuMo scripts pass --version mistral_instruct_system).
TEMPLATE_ALIASES = {"mistral_instruct_system": "mistral_instruct", "v1": "vicuna_v1"}


def get_template(template: Union[str, Template]) -> Template:
    """The `Template` called ``template`` (names of `TEMPLATES` or `TEMPLATE_ALIASES`)."""
    if isinstance(template, Template):
        return template
    name = TEMPLATE_ALIASES.get(template, template)
    if name not in TEMPLATES:
        raise ValueError(
            f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)} "
            f"(reference aliases: {', '.join(TEMPLATE_ALIASES)})"
        )
    return TEMPLATES[name]


# --------------------------------------------------------------------------------------------
# Turns and rendering
# --------------------------------------------------------------------------------------------


def _where(sample_id: Any) -> str:
    return f"sample id={sample_id!r}" if sample_id is not None else "sample (no id)"


def normalize_turns(
    template: Union[str, Template],
    conversations: Sequence[dict],
    has_image: Optional[bool] = None,
    sample_id: Any = None,
) -> tuple[list[tuple[str, str]], bool]:
    """Checked ``[(role, text), ...]`` as the reference feeds them to its template, and ``has_image``.

    ``has_image=None`` means "the sample has an image iff its text holds ``<image>``". Raises
    `DataError` (naming ``sample_id``) for an empty conversation, an unknown role, roles that do
    not alternate human/gpt, a conversation not ending with a gpt turn, an empty turn, ``<image>``
    in a gpt turn, or ``<image>`` present/absent against ``has_image``.
    """
    tpl = get_template(template)
    where = _where(sample_id)
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    turns = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {t} must be an object with a string 'value', got {turn!r}"[:300])
        role = turn.get("from")
        if role not in ("human", "gpt"):
            raise DataError(f"{where}: turn {t} has role {role!r}; LLaVA data uses 'human' and 'gpt'")
        turns.append((role, turn["value"]))
    # QUIRK (preprocess_v1/llama_2): a conversation opening with the assistant loses that turn.
    if turns[0][0] != "human":
        turns = turns[1:]
    roles = [r for r, _ in turns]
    expected = ["human" if t % 2 == 0 else "gpt" for t in range(len(roles))]
    if not turns or roles != expected or roles[-1] != "gpt":
        raise DataError(
            f"{where}: roles are {[r for r, _ in turns] or 'empty'} after dropping a leading gpt turn; "
            "expected human, gpt alternating and ending with gpt"
        )
    if tpl.style == "plain" and len(turns) != 2:
        raise DataError(f"{where}: the plain template takes exactly one human and one gpt turn, got {len(turns)} turns")
    empty = [t for t, (_, text) in enumerate(turns) if not text]
    if empty:
        raise DataError(f"{where}: turn(s) {empty} are empty")
    in_answers = [t for t, (r, text) in enumerate(turns) if r == "gpt" and IMAGE_TOKEN in text]
    if in_answers:
        raise DataError(f"{where}: {IMAGE_TOKEN} appears in gpt turn(s) {in_answers}; images belong to human turns")
    n_images = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if has_image is None:
        has_image = n_images > 0
    if has_image and n_images == 0:
        raise DataError(f"{where}: the sample has an image but no {IMAGE_TOKEN} in its human turns")
    if not has_image and n_images:
        raise DataError(f"{where}: the sample has no image but its text holds {n_images} {IMAGE_TOKEN}")
    if tpl.style == "plain" and (not has_image or n_images != 1):
        raise DataError(
            f"{where}: the plain template (stage-1 captions) needs exactly one image and one {IMAGE_TOKEN}, "
            f"got has_image={has_image} and {n_images} {IMAGE_TOKEN}"
        )
    if has_image:
        # preprocess_multimodal: a sentence holding <image> becomes "<image>\n" + the rest, stripped.
        out = []
        for role, text in turns:
            if text.count(IMAGE_TOKEN) == 1:
                text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
            out.append((role, text))
        turns = out
    return turns, has_image


def _render_turns(tpl: Template, turns: Sequence[tuple[str, str]]) -> str:
    if tpl.style == "plain":
        # preprocess_plain: the human turn is replaced by "<image>" alone; caption + sep ("\n").
        return IMAGE_TOKEN + turns[1][1] + tpl.sep
    if tpl.style == "two":
        seps = (tpl.sep, tpl.sep2)
        out = tpl.system + tpl.sep
        for i, (_, text) in enumerate(turns):
            out += f"{tpl.roles[i % 2]}: {text}{seps[i % 2]}"
        return out
    if tpl.style == "llama_2":
        out = ""
        for i, (_, text) in enumerate(turns):
            if i == 0 and tpl.system:
                text = f"<<SYS>>\n{tpl.system}\n<</SYS>>\n\n" + text
            if i % 2 == 0:
                # QUIRK (CuMo get_prompt): a literal "<s>" opens the prompt; the tokenizer adds a BOS too.
                out += ("<s>" if i == 0 else tpl.sep) + f"[INST] {text} [/INST]"
            else:
                out += f" {text} {tpl.sep2}"
        return out
    raise ValueError(f"template {tpl.name}: unknown style {tpl.style!r}")


def render(
    template: Union[str, Template], conversations: Sequence[dict], has_image: Optional[bool] = None, sample_id: Any = None
) -> str:
    """The reference's prompt string for a LLaVA ``conversations`` list (``<image>`` kept as text)."""
    tpl = get_template(template)
    turns, _ = normalize_turns(tpl, conversations, has_image, sample_id)
    return _render_turns(tpl, turns)


# --------------------------------------------------------------------------------------------
# The reference's tokenization and masking (labels aligned with input_ids, IGNORE_INDEX)
# --------------------------------------------------------------------------------------------


def tokenizer_image_token(prompt: str, tokenizer: Tokenizer, image_token_id: int = _REF_IMAGE_ID) -> list[int]:
    """The reference's ``tokenizer_image_token``: one ``image_token_id`` per ``<image>``.

    Each chunk between ``<image>``s is tokenized on its own, BOS included; when the first chunk starts
    with BOS, one BOS is kept and the first id of *every* chunk (its BOS) is dropped. So text right
    after an image is tokenized as the start of a text (``"\\nWhat"`` -> ``▁``, ``<0x0A>``, ...).
    """
    chunks = [tokenizer.encode(chunk, add_bos=True) for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and tokenizer.bos_id is not None and chunks[0][0] == tokenizer.bos_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids


@dataclass
class ReferenceTokens:
    """The reference's sample: one placeholder per image, labels aligned with ``input_ids``.

    ``mismatch``: the rounds did not add up to the sequence (the reference then masks everything).
    ``rounds_length``: where the round arithmetic ended (``cur_len``), for the mismatch message.
    """

    input_ids: list[int]
    labels: list[int]
    mismatch: bool = False
    rounds_length: int = 0


def _mask(labels: list[int], start: int, stop: int) -> None:
    # torch's target[start:stop] = IGNORE_INDEX: clamped, never growing the list.
    for p in range(max(start, 0), min(stop, len(labels))):
        labels[p] = IGNORE_INDEX


def _mask_rounds(tpl: Template, prompt: str, ids: list[int], tokenizer: Tokenizer) -> ReferenceTokens:
    """``preprocess_v1`` / ``preprocess_llama_2`` masking, on the rendered prompt."""
    labels = list(ids)
    # The instruction of each round ends with this separator; the answer follows it.
    sep = tpl.sep + tpl.roles[1] + ": " if tpl.style == "two" else "[/INST] "
    cur = 1
    _mask(labels, 0, cur)  # BOS
    for i, rou in enumerate(prompt.split(tpl.sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        instruction = parts[0] + sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        # QUIRK: "- 2" = the BOS of the separate tokenization + the lone "▁" that the trailing space
        # of the separator becomes when nothing follows it.
        instruction_len = len(tokenizer_image_token(instruction, tokenizer)) - 2
        if tpl.style == "two" and i != 0 and not tokenizer.legacy:
            # QUIRK (preprocess_v1, tokenizers >= 0.14, legacy=False): after "</s>" a round has no
            # leading "▁", one token fewer than when tokenized alone. preprocess_llama_2 lacks this.
            round_len -= 1
            instruction_len -= 1
        _mask(labels, cur, cur + instruction_len)
        # round_len counts the round's own BOS, which stands in for the "</s>" that ends it.
        cur += round_len
    _mask(labels, cur, len(labels))
    mismatch = cur != len(ids)
    if mismatch:
        labels = [IGNORE_INDEX] * len(ids)
    return ReferenceTokens(ids, labels, mismatch, cur)


def reference_tokenize(
    template: Union[str, Template],
    conversations: Sequence[dict],
    tokenizer: Tokenizer,
    has_image: Optional[bool] = None,
    sample_id: Any = None,
) -> ReferenceTokens:
    """What the reference's ``preprocess`` returns for one sample (before the model expands images)."""
    tpl = get_template(template)
    turns, has_image = normalize_turns(tpl, conversations, has_image, sample_id)
    prompt = _render_turns(tpl, turns)
    # Text-only samples go through tokenizer(prompt) in the reference: the same ids, as a prompt
    # without "<image>" is a single chunk.
    ids = tokenizer_image_token(prompt, tokenizer)
    if tpl.style == "plain":
        labels = list(ids)
        # preprocess_plain: mask len(tokenizer_image_token("<image>")) = BOS + image.
        _mask(labels, 0, len(tokenizer_image_token(IMAGE_TOKEN, tokenizer)))
        return ReferenceTokens(ids, labels, False, len(ids))
    return _mask_rounds(tpl, prompt, ids, tokenizer)


# --------------------------------------------------------------------------------------------
# This project's sample: images expanded, truncated, labels shifted
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedSample:
    """One training sample, all lists of the same length ``<= max_length``.

    ``input_ids``: token ids with each image as ``tokens_per_image`` copies of the placeholder id.
    ``labels[t]``: the token expected after position ``t`` (0 where not supervised).
    ``loss_mask[t]``: 1 where ``labels[t]`` is in the loss. ``truncated``: the sample was cut to
    ``max_length`` (some supervision survived). ``supervised_tokens = sum(loss_mask)``.
    """

    input_ids: list[int]
    labels: list[int]
    loss_mask: list[int]
    num_images: int
    truncated: bool
    supervised_tokens: int


@dataclass
class SkippedSample:
    """A sample that must not be trained on: ``reason`` (one of the ``SKIP_*``), ``kind`` (a
    `ProblemKind` key for counting), ``detail`` (numbers for the log)."""

    reason: str
    kind: str
    detail: str = ""

    def __bool__(self) -> bool:  # so `if not result:` treats a skip like None
        return False


def tokenize_conversation(
    template: Union[str, Template],
    conversations: Sequence[dict],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    max_length: Optional[int],
    image_token_id: int = IMAGE_TOKEN_ID,
    *,
    has_image: Optional[bool] = None,
    sample_id: Any = None,
) -> Union[TokenizedSample, SkippedSample]:
    """Tokenize one LLaVA conversation for training (see the module docstring).

    Returns a `TokenizedSample`, or a `SkippedSample` (falsy) when the sample has nothing to train
    on: ``SKIP_MISMATCH`` (the reference would have masked it all), ``SKIP_NO_SUPERVISION``,
    ``SKIP_IMAGE_TRUNCATED`` (``max_length`` falls inside or before an image's placeholders),
    ``SKIP_ALL_TRUNCATED`` (every supervised token lies beyond ``max_length``). ``max_length=None``
    keeps the whole sample (for validators that need the true length). Raises `DataError`
    for malformed conversations (see `normalize_turns`).
    """
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (or None: no truncation), got {max_length}")
    ref = reference_tokenize(template, conversations, tokenizer, has_image, sample_id)
    if ref.mismatch:
        return SkippedSample(
            SKIP_MISMATCH,
            ProblemKind.TOKENIZE_FAILED,
            f"{_where(sample_id)}: the rounds tokenize to {ref.rounds_length} tokens, the conversation to "
            f"{len(ref.input_ids)} (a separator or </s> inside a message, or a tokenizer splitting differently "
            "from the template's assumptions)",
        )

    # The reference's model replaces each placeholder by the image's features, all ignored in the loss.
    ids: list[int] = []
    full_labels: list[int] = []
    image_spans: list[tuple[int, int]] = []
    for tok, lab in zip(ref.input_ids, ref.labels):
        if tok == _REF_IMAGE_ID:
            image_spans.append((len(ids), len(ids) + tokens_per_image))
            ids.extend([image_token_id] * tokens_per_image)
            full_labels.extend([IGNORE_INDEX] * tokens_per_image)
        else:
            ids.append(tok)
            full_labels.append(lab)
    if all(lab == IGNORE_INDEX for lab in full_labels[1:]):
        return SkippedSample(SKIP_NO_SUPERVISION, ProblemKind.NO_SUPERVISION, f"{_where(sample_id)}: nothing to predict")

    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        cut = [k for k, (start, stop) in enumerate(image_spans) if stop > max_length]
        if cut:
            start, stop = image_spans[cut[0]]
            return SkippedSample(
                SKIP_IMAGE_TRUNCATED,
                ProblemKind.TOO_LONG,
                f"{_where(sample_id)}: {len(ids)} tokens, max_length {max_length} falls before the end of "
                f"image {cut[0]} (positions {start}..{stop - 1})",
            )
        ids = ids[:max_length]
        full_labels = full_labels[:max_length]

    # Shift: the reference's loss compares logits[t] with labels[t + 1].
    next_labels = full_labels[1:] + [IGNORE_INDEX]
    loss_mask = [0 if lab == IGNORE_INDEX else 1 for lab in next_labels]
    labels = [lab if m else 0 for lab, m in zip(next_labels, loss_mask)]
    supervised = sum(loss_mask)
    if supervised == 0:
        return SkippedSample(
            SKIP_ALL_TRUNCATED,
            ProblemKind.NO_SUPERVISION,
            f"{_where(sample_id)}: every supervised token lies beyond max_length {max_length}",
        )
    return TokenizedSample(ids, labels, loss_mask, len(image_spans), truncated, supervised)
