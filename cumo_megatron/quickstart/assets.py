"""Tiny, learnable assets for the quickstart: a shapes dataset, a tokenizer, a tiny CLIP and LLaMA.

Everything is generated locally and seeded (no network, no downloaded weights):

* `make_shapes_dataset`: PNGs of one coloured shape (4 colours x 4 shapes, roughly centred with
  jitter in size, position, shade and background) and LLaVA JSON files: ``stage1_captions.json`` (``plain``
  captions ``"a red circle"``), ``stage2.json`` / ``stage3.json`` (vicuna_v1 conversations asking the
  colour and the shape, single-word answers) and ``eval.json`` (held-out images, one question each,
  the expected answer as the gpt turn, plus ``"type"``: ``colour`` / ``shape``), and two benchmark
  splits of the same held-out images in LLaVA's evaluation formats (`benchmark_splits`): a
  POPE-style yes/no split and a ScienceQA-style multiple-choice split. With ``benchmark_turns``
  the stage-2/3 conversations also ask one of those two kinds of question (the quickstart does; the
  research tools keep the original two-question conversations).
* `train_tokenizer`: a LLaMA-style sentencepiece BPE model (``<unk>``=0, ``<s>``=1, ``</s>``=2)
  trained on the dataset's text and the vicuna system prompt.
* `make_tiny_models`: a tiny HF ``CLIPVisionModel`` (quick_gelu, + ``preprocessor_config.json``),
  briefly pre-trained on the training images as CLIP stands pre-trained in CuMo (`pretrain_vision`),
  and a tiny random HF ``LlamaForCausalLM``, in the layouts ``tools/upcycle_checkpoint.py`` reads.

The sizes live in `TINY`; the quickstart YAML configs (``examples/configs/quickstart``) must agree
with them (`model_overrides` gives the matching dotted overrides).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Iterable

__all__ = [
    "COLOURS",
    "SHAPES",
    "QUESTIONS",
    "TINY",
    "draw_shape",
    "make_shapes_dataset",
    "benchmark_splits",
    "yes_no_question",
    "choice_question",
    "dataset_corpus",
    "train_tokenizer",
    "make_tiny_models",
    "model_overrides",
]

# Colours far apart in RGB so that a 28-px image with 14-px patches (one per quadrant) separates them easily.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 215, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
}
# The benchmark-style questions, with LLaVA-1.5's instructions (the scorers' registry holds them).
YES_NO = {
    "colour": "Is there a {} shape in the image?",
    "shape": "Is there a {} in the image?",
}
OPTION_LETTERS = ("A", "B", "C", "D")
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Model sizes of the quickstart (small enough for 2 CPU cores, big enough to learn the task).
TINY = {
    "image_size": 28,
    "patch_size": 14,
    "vision_hidden": 64,
    "vision_layers": 3,
    "vision_heads": 4,
    "vision_ffn": 128,
    "lm_hidden": 64,
    "lm_layers": 2,
    "lm_heads": 4,
    "lm_kv_heads": 2,
    "lm_ffn": 128,
    "max_positions": 256,
}


def draw_shape(size: int, colour: str, shape: str, rng: random.Random):
    """A ``size`` x ``size`` RGB PIL image with one ``shape`` filled in ``colour`` on a light background."""
    from PIL import Image, ImageDraw

    grey = rng.randint(200, 245)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    # Roughly centred, a little jitter in size and position: the shape stays in the same patches,
    # so a tiny ViT trained from scratch for a few hundred steps can tell the shapes apart.
    side = rng.randint(size * 65 // 100, size * 80 // 100)
    jitter = max(1, size // 14)
    x0 = min(max(0, (size - side) // 2 + rng.randint(-jitter, jitter)), size - side)
    y0 = min(max(0, (size - side) // 2 + rng.randint(-jitter, jitter)), size - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    elif shape == "cross":
        w = max(2, side // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([cx - w // 2, y0, cx - w // 2 + w - 1, y1], fill=fill)
        draw.rectangle([x0, cy - w // 2, x1, cy - w // 2 + w - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return img


def _human(question: str, with_image: bool) -> dict:
    return {"from": "human", "value": ("<image>\n" + question) if with_image else question}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def make_shapes_dataset(out_dir, n_train: int = 1600, n_eval: int = 100, image_size: int = 28, seed: int = 0,
                        benchmark_turns: bool = False) -> dict:
    """Write the shapes dataset under ``out_dir``; returns ``{name: path}`` of the JSON files.

    ``out_dir/images/{train,eval}_NNNNN.png``; classes are balanced (cycled) and shuffled, train and
    eval images come from disjoint random draws. ``eval.json`` has ``2 * n_eval`` records (both
    question types per held-out image). Image paths in the JSON files are relative to ``out_dir``.
    The benchmark splits of the held-out images (`benchmark_splits`) are written too; with
    ``benchmark_turns`` each stage-2/3 conversation also asks a yes/no or a multiple-choice
    question (one of the two, at random). Both draw from their own generators, so images and the original turns do not change.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]

    def draw_split(split: str, n: int) -> list[tuple[str, str, str]]:
        labels = [classes[i % len(classes)] for i in range(n)]
        rng.shuffle(labels)
        items = []
        for i, (colour, shape) in enumerate(labels):
            name = f"images/{split}_{i:05d}.png"
            draw_shape(image_size, colour, shape, rng).save(out / name)
            items.append((name, colour, shape))
        return items

    train = draw_split("train", n_train)
    held_out = draw_split("eval", n_eval)

    stage1 = [
        {"id": f"cap{i}", "image": name,
         "conversations": [_human("Describe the image.", True), {"from": "gpt", "value": f"a {colour} {shape}"}]}
        for i, (name, colour, shape) in enumerate(train)
    ]
    answers = lambda colour, shape: {"colour": colour, "shape": shape}  # noqa: E731

    def chat(i: int, name: str, colour: str, shape: str) -> dict:
        kinds = list(QUESTIONS)
        rng.shuffle(kinds)  # both orders, so neither answer depends on the turn position
        turns = []
        for j, kind in enumerate(kinds):
            turns.append(_human(QUESTIONS[kind], j == 0))
            turns.append({"from": "gpt", "value": answers(colour, shape)[kind]})
        return {"id": f"qa{i}", "image": name, "conversations": turns}

    stage2 = [chat(i, *item) for i, item in enumerate(train)]
    stage3 = [chat(i, *item) for i, item in enumerate(train)]
    if benchmark_turns:
        extra = random.Random(seed + 1)
        for records in (stage2, stage3):
            for rec, (_, colour, shape) in zip(records, train):
                rec["conversations"] = _insert_turns(rec["conversations"], _benchmark_turns(colour, shape, extra), extra)
    evaluation = []
    for i, (name, colour, shape) in enumerate(held_out):
        for kind in QUESTIONS:
            evaluation.append({
                "id": f"eval{i}_{kind}", "image": name, "type": kind,
                "conversations": [_human(QUESTIONS[kind], True),
                                  {"from": "gpt", "value": answers(colour, shape)[kind]}],
            })
    files = {}
    for fname, records in (("stage1_captions.json", stage1), ("stage2.json", stage2),
                           ("stage3.json", stage3), ("eval.json", evaluation)):
        _write_json(out / fname, records)
        files[fname] = out / fname
    files.update(benchmark_splits(out, held_out, seed))
    return files


def _suffixes() -> tuple[str, str]:
    """LLaVA-1.5's short-answer and option-letter instructions, from the scorers' registry."""
    from cumo_megatron.evaluation.scoring.registry import OPTION_LETTER, SHORT_ANSWER

    return SHORT_ANSWER, OPTION_LETTER


def yes_no_question(kind: str, value: str) -> str:
    """The POPE-style question whether the image holds a shape of colour / kind ``value`` (no instruction)."""
    return YES_NO[kind].format(value)


def choice_question(kind: str, options) -> str:
    """The multiple-choice question about ``kind`` with lettered ``options`` (ScienceQA's layout, no instruction)."""
    return QUESTIONS[kind] + "".join(f"\n{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))


def _values(kind: str) -> list[str]:
    return list(COLOURS) if kind == "colour" else list(SHAPES)


def _benchmark_turns(colour: str, shape: str, rng: random.Random) -> list[dict]:
    """A yes/no or a multiple-choice exchange about a training image (asked after the image turn)."""
    short, letter = _suffixes()
    truth = {"colour": colour, "shape": shape}
    yn_kind = rng.choice(list(YES_NO))
    says_yes = rng.random() < 0.5
    value = truth[yn_kind] if says_yes else rng.choice([v for v in _values(yn_kind) if v != truth[yn_kind]])
    mc_kind = rng.choice(list(QUESTIONS))
    options = _values(mc_kind)
    rng.shuffle(options)
    answer = OPTION_LETTERS[options.index(truth[mc_kind])]
    if rng.random() < 0.5:  # one of the two per conversation: both would pass data.max_length (128)
        return [_human(yes_no_question(yn_kind, value) + "\n" + short, False),
                {"from": "gpt", "value": "Yes" if says_yes else "No"}]
    return [_human(choice_question(mc_kind, options) + "\n" + letter, False), {"from": "gpt", "value": answer}]


def _insert_turns(turns: list[dict], pair: list[dict], rng: random.Random) -> list[dict]:
    """``turns`` with the exchange ``pair`` at a random position (first included: the benchmarks ask
    it as the first question), ``<image>`` kept in the first human turn."""
    plain = [dict(t, value=t["value"].replace("<image>\n", "")) for t in turns]
    at = 2 * rng.randint(0, len(turns) // 2)
    out = plain[:at] + pair + plain[at:]
    out[0] = _human(out[0]["value"], True)
    return out


def benchmark_splits(out_dir, held_out, seed: int = 0) -> dict:
    """The held-out images as two benchmarks in LLaVA's evaluation formats, under ``out_dir``.

    ``held_out``: ``(image, colour, shape)`` triples. Written:

    * ``pope/llava_pope_test.jsonl``: per image and per category (``colour``, ``shape``) one
      question whose answer is yes and one whose is no ("Is there a red shape in the image?"),
      LLaVA's short-answer instruction appended; ``pope/coco_pope_<category>.json``: POPE's
      annotation lines ``{question_id, image, text, label}``.
    * ``mc/llava_test_CQM-A.json``: per image a colour and a shape question with the four options
      in a shuffled order (LLaVA's ScienceQA conversations); ``mc/problems.json``: ScienceQA's
      problems (``choices``, ``answer`` index, ``image``, ``split``).

    Image paths are relative to ``out_dir``. Returns ``{name: path}``.
    """
    out = Path(out_dir)
    rng = random.Random(seed + 2)
    short, _ = _suffixes()
    pope, labels, conversations, problems = [], {kind: [] for kind in YES_NO}, [], {}
    for i, (image, colour, shape) in enumerate(held_out):
        truth = {"colour": colour, "shape": shape}
        for kind in YES_NO:
            other = rng.choice([v for v in _values(kind) if v != truth[kind]])
            pairs = [(truth[kind], "yes"), (other, "no")]
            rng.shuffle(pairs)
            for value, label in pairs:
                qid = len(pope)
                text = yes_no_question(kind, value)
                pope.append({"question_id": qid, "image": image, "text": text + "\n" + short, "category": kind})
                labels[kind].append({"question_id": qid, "image": image, "text": text, "label": label})
        for kind in QUESTIONS:
            options = _values(kind)
            rng.shuffle(options)
            pid = f"{i}_{kind}"
            answer = options.index(truth[kind])
            conversations.append({"id": pid, "image": image, "conversations": [
                _human(choice_question(kind, options), True), {"from": "gpt", "value": OPTION_LETTERS[answer]}]})
            problems[pid] = {"question": QUESTIONS[kind], "choices": options, "answer": answer, "image": image,
                             "split": "test", "hint": ""}
    (out / "pope").mkdir(parents=True, exist_ok=True)
    (out / "mc").mkdir(parents=True, exist_ok=True)
    files = {"pope/llava_pope_test.jsonl": out / "pope" / "llava_pope_test.jsonl"}
    files["pope/llava_pope_test.jsonl"].write_text("".join(json.dumps(q) + "\n" for q in pope))
    for kind, rows in labels.items():
        path = out / "pope" / f"coco_pope_{kind}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[f"pope/coco_pope_{kind}.json"] = path
    for name, obj in (("mc/llava_test_CQM-A.json", conversations), ("mc/problems.json", problems)):
        _write_json(out / name, obj)
        files[name] = out / name
    return files


def dataset_corpus(repeat: int = 20, benchmark_turns: bool = False) -> list[str]:
    """Every text the templates produce from the dataset (for tokenizer training), ``repeat`` times;
    with ``benchmark_turns`` the yes/no and multiple-choice questions' texts too."""
    from cumo_megatron.data.templates import SYSTEM_PROMPT

    lines = [SYSTEM_PROMPT, "USER: ASSISTANT:", "Describe the image."]
    lines += list(QUESTIONS.values())
    lines += [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    lines += [f"ASSISTANT: {c} USER: {q} ASSISTANT: {s}" for c in COLOURS for s in SHAPES for q in QUESTIONS.values()]
    if benchmark_turns:
        short, letter = _suffixes()
        lines += [short, letter, "ASSISTANT: Yes", "ASSISTANT: No"] + [f"ASSISTANT: {x}" for x in OPTION_LETTERS]
        lines += [yes_no_question(kind, v) for kind in YES_NO for v in _values(kind)]
        lines += [choice_question(kind, _values(kind)) for kind in QUESTIONS]
    return lines * repeat


def train_tokenizer(
    out_dir,
    corpus: Iterable[str],
    vocab_size: int = 320,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    hard_vocab_limit: bool = False,
) -> Path:
    """Train a LLaMA-style sentencepiece model on ``corpus``; write ``out_dir/tokenizer.model``.

    ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad; with ``byte_fallback`` the byte pieces are ids
    3..258, so ``vocab_size`` must exceed 259 plus the corpus' characters. Without
    ``hard_vocab_limit`` a small corpus may give a smaller vocabulary (read it from the model).
    Returns the path of ``tokenizer.model``.
    """
    import sentencepiece as spm

    if byte_fallback and vocab_size <= 259:
        raise ValueError(f"vocab_size={vocab_size}: byte fallback needs more than 259 ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        hard_vocab_limit=hard_vocab_limit,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path = out / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def _write_preprocessor_config(directory: Path, image_size: int) -> None:
    _write_json(directory / "preprocessor_config.json", {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_IMAGE_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_IMAGE_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    })


def _load_captioned_images(dataset_dir: Path, image_size: int):
    """Images of ``stage1_captions.json`` (CLIP-normalised ``[N, 3, S, S]``) and class ids (colour x shape)."""
    import torch
    from PIL import Image

    records = json.loads((dataset_dir / "stage1_captions.json").read_text())
    classes = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(3, 1, 1)
    images, labels = [], []
    for rec in records:
        img = Image.open(dataset_dir / rec["image"]).convert("RGB").resize((image_size, image_size))
        x = torch.tensor(list(img.getdata()), dtype=torch.float32).view(image_size, image_size, 3).permute(2, 0, 1)
        images.append((x / 255.0 - mean) / std)
        labels.append(classes.index(rec["conversations"][1]["value"]))
    return torch.stack(images), torch.tensor(labels), len(classes)


def pretrain_vision(clip, dataset_dir, steps: int = 150, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Stand-in for CLIP's pre-training: teach ``clip`` the training images' classes (colour x shape).

    CuMo starts from a pre-trained CLIP; a randomly initialised tower would leave stages 1-3 to
    discover shapes through a language-model loss, which a tiny model does not manage in minutes.
    A temporary linear head reads the *mean* of the penultimate layer's patch tokens (the features
    the connector gets), so every token learns to carry the class. Only ``stage1_captions.json``
    (training split) is used. Returns the training accuracy of the last 10 steps.
    """
    import torch

    images, labels, n_classes = _load_captioned_images(Path(dataset_dir), clip.config.image_size)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(clip.config.hidden_size, n_classes)
    opt = torch.optim.AdamW(list(clip.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    clip.train()
    hits = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        feats = clip(pixel_values=images[idx], output_hidden_states=True).hidden_states[-2][:, 1:]
        logits = head(feats.mean(dim=1))
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.append((logits.argmax(-1) == labels[idx]).float().mean().item())
    clip.eval()
    return sum(hits[-10:]) / len(hits[-10:])


def quiet_transformers() -> None:
    """Keep ``transformers``' info logs and progress bars out of the tools' output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def new_tiny_clip(*, hidden_size: int, ffn_hidden_size: int, num_layers: int, num_heads: int, image_size: int,
                  patch_size: int, seed: int = 0):
    """A seeded random HF ``CLIPVisionModel`` (quick-GELU, OpenAI CLIP's settings) in eval mode."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=ffn_hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size, num_channels=3,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=hidden_size, attention_dropout=0.0,
    )).eval()


def new_tiny_llama(*, vocab_size: int, hidden_size: int, ffn_hidden_size: int, num_layers: int, num_heads: int,
                   num_kv_heads: int, max_position_embeddings: int, seed: int = 0):
    """A seeded random fp32 HF ``LlamaForCausalLM`` (untied embeddings, BOS 1 / EOS 2) in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn_hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )).to(torch.float32).eval()


def make_tiny_models(out_dir, vocab_size: int, seed: int = 0, dataset_dir=None) -> dict:
    """Save a tiny HF ``CLIPVisionModel`` (``out_dir/clip``) and ``LlamaForCausalLM`` (``out_dir/llm``).

    Seeded random initialisation, sizes from `TINY`; with ``dataset_dir`` (a `make_shapes_dataset`
    output) the vision tower is first pre-trained on its training images (`pretrain_vision`).
    Returns ``{"clip": path, "llm": path, "clip_pretrain_accuracy": float or None}``.
    """
    quiet_transformers()
    out = Path(out_dir)
    clip_dir, llm_dir = out / "clip", out / "llm"
    t = TINY
    clip = new_tiny_clip(hidden_size=t["vision_hidden"], ffn_hidden_size=t["vision_ffn"], num_layers=t["vision_layers"],
                         num_heads=t["vision_heads"], image_size=t["image_size"], patch_size=t["patch_size"], seed=seed)
    accuracy = pretrain_vision(clip, dataset_dir, seed=seed) if dataset_dir is not None else None
    clip.save_pretrained(clip_dir)
    _write_preprocessor_config(clip_dir, t["image_size"])
    llm = new_tiny_llama(vocab_size=vocab_size, hidden_size=t["lm_hidden"], ffn_hidden_size=t["lm_ffn"],
                         num_layers=t["lm_layers"], num_heads=t["lm_heads"], num_kv_heads=t["lm_kv_heads"],
                         max_position_embeddings=t["max_positions"], seed=seed + 1)
    llm.save_pretrained(llm_dir)
    return {"clip": clip_dir, "llm": llm_dir, "clip_pretrain_accuracy": accuracy}


def model_overrides(vocab_size: int) -> list[str]:
    """Dotted config overrides that make a config's model match `make_tiny_models` (``vocab_size``)."""
    t = TINY
    return [
        f"model.vision.hidden_size={t['vision_hidden']}",
        f"model.vision.num_layers={t['vision_layers']}",
        f"model.vision.num_heads={t['vision_heads']}",
        f"model.vision.ffn_hidden_size={t['vision_ffn']}",
        f"model.vision.image_size={t['image_size']}",
        f"model.vision.patch_size={t['patch_size']}",
        f"model.language.vocab_size={vocab_size}",
        f"model.language.hidden_size={t['lm_hidden']}",
        f"model.language.num_layers={t['lm_layers']}",
        f"model.language.num_heads={t['lm_heads']}",
        f"model.language.num_kv_heads={t['lm_kv_heads']}",
        f"model.language.ffn_hidden_size={t['lm_ffn']}",
        f"model.language.max_position_embeddings={t['max_positions']}",
    ]
