"""Two gloo processes: collectives, TP / SP mappings, PP p2p and the checkpoint writer on CPU.

One call (`tests.platform.workers:check_two_ranks`) measures everything, on the 2 ranks of the
launch the 2-rank test modules share (`tests.helpers.shared_launch`); each test below asserts one
aspect of the result.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import shared_launch

PART = "platform.two_ranks"
shared_launch.register(PART, lambda tmp: ("tests.platform.workers:check_two_ranks", {"checkpoint_dir": str(tmp)}, None))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per-rank results of `check_two_ranks`."""
    _, results = shared_launch.results(PART, tmp_path_factory)
    assert [r["rank"] for r in results] == [0, 1]
    return results


def test_gloo_all_reduce(ranks):
    """Plain torch.distributed works: 1 + 2 summed on both ranks, over gloo."""
    for r in ranks:
        assert r["backend"] == "gloo"
        assert r["all_reduce_sum"] == 3.0


def test_tensor_parallel_groups(ranks):
    """initialize(ParallelSizes(tp=2)) on two ranks gives one TP group of two and DP of one."""
    assert [r["tp_world"] for r in ranks] == [2, 2]
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    assert [r["dp_world"] for r in ranks] == [1, 1]


def test_sequence_parallel_gather_and_reduce_scatter(ranks):
    """megatron's SP mappings (output buffers on torch.cuda.current_device()) run on CPU.

    gather concatenates the ranks' slices on dim 0; reduce-scatter of that gathered tensor gives
    each rank the sum over ranks of its slice, i.e. 2x its input; the gather's backward (a
    reduce-scatter) gives each slice the sum of the ranks' upstream scales 1 + 2.
    """
    expected_full = torch.cat([r["local_x"] for r in ranks], dim=0)
    for r in ranks:
        assert r["gathered_device"] == "cpu" and r["buffered_device"] == "cpu"
        torch.testing.assert_close(r["gathered"], expected_full, rtol=0, atol=0)
        torch.testing.assert_close(r["buffered"], expected_full, rtol=0, atol=0)
        torch.testing.assert_close(r["scattered"], 2 * r["local_x"], rtol=0, atol=0)
        torch.testing.assert_close(r["local_x_grad"], torch.full_like(r["local_x"], 3.0), rtol=0, atol=0)


def test_rng_streams_per_tensor_parallel_rank(ranks):
    """The CPU tracker seeds the model-parallel stream per TP rank and the default stream per DP rank."""
    assert not torch.equal(ranks[0]["model_parallel_draw"], ranks[1]["model_parallel_draw"])
    torch.testing.assert_close(ranks[0]["default_draw"], ranks[1]["default_draw"], rtol=0, atol=0)


def test_sequence_parallel_norm_grads_are_summed_over_tp(ranks):
    """Our norm's `sequence_parallel` params are all-reduced by megatron's grad finalisation (1 + 2)."""
    for r in ranks:
        torch.testing.assert_close(r["sp_norm_grad"], torch.full((4,), 3.0), rtol=0, atol=0)


def test_dist_checkpoint_round_trip(ranks):
    """dist_checkpointing.save (psutil writer, synchronize no-op) then load: same shard, and the full
    tensor when loaded as a replica (resharded)."""
    for r in ranks:
        torch.testing.assert_close(r["loaded_shard"], r["saved_shard"], rtol=0, atol=0)
        torch.testing.assert_close(r["loaded_full"], r["full"], rtol=0, atol=0)
    assert not torch.equal(ranks[0]["saved_shard"], ranks[1]["saved_shard"])


def test_pipeline_p2p_after_reinitialisation(ranks):
    """Re-initialised as PP = 2 in the same processes, megatron's P2PCommunicator moves an activation
    forward from stage 0 to stage 1 and its gradient (-2x) back."""
    assert [r["pp_world"] for r in ranks] == [2, 2]
    assert [r["pp_rank"] for r in ranks] == [0, 1]
    assert [r["tp_world_after_reinit"] for r in ranks] == [1, 1]
    first, second = ranks
    torch.testing.assert_close(second["activation_received"], first["activation_sent"], rtol=0, atol=0)
    torch.testing.assert_close(first["grad_received"], -2.0 * first["activation_sent"], rtol=0, atol=0)
