"""The RNG tracker's streams and the dropout modules built on them (single process)."""

import torch

from megatron_lite.parallel.random import (
    REPLICATED_STREAM,
    TP_STREAM,
    ParallelDropout,
    RNGStatesTracker,
    model_parallel_rng_tracker,
)


def test_streams_are_seeded_per_stage_and_per_tp_rank_without_touching_the_default_generator():
    before = torch.get_rng_state()
    tracker = model_parallel_rng_tracker(5, tp_rank=1, pp_rank=2)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork(REPLICATED_STREAM):
        replicated = torch.rand(4)
    with tracker.fork(TP_STREAM):
        sharded = torch.rand(4)
    torch.manual_seed(5 + 100 * 2)
    assert torch.equal(replicated, torch.rand(4))
    torch.manual_seed(5 + 100 * 2 + 2718 + 1)
    assert torch.equal(sharded, torch.rand(4))


def test_parallel_dropout_picks_its_stream_and_is_identity_in_eval():
    tracker = model_parallel_rng_tracker(7, 0, 0)
    replicated, sharded = ParallelDropout(0.5, tracker, sharded=False), ParallelDropout(0.5, tracker, sharded=True)
    assert (replicated.stream, sharded.stream) == (REPLICATED_STREAM, TP_STREAM)
    x = torch.ones(64)
    reference = RNGStatesTracker()
    reference.set_states(tracker.get_states())
    with reference.fork(REPLICATED_STREAM):
        expected = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(replicated(x), expected, rtol=0, atol=0)
    replicated.eval()
    assert replicated.rate == 0 and replicated(x) is x
    assert ParallelDropout(0.0, tracker, sharded=True)(x) is x


def test_a_tracker_saved_before_the_replicated_stream_continues_the_default_generator():
    """Old checkpoints: replicated dropout drew from the default generator, which the checkpoint restores first."""
    old = model_parallel_rng_tracker(3, 0, 0).get_states()
    del old[REPLICATED_STREAM]
    torch.manual_seed(42)
    restored = RNGStatesTracker()
    restored.set_states(old)
    with restored.fork(REPLICATED_STREAM):
        continued = torch.rand(4)
    torch.manual_seed(42)
    assert torch.equal(continued, torch.rand(4))
