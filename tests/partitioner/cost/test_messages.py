"""stage_messages: what each pair of stages exchanges, value by value, per micro-batch."""

import pytest

from partitioner.cost.messages import Message, stage_messages
from partitioner.formats.profile import load_profile
from tests.synthetic import llama_like


def test_each_value_goes_once_to_each_stage_that_reads_it() -> None:
    msgs = stage_messages(llama_like(), [0, 1, 2, 2], 2)
    assert msgs == {
        (0, 1): Message(("hidden", "mask", "cos", "sin"), 232.0, 200.0),
        (0, 2): Message(("mask", "cos", "sin"), 32.0, 0.0),  # no gradient flows back
        (1, 2): Message(("block0",), 200.0, 200.0),
    }  # the ordering-only edge 0 -> 3 carries nothing, so (0, 2) does not carry 'hidden'


def test_the_union_of_values_from_several_layers() -> None:
    msgs = stage_messages(llama_like(), [0, 0, 1, 1], 1)
    assert msgs == {(0, 1): Message(("mask", "cos", "sin", "block0"), 132.0, 100.0)}
    assert stage_messages(llama_like(), [0, 0, 0, 0], 1) == {}


def test_a_profile_without_outputs_sends_whole_outputs_named_as_the_layers() -> None:
    prof = load_profile("h200/gpt2-medium")
    msgs = stage_messages(prof, [0] * 10 + [1] * 16, 4)
    out = prof.layers[9].out_bytes[prof.microbatch_sizes.index(4)]
    assert msgs == {(0, 1): Message(("9",), out, out)}


def test_a_partition_that_is_not_convex_is_refused() -> None:
    with pytest.raises(ValueError, match="edge 1 -> 2 goes from stage 1 back to stage 0"):
        stage_messages(llama_like(), [0, 1, 0, 1], 1)
