"""lmms-eval model ``cumo_megatron``: run any lmms-eval image task on a CuMo checkpoint.

    pip install -e ".[eval]"
    lmms-eval --model cumo_megatron --model_args load=CKPT --tasks TASK --batch_size 8 --output_path OUT

``model_args``: ``load`` (our checkpoint directory or an original CuMo release, as
``python -m cumo_megatron.generate --load``), and optionally ``tokenizer`` (default:
``tokenizer.model`` in or beside ``load``), ``template`` (default: the template of the checkpoint's
LLM family, as in generation), ``aspect`` (``pad`` | ``crop``), ``seed`` (sampling only).

lmms-eval finds the class through its entry-point group ``lmms_eval.models`` (setup.py names
`manifest`), so nothing is registered by hand and the package is not imported until a run asks
for ``cumo_megatron``.

The work is done by `CuMoEvaluator`, which knows nothing of lmms-eval (so it is tested without
it): prompts as our generation builds them (the question with ``<image>`` placeholders in the
checkpoint's template), greedy left-padded batched generation cut at the task's stop strings, and
log-likelihoods of continuations from one right-padded forward pass. `CuMoMegatron` is the thin
lmms-eval wrapper, defined only when lmms-eval can be imported: it unpacks lmms-eval's requests
(context, generation kwargs or continuation, the doc's visuals) and hands them over.

One process (TP = PP = 1): lmms-eval shards documents over ``RANK``/``WORLD_SIZE`` itself, which
would hand different documents to the ranks of one tensor-parallel model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger(__name__)

MODEL_ID = "cumo_megatron"
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class GenerationSettings:
    """What a task's ``generation_kwargs`` ask for, in our terms."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    until: tuple[str, ...] = ()
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: Optional[dict]) -> "GenerationSettings":
        """Read lmms-eval's ``generation_kwargs``: ``until`` (a string or a list), ``max_new_tokens``,
        ``temperature``/``top_p``/``do_sample`` (sampling only when ``do_sample`` and a temperature > 0,
        as HF generate does); other keys (``num_beams``, ``image_aspect_ratio``...) are ignored."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        temperature = float(kw.get("temperature") or 0.0)
        sample = bool(kw.get("do_sample", False)) and temperature > 0
        return cls(max_new_tokens=max_new, until=until, temperature=temperature if sample else 0.0,
                   top_p=float(kw.get("top_p") or 1.0) if sample else 1.0)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (lmms-eval's ``until``), stripped."""
        for stop in self.until:
            if stop:
                text = text.split(stop, 1)[0]
        return text.strip()


def question_with_images(context: str, n_images: int) -> str:
    """The question with one ``<image>`` per image: kept as written when the context already places
    them, else put first, space-separated, then a newline (as LLaVA's lmms-eval model does)."""
    from cumo_megatron.data.templates import IMAGE_TOKEN

    if n_images == 0 or IMAGE_TOKEN in context:
        return context
    return " ".join([IMAGE_TOKEN] * n_images) + "\n" + context


def _as_images(visuals) -> list:
    """The PIL images of a doc's visuals (None and nested lists allowed); anything else is refused."""
    from PIL import Image

    out: list = []
    stack = [visuals]
    while stack:
        item = stack.pop(0)
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            stack[:0] = list(item)
        elif isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
        else:
            raise ValueError(f"{MODEL_ID} takes images only; the task gave a visual of type {type(item).__name__} "
                             "(video and audio tasks are not supported)")
    return out


@dataclass
class _Prepared:
    """One request as the model sees it: its prompt ids (images as placeholders) and pixels."""

    prompt: str
    ids: list[int]
    pixels: Optional[torch.Tensor]  # [n_images, 3, H, W] or None


class CuMoEvaluator:
    """lmms-eval's two request kinds on top of an `InferenceSession` (no lmms-eval import):
    `generate` (batched greedy answers cut at stop strings) and `loglikelihood` (log p of a
    continuation after the prompt, and whether greedy decoding would produce it)."""

    def __init__(self, session, batch_size: int = 1, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.session = session
        self.batch_size = batch_size
        self.seed = seed

    @classmethod
    def load(cls, load: str | Path, tokenizer: Optional[str] = None, template: Optional[str] = None,
             aspect: str = "pad", batch_size: int = 1, seed: int = 0) -> "CuMoEvaluator":
        """Bring up a world of one, load the checkpoint (eval mode, on the GPU when there is one)
        and its tokenizer."""
        import cumo_megatron.platform as platform
        from cumo_megatron.data.tokenizer import load_tokenizer
        from cumo_megatron.inference.session import InferenceSession, default_tokenizer_path, load_model

        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ValueError(f"{MODEL_ID} runs in one process (lmms-eval splits documents over ranks, so a "
                             "tensor-parallel model cannot be shared); launch it without torchrun/accelerate")
        platform.initialize(platform.ParallelSizes(), seed=seed)
        model, cfg = load_model(load)
        tok = load_tokenizer(tokenizer or default_tokenizer_path(load))
        session = InferenceSession(model, cfg, tok, template=template, aspect=aspect)
        log.info("%s: loaded %s (template %s)", MODEL_ID, load, session.template)
        return cls(session, batch_size=batch_size, seed=seed)

    # -- prompts -----------------------------------------------------------------------------------

    def prepare(self, context: str, images: Sequence) -> _Prepared:
        """The templated prompt of ``context`` about PIL ``images``, its ids and its pixels."""
        from cumo_megatron.inference.prompts import generation_prompt, prompt_input_ids

        s = self.session
        prompt = generation_prompt(s.template, question_with_images(context, len(images)), has_image=len(images) > 0)
        ids = prompt_input_ids(prompt, s.tokenizer, s.cfg.vision.tokens_per_image, s.cfg.image_token_id)
        n_placeholders = sum(1 for i in ids if i == s.cfg.image_token_id) // s.cfg.vision.tokens_per_image
        if n_placeholders != len(images):
            raise ValueError(f"the prompt holds {n_placeholders} <image> but the doc has {len(images)} image(s): "
                             f"{context[:80]!r}")
        pixels = torch.stack([s.processor(img) for img in images]) if images else None
        return _Prepared(prompt, ids, pixels)

    def continuation_ids(self, prepared: _Prepared, continuation: str) -> tuple[list[int], int]:
        """(ids of prompt + continuation, where the continuation starts). Tokenised as one text, as
        lm-eval-harness does, so a token spanning the boundary is not split; lmms-eval puts the word
        boundary (``target_delimiter``, a space) at the start of the continuation."""
        from cumo_megatron.inference.prompts import prompt_input_ids

        s = self.session
        whole = prompt_input_ids(prepared.prompt + continuation, s.tokenizer, s.cfg.vision.tokens_per_image,
                                 s.cfg.image_token_id)
        return whole, min(len(prepared.ids), len(whole))

    # -- the two request kinds ---------------------------------------------------------------------

    def _device_pixels(self, pixels: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """The rows' images in row order on the model's device and dtype (None: no images at all)."""
        present = [p for p in pixels if p is not None]
        if not present:
            return None
        param = next(self.session.model.parameters())
        return torch.cat(present).to(device=param.device, dtype=param.dtype)

    def generate(self, items: Sequence[tuple[str, Sequence]], settings: GenerationSettings) -> list[str]:
        """Answers to ``(context, PIL images)`` items, ``batch_size`` at a time (left-padded: greedy
        answers are each item's answer alone), cut at ``settings.until``."""
        from cumo_megatron.inference.generation import generate, left_pad, strip_after_eos

        s = self.session
        out: list[str] = []
        for start in range(0, len(items), self.batch_size):
            prepared = [self.prepare(ctx, images) for ctx, images in items[start:start + self.batch_size]]
            input_ids, left_pad_b = left_pad([p.ids for p in prepared])
            param = next(s.model.parameters())
            tokens_bn = generate(s.model, input_ids.to(param.device), self._device_pixels([p.pixels for p in prepared]),
                                 max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                 top_p=settings.top_p, eos_id=s.tokenizer.eos_id, seed=self.seed + start,
                                 left_pad_b=left_pad_b)
            for row in tokens_bn.tolist():
                out.append(settings.cut(s.tokenizer.decode(strip_after_eos(row, s.tokenizer.eos_id))))
        return out

    def loglikelihood(self, items: Sequence[tuple[str, str, Sequence]]) -> list[tuple[float, bool]]:
        """``(sum of log p of the continuation's tokens, whether each is the argmax)`` for
        ``(context, continuation, PIL images)`` items, ``batch_size`` at a time."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(items), self.batch_size):
            rows = []
            for ctx, continuation, images in items[start:start + self.batch_size]:
                prepared = self.prepare(ctx, images)
                whole, at = self.continuation_ids(prepared, continuation)
                rows.append((whole, at, prepared.pixels))
            out.extend(self.score_ids(rows))
        return out

    @torch.no_grad()
    def score_ids(self, rows: Sequence[tuple[list[int], int, Optional[torch.Tensor]]]) -> list[tuple[float, bool]]:
        """Score ``(ids, start, pixels)`` rows in one forward pass: the sum of ``log p(ids[t] |
        ids[:t])`` over ``t >= start`` and whether every ``ids[t]`` is the argmax.

        Rows are right-padded: attention is causal, so padding after a row's tokens never reaches
        them, and the MoE routers drop no tokens, so padding cannot displace a real token either;
        the padding mask keeps it out of the routers' statistics.
        """
        model = self.session.model
        param = next(model.parameters())
        width = max(len(ids) for ids, _, _ in rows)
        ids_bs = torch.zeros(len(rows), width, dtype=torch.long)
        padding_bs = torch.ones(len(rows), width, dtype=torch.bool)
        for r, (ids, _, _) in enumerate(rows):
            ids_bs[r, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            padding_bs[r, :len(ids)] = False
        logits_bsv = model(ids_bs.to(param.device), self._device_pixels([p for _, _, p in rows]),
                           padding_mask=padding_bs.to(param.device))
        out = []
        for r, (ids, start, _) in enumerate(rows):
            if start >= len(ids):  # an empty continuation: log 1, trivially greedy
                out.append((0.0, True))
                continue
            # Position t - 1 predicts token t.
            logp_tv = torch.log_softmax(logits_bsv[r, start - 1:len(ids) - 1].float(), dim=-1)
            target_t = torch.as_tensor(ids[start:], device=logp_tv.device)
            logp = logp_tv.gather(-1, target_t.view(-1, 1)).sum()
            greedy = bool((logp_tv.argmax(dim=-1) == target_t).all())
            out.append((float(logp), greedy))
        return out


def _int_arg(name: str, value) -> int:
    """A model argument that must be an integer (lmms-eval passes ``--batch_size`` as text)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{MODEL_ID}: {name} must be an integer, got {value!r}") from None


def manifest():
    """The entry point of lmms-eval's ``lmms_eval.models`` group: where the ``cumo_megatron``
    model class lives (imported only when a run asks for it)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.CuMoMegatron")


try:
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # lmms-eval is an optional extra (pip install -e ".[eval]"); the core never needs it
    _LmmsBase = None

if _LmmsBase is not None:

    def _as_response(pair: tuple[float, bool]):
        """One loglikelihood response as lmms-eval's evaluator must receive it.

        lmms-eval 0.7's evaluator passes every response, of every request type, through
        ``unwrap_generation_output``, which turns anything but a string, a ``(str, meta)`` pair or
        a ``GenerationResult`` into its ``str``: a ``(float, bool)`` reaches multiple_choice's
        ``process_results`` as ``"(-3.2, False)"`` and fails ("too many values to unpack"). A
        ``GenerationResult``'s ``text`` is handed on untouched, so the pair travels inside one and
        the task gets the tuple the protocol promises. Older versions take the tuple itself.
        """
        try:
            from lmms_eval.api.instance import GenerationResult
        except ImportError:
            return pair
        return GenerationResult(text=pair)  # type: ignore[arg-type]  # see above: the tuple is the payload

    class CuMoMegatron(_LmmsBase):
        """lmms-eval's ``cumo_megatron`` model: unpacks lmms-eval requests for `CuMoEvaluator`."""

        is_simple = True  # lmms-eval's "simple" protocol: (context, kwargs, doc_to_visual, doc_id, task, split)

        def __init__(self, load: str, tokenizer: Optional[str] = None, template: Optional[str] = None,
                     aspect: str = "pad", batch_size: Any = 1, seed: Any = 0, device: Optional[str] = None,
                     max_batch_size: Any = None, **unknown):
            super().__init__()
            if unknown:
                raise ValueError(f"{MODEL_ID}: unknown model_args {sorted(unknown)}; it takes load, tokenizer, "
                                 "template, aspect, seed (and lmms-eval's --batch_size)")
            if device not in (None, "cpu", "cuda", "cuda:0"):
                log.warning("%s: device=%s ignored; the model goes to the GPU when there is one", MODEL_ID, device)
            self.evaluator = CuMoEvaluator.load(load, tokenizer=tokenizer, template=template, aspect=aspect,
                                                batch_size=_int_arg("batch_size", batch_size),
                                                seed=_int_arg("seed", seed))

        def _images(self, doc_to_visual, doc_id, task, split) -> list:
            """The doc's PIL images (lmms-eval keeps the docs in ``task_dict``)."""
            if doc_to_visual is None:
                return []
            return _as_images(doc_to_visual(self.task_dict[task][split][doc_id]))

        def generate_until(self, requests) -> list[str]:
            """Answers of ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests,
            ``batch_size`` consecutive requests with the same ``gen_kwargs`` at a time (so only one
            batch of images is decoded at once)."""
            from tqdm import tqdm

            answers: list[str] = []
            bar = tqdm(total=len(requests), desc=f"{MODEL_ID} generate_until", disable=self.rank != 0)
            start = 0
            while start < len(requests):
                gen_kwargs = requests[start].args[1]
                end = start + 1
                while end < min(len(requests), start + self.evaluator.batch_size) and requests[end].args[1] == gen_kwargs:
                    end += 1
                items = [(ctx, self._images(visual, doc_id, task, split))
                         for ctx, _, visual, doc_id, task, split in (r.args for r in requests[start:end])]
                answers.extend(self.evaluator.generate(items, GenerationSettings.from_gen_kwargs(gen_kwargs)))
                bar.update(end - start)
                start = end
            bar.close()
            return answers

        def loglikelihood(self, requests) -> list:
            """``(score, is greedy)`` of ``(context, continuation or doc_to_target, doc_to_visual,
            doc_id, task, split)`` requests (and of the visual-less ``(context, continuation)``
            pairs of ``acc_mutual_info``), ``batch_size`` at a time.

            The score is the continuation's summed log-probability, as lmms-eval's API documents,
            except for multiple_choice requests: lmms-eval 0.7 ranks choices with ``argmin``
            (``api/task.py``: "we return the actual loss in many model loglikelihood"), so they get
            the negative log-likelihood and ``acc``/``acc_norm`` pick the likeliest choice.
            ``perplexity`` (``exp(-mean)``) needs the log-probability of "loglikelihood" tasks,
            which pass ``doc_to_target`` itself. (``acc_mutual_info`` takes ``argmax`` of the same
            multiple_choice scores, so lmms-eval cannot serve it and ``acc`` at once.)
            """
            from tqdm import tqdm

            results = []
            size = self.evaluator.batch_size
            for start in tqdm(range(0, len(requests), size), desc=f"{MODEL_ID} loglikelihood", disable=self.rank != 0):
                chunk = [self._scoring_item(r.args) for r in requests[start:start + size]]
                pairs = self.evaluator.loglikelihood([item for item, _ in chunk])
                results.extend(_as_response((-logp if as_loss else logp, greedy))
                               for (logp, greedy), (_, as_loss) in zip(pairs, chunk))
            return results

        def _scoring_item(self, args) -> tuple[tuple[str, str, list], bool]:
            """``(context, continuation, PIL images)`` of one loglikelihood request, and whether
            its score goes out as a loss (a multiple_choice choice: a string continuation)."""
            ctx, target = args[0], args[1]
            if len(args) == 2:
                return (ctx, target, []), False
            _, _, visual, doc_id, task, split = args
            as_loss = not callable(target)
            if callable(target):  # "loglikelihood" tasks pass doc_to_target itself
                target = target(self.task_dict[task][split][doc_id])
            return (ctx, str(target), self._images(visual, doc_id, task, split)), as_loss

        def generate_until_multi_round(self, requests) -> list[str]:
            """Not supported (as in lmms-eval's own LLaVA model): multi-round tasks need a chat history."""
            raise NotImplementedError(f"{MODEL_ID} does not run generate_until_multi_round tasks")


__all__ = ["MODEL_ID", "GenerationSettings", "CuMoEvaluator", "question_with_images", "manifest"]
