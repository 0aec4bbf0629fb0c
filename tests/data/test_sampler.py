"""Length/modality-grouped data-parallel sampler: determinism, sharding, grouping, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cumo_megatron.data.records import DataError
from cumo_megatron.data.sampler import LengthGroupedBatchSampler, ResumableLoader, split_to_even_chunks


def data(n=96, seed=0, image_share=0.6):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 500, n), rng.random(n) < image_share


def sampler(lengths, has_image, mbs=2, dp=1, rank=0, seed=7, grouping="modality_length"):
    return LengthGroupedBatchSampler(lengths, has_image, mbs, dp, rank, seed, grouping)


def test_order_is_a_function_of_seed_and_epoch():
    lengths, img = data()
    a, b = sampler(lengths, img), sampler(lengths, img)
    assert a.micro_batches(0) == b.micro_batches(0)
    assert a.micro_batches(0) != a.micro_batches(1)
    assert a.micro_batches(0) != sampler(lengths, img, seed=8).micro_batches(0)
    a.epoch = 1
    assert list(a) == b.micro_batches(1)


@pytest.mark.parametrize("grouping", ["modality_length", "length", "none"])
def test_dp_shards_are_disjoint_and_cover_the_epoch(grouping):
    lengths, img = data(n=96)
    dp, mbs = 4, 3  # 96 = 8 megabatches of 12: no padding needed
    shards = [sampler(lengths, img, mbs, dp, r, grouping=grouping).micro_batches(0) for r in range(dp)]
    assert all(len(s) == 8 for s in shards)
    assert all(len(mb) == mbs for s in shards for mb in s)
    flat = [i for s in shards for mb in s for i in mb]
    assert sorted(flat) == list(range(96))
    # Ranks' micro-batches at the same step come from the same megabatch.
    full = sampler(lengths, img, mbs, dp, 0, grouping=grouping).megabatches(0)
    for step in range(8):
        assert [i for r in range(dp) for i in shards[r][step]] == full[step]


def test_incomplete_last_megabatch_is_filled_from_the_start():
    lengths, img = data(n=50)
    dp, mbs = 2, 4  # 50 = 6 * 8 + 2: the last megabatch gets 6 samples from the start
    shards = [sampler(lengths, img, mbs, dp, r).micro_batches(0) for r in range(dp)]
    assert len(shards[0]) == len(shards[1]) == 7
    flat = [i for s in shards for mb in s for i in mb]
    assert set(flat) == set(range(50)) and len(flat) == 56


def test_modality_grouping_keeps_micro_steps_single_modality_except_the_tail():
    lengths, img = data(n=200, image_share=0.5)
    s = sampler(lengths, img, mbs=4, dp=2)
    mbs = s.megabatches(0)
    mixed = [k for k, mb in enumerate(mbs) if len({bool(img[i]) for i in mb}) > 1]
    # Only the merged tail (the two incomplete last megabatches) may mix modalities.
    n_img, n_txt = int(img.sum()), int((~img).sum())
    tail_len = (n_img % 8 or 8) + (n_txt % 8 or 8)
    tail_megabatches = -(-tail_len // 8)
    assert all(k >= len(mbs) - tail_megabatches for k in mixed)
    # Both modalities appear in shuffled order among the full megabatches (not all images first).
    kinds = [bool(img[mb[0]]) for mb in mbs[: len(mbs) - tail_megabatches]]
    assert 0 < sum(kinds) < len(kinds)
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)


def test_length_grouping_sorts_within_megabatch_and_balances_ranks():
    lengths, img = data(n=64)
    s = sampler(lengths, img, mbs=4, dp=2, grouping="length")
    for mb in s.megabatches(0):
        per_rank = [sum(lengths[i] for i in mb[r * 4 : (r + 1) * 4]) for r in range(2)]
        # Greedy balancing: the two ranks' totals differ by less than the longest sample.
        assert abs(per_rank[0] - per_rank[1]) <= max(lengths[i] for i in mb)
        # Rank 0's micro-batch holds the longest sample of the megabatch.
        assert max(lengths[i] for i in mb) == max(lengths[i] for i in mb[:4])


def test_split_to_even_chunks():
    lengths = np.array([10, 9, 8, 1, 1, 1])
    chunks = split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2)
    assert sorted(map(len, chunks)) == [3, 3]
    assert chunks == [[0, 3, 4], [1, 2, 5]]
    assert split_to_even_chunks([0, 1, 2], lengths, 2) == [[0, 2], [1]]


class _IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        return i


def _collate(items):
    return {"indices": list(items)}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_mid_epoch_and_across_epochs_sees_exactly_the_same_batches(num_workers):
    lengths, img = data(n=50)
    make = lambda rank: ResumableLoader(  # noqa: E731
        _IndexDataset(), sampler(lengths, img, mbs=3, dp=2, rank=rank), _collate, num_workers=num_workers
    )
    per_epoch = len(make(0).sampler)
    total = per_epoch * 2 + 3
    for rank in range(2):
        straight = make(rank)
        it = iter(straight)
        expected = [next(it)["indices"] for _ in range(total)]
        # Interrupt after 5 batches (the DataLoader has prefetched more), checkpoint, resume.
        first = make(rank)
        it = iter(first)
        got = [next(it)["indices"] for _ in range(5)]
        state = first.state_dict()
        assert state["sampler"]["epoch"] == 0 and state["sampler"]["position"] == 5
        resumed = make(rank)
        resumed.load_state_dict(state)
        it = iter(resumed)
        got += [next(it)["indices"] for _ in range(per_epoch + 2 - 5)]
        # Second interruption just after the epoch boundary.
        state = resumed.state_dict()
        assert state["sampler"]["epoch"] == 1 and state["sampler"]["position"] == 2
        again = make(rank)
        again.load_state_dict(state)
        it = iter(again)
        got += [next(it)["indices"] for _ in range(total - len(got))]
        assert got == expected


def test_resume_at_the_exact_end_of_an_epoch_goes_to_the_next():
    lengths, img = data(n=20)
    loader = ResumableLoader(_IndexDataset(), sampler(lengths, img, mbs=2), _collate)
    n = len(loader.sampler)
    batches = list(loader.epoch())
    assert len(batches) == n and loader.sampler.epoch == 1 and loader.sampler.position == 0
    # A consumer that stops right after the last batch leaves position == n: resume goes on to epoch 1.
    loader2 = ResumableLoader(_IndexDataset(), sampler(lengths, img, mbs=2), _collate)
    it = iter(loader2)
    for _ in range(n):
        next(it)
    state = loader2.state_dict()
    assert state["sampler"]["position"] == n and state["sampler"]["epoch"] == 0
    loader3 = ResumableLoader(_IndexDataset(), sampler(lengths, img, mbs=2), _collate)
    loader3.load_state_dict(state)
    assert next(iter(loader3))["indices"] == loader3.sampler.micro_batches(1)[0]


def test_resume_refuses_changed_data_or_layout():
    lengths, img = data(n=40)
    state = sampler(lengths, img, mbs=2, dp=2).state_dict()
    with pytest.raises(DataError, match="dp_size"):
        sampler(lengths, img, mbs=2, dp=4).load_state_dict(state)
    changed = lengths.copy()
    changed[3] += 1
    with pytest.raises(DataError, match="data_fingerprint"):
        sampler(changed, img, mbs=2, dp=2).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        sampler(lengths, img, mbs=2, dp=2, seed=1).load_state_dict(state)


class _DrawingDataset(_IndexDataset):
    """Each item also reports a draw from torch's default generator of the process that loads it."""

    def __getitem__(self, i):
        return (i, float(torch.rand(())))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterating_leaves_the_default_generator_alone(num_workers):
    """A DataLoader iterator draws its base seed from its own generator, not torch's default one:
    after a mid-epoch resume the default generator (dropout's stream) is where it would have been."""
    lengths, img = data(n=20)
    make = lambda: ResumableLoader(  # noqa: E731
        _DrawingDataset(), sampler(lengths, img, mbs=2), _collate, num_workers=num_workers
    )
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loader = make()
    it = iter(loader)
    batches = [next(it)["indices"] for _ in range(len(loader.sampler) + 2)]  # across an epoch boundary
    if num_workers:
        assert torch.equal(torch.get_rng_state(), before)
        # The workers' seeds are a function of (seed, epoch, rank): a second loader's workers draw
        # the same values, and the next epoch's workers other ones.
        again = iter(make())
        assert [next(again)["indices"] for _ in range(len(batches))] == batches
        draws = lambda batch: [draw for _, draw in batch]  # noqa: E731
        assert draws(batches[0]) != draws(batches[len(loader.sampler)])
    else:  # the items' own draws come from the default generator, in the main process
        torch.manual_seed(3)
        expected = [float(torch.rand(())) for _ in range(sum(len(b) for b in batches))]
        assert [draw for b in batches for _, draw in b] == expected
