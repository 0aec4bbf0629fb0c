"""Generation: KV-cache greedy tokens == no-cache greedy tokens == the plain-PyTorch reference's
greedy tokens on a tiny original-CuMo release (Mistral and Mixtral LLMs); padded (sequence-parallel
style) chunks; determinism of greedy decoding, seeded reproducible top-p sampling, EOS stops;
TP = 2 (with sequence parallelism) gives the TP = 1 tokens, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cumo_megatron.checkpoint import ours
from cumo_megatron.inference import generation
from cumo_megatron.inference.contrast import ContrastSettings
from cumo_megatron.inference.generation import forward_last_logits, generate, left_pad, sample_next, strip_after_eos
from megatron.core.inference.contexts import StaticInferenceContext
from tests.fixtures.tiny_models import save_images
from tests.helpers.distributed import run_distributed
from tests.inference.conftest import load_release_model, prompt_batch

NEW = 6


@pytest.fixture(scope="module")
def loaded(release_factory):
    """kind -> (release, model, cfg)."""
    out = {}
    for kind in ("mistral", "mixtral"):
        release = release_factory(kind)
        model, cfg = load_release_model(release.path)
        out[kind] = (release, model, cfg)
    return out


@pytest.fixture(scope="module")
def greedy(loaded):
    """kind -> KV-cache greedy tokens of `prompt_batch` (computed once, shared by the tests)."""
    out = {}
    for kind, (_, model, cfg) in loaded.items():
        ids, images = prompt_batch(cfg)
        out[kind] = generate(model, ids, images, max_new_tokens=NEW)
    return out


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_cache_no_cache_and_reference_agree(loaded, greedy, kind):
    release, model, cfg = loaded[kind]
    ids, images = prompt_batch(cfg)
    cached = greedy[kind]
    uncached = generate(model, ids, images, max_new_tokens=NEW, use_cache=False)
    reference = release.reference.generate(images, ids, NEW)
    assert cached.shape == (2, NEW)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)
    # Not a degenerate answer: the two prompts do not give the same tokens.
    assert not torch.equal(cached[0], cached[1])


def test_cached_logits_match_full_recompute(loaded):
    _, model, cfg = loaded["mistral"]
    ids, images = prompt_batch(cfg)
    with torch.no_grad():
        ctx = StaticInferenceContext(2, ids.shape[1] + 4)
        ctx.materialize_only_last_token_logits = False
        prefill = forward_last_logits(model, ids, images, ctx)
        nxt = prefill.argmax(-1).view(2, 1)
        step = forward_last_logits(model, nxt, None, ctx)
        full = forward_last_logits(model, torch.cat([ids, nxt], 1), images)
    assert ctx.sequence_len_offset == ids.shape[1] + 1
    assert (step - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_padded_chunks_give_the_same_tokens(loaded, greedy, kind, monkeypatch):
    """The sequence-parallel path pads every chunk and masks the padding: force it at TP = 1."""
    _, model, cfg = loaded[kind]
    ids, images = prompt_batch(cfg)
    plain = greedy[kind]
    monkeypatch.setattr(generation, "_chunk_multiple", lambda model: 3)
    assert ids.shape[1] % 3 != 0  # the prefill is padded too
    padded = generate(model, ids, images, max_new_tokens=NEW)
    assert torch.equal(plain, padded)


def _ragged_prompts(cfg):
    """Three prompts of lengths 4 + image, 9 + image and 6 (text only), and the two images."""
    g = torch.Generator().manual_seed(11)
    n = cfg.vision.tokens_per_image
    image_run = [cfg.image_token_id] * n
    text = [torch.randint(3, cfg.language.vocab_size, (k,), generator=g).tolist() for k in (4, 9, 6)]
    prompts = [text[0][:1] + image_run + text[0][1:], text[1][:5] + image_run + text[1][5:], text[2]]
    _, images = prompt_batch(cfg, batch=2, seed=4)
    return prompts, [images[0:1], images[1:2], None]


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_left_padded_batch_gives_each_prompts_own_tokens(loaded, kind, monkeypatch):
    """Prompts of different lengths (with and without an image) in one left-padded batch: each
    row's greedy tokens are those it gets alone, with and without the KV cache, and with the
    sequence-parallel chunk padding on top."""
    _, model, cfg = loaded[kind]
    prompts, images = _ragged_prompts(cfg)
    alone = [generate(model, torch.tensor([p]), image, NEW)[0] for p, image in zip(prompts, images)]
    ids, pad_b = left_pad(prompts)
    assert pad_b.tolist() == [ids.shape[1] - len(p) for p in prompts] and pad_b.min() == 0
    batch_images = torch.cat([i for i in images if i is not None])
    batched = generate(model, ids, batch_images, NEW, left_pad_b=pad_b)
    for row, want in enumerate(alone):
        assert torch.equal(batched[row], want), (kind, row)
    assert torch.equal(generate(model, ids, batch_images, NEW, left_pad_b=pad_b, use_cache=False), batched)
    monkeypatch.setattr(generation, "_chunk_multiple", lambda model: 3)
    assert torch.equal(generate(model, ids, batch_images, NEW, left_pad_b=pad_b), batched)
    # Without the mask the padding is read as text: some row changes (the test can tell).
    assert not torch.equal(generate(model, ids, batch_images, NEW), batched)


def test_left_padded_batch_with_self_contrast(loaded):
    _, model, cfg = loaded["mixtral"]
    prompts, images = _ragged_prompts(cfg)
    contrast = ContrastSettings(1, 1.0)
    alone = [generate(model, torch.tensor([p]), image, NEW, contrast=contrast)[0] for p, image in zip(prompts, images)]
    ids, pad_b = left_pad(prompts)
    batched = generate(model, ids, torch.cat([i for i in images if i is not None]), NEW, contrast=contrast,
                       left_pad_b=pad_b)
    for row, want in enumerate(alone):
        assert torch.equal(batched[row], want), row


def test_self_contrast_is_refused_across_pipeline_stages(loaded, monkeypatch):
    _, model, cfg = loaded["mixtral"]
    ids, images = prompt_batch(cfg)
    monkeypatch.setattr(generation, "_pp_size", lambda: 2)
    with pytest.raises(ValueError, match="one pipeline stage"):
        generate(model, ids, images, 2, contrast=ContrastSettings(1, 1.0))


def test_left_pad_refuses_what_it_cannot_pad(loaded):
    with pytest.raises(ValueError, match="none of them empty"):
        left_pad([[1, 2], []])
    _, model, cfg = loaded["mistral"]
    ids, images = prompt_batch(cfg)
    with pytest.raises(ValueError, match="left_pad_b"):
        generate(model, ids, images, 2, left_pad_b=torch.tensor([0, ids.shape[1]]))


def test_greedy_is_deterministic_and_sampling_is_seeded(loaded, greedy):
    _, model, cfg = loaded["mixtral"]
    ids, images = prompt_batch(cfg)
    assert torch.equal(generate(model, ids, images, NEW, seed=5), greedy["mixtral"])  # seed is unused
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = generate(model, ids, images, seed=1, **kw)
    b = generate(model, ids, images, seed=1, **kw)
    c = generate(model, ids, images, seed=2, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token; the rest is cut
    seen_all = {int(sample_next(logits, 1.0, 1.0, g)) for _ in range(300)}
    assert seen_all == {0, 1, 2, 3}
    assert {int(sample_next(logits, 1.0, 0.3, g)) for _ in range(50)} == {0}
    assert int(sample_next(logits, 0.0)) == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0, g)


def test_eos_stops_generation(loaded, greedy):
    _, model, cfg = loaded["mixtral"]
    ids, images = prompt_batch(cfg, batch=1)
    free = generate(model, ids, images, NEW)[0].tolist()
    eos = free[2]
    k = free.index(eos)
    stopped = generate(model, ids, images, NEW, eos_id=eos)[0].tolist()
    assert stopped == free[: k + 1]
    assert strip_after_eos(stopped, eos) == free[:k]
    # In a batch, a finished sequence keeps emitting EOS until all are done.
    ids2, images2 = prompt_batch(cfg, batch=2)
    free2 = greedy["mixtral"]
    eos2 = int(free2[0, 1])
    both = generate(model, ids2, images2, NEW, eos_id=eos2)
    first = free2[0].tolist().index(eos2)
    assert both[0, : first + 1].tolist() == free2[0, : first + 1].tolist()
    assert set(both[0, first:].tolist()) == {eos2}


def test_generation_refuses_training_mode(loaded):
    _, model, cfg = loaded["mistral"]
    ids, images = prompt_batch(cfg)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            generate(model, ids, images, 2)
    finally:
        model.eval()


def test_tp2_and_pp2_give_the_tp1_tokens(loaded, greedy, tmp_path):
    """Both LLM kinds saved as our checkpoints, loaded at TP = 2 (SP on) and at PP = 2 (one LLM layer
    per stage) in one 2-rank launch: greedy (cached and not), seeded sampling, a left-padded batch
    and the CLI's batch mode give the world-of-one tokens on every rank."""
    cases = {}
    for kind in ("mistral", "mixtral"):
        release, model, cfg = loaded[kind]
        ckpt = tmp_path / f"ckpt-{kind}"
        ours.save_model_checkpoint(model, cfg, ckpt)
        (ckpt / "tokenizer.model").write_bytes((release.path / "tokenizer.model").read_bytes())
        ids, images = prompt_batch(cfg)
        prompts, ragged_images = _ragged_prompts(cfg)
        ragged_ids, ragged_pad = left_pad(prompts)
        ragged_images = torch.cat([i for i in ragged_images if i is not None])
        torch.save({"ids": ids, "images": images, "ragged_ids": ragged_ids, "ragged_pad": ragged_pad,
                    "ragged_images": ragged_images}, tmp_path / f"batch-{kind}.pt")
        cases[kind] = {
            "ckpt": str(ckpt), "batch": str(tmp_path / f"batch-{kind}.pt"), "greedy": greedy[kind],
            "sampled": generate(model, ids, images, 10, temperature=1.5, top_p=0.95, seed=1),
            "ragged": generate(model, ragged_ids, ragged_images, NEW, left_pad_b=ragged_pad),
        }
    images_dir = tmp_path / "imgs"
    paths = save_images(images_dir, 2, size=40)
    questions = images_dir / "q.json"
    questions.write_text(json.dumps([
        {"id": i, "image": p.name, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
        for i, p in enumerate(paths)
    ]))
    # The CLI's batch mode at TP = 1 in this process, for comparison with the 2-rank runs.
    from cumo_megatron.generate import main

    cli_tp1 = tmp_path / "answers-tp1.jsonl"
    assert main(["--load", cases["mistral"]["ckpt"], "--batch", str(questions), "--out", str(cli_tp1),
                 "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"]) == 0
    cli_out = {layout: str(tmp_path / f"answers-{layout}.jsonl") for layout in ("tp2", "pp2")}
    results = run_distributed(
        "tests.inference.workers:generate_tp2_and_pp2",
        world_size=2,
        args={"cases": {k: {"ckpt": v["ckpt"], "batch": v["batch"]} for k, v in cases.items()},
              "new": NEW, "questions": str(questions), "cli_out": cli_out},
    )
    for rank, result in enumerate(results):
        for layout in ("tp2", "pp2"):
            for kind, case in cases.items():
                got = result[layout][kind]
                for key in ("greedy", "sampled", "ragged"):
                    assert torch.equal(got[key], case[key]), (rank, layout, kind, key)
                if kind == "mistral":  # the no-cache path gathers vocab-parallel logits itself
                    assert torch.equal(got["uncached"], case["greedy"]), (rank, layout, kind)
        assert all(result["tp2"][kind]["sequence_parallel"] for kind in cases)
        assert result["pp2"]["mistral"]["stage"] == ((True, False) if rank == 0 else (False, True))
    tp1_rows = [json.loads(line) for line in cli_tp1.read_text().splitlines()]
    assert len(tp1_rows) == 2 and any(r["text"] for r in tp1_rows)
    for layout, path in cli_out.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert [r["text"] for r in rows] == [r["text"] for r in tp1_rows], layout
