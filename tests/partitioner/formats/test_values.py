"""Values between layers: one per listed output or one whole output, with their consumers."""

import dataclasses

import pytest

from partitioner.formats.profile import load_profile
from partitioner.formats.values import profile_values
from tests.synthetic import llama_like, make_profile


def test_listed_outputs_are_read_by_the_edges_that_name_them() -> None:
    vals = profile_values(llama_like())
    assert [(v.producer, v.name, v.consumers, v.grad) for v in vals.values] == [
        (0, "hidden", (1,), True), (0, "mask", (1, 2), False), (0, "cos", (1, 2), False),
        (0, "sin", (1, 2), False), (1, "block0", (2,), True), (2, "block1", (3,), True),
        (3, "head", (), True)]
    assert vals.edge_reads == ((0, 1, 2, 3), (1, 2, 3), (4,), (5,), ())  # 0 -> 3 carries nothing
    assert vals.first == (0, 4, 5, 6, 7) and list(vals.of_layer(0)) == [0, 1, 2, 3]
    assert vals.pair_value.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 5]
    assert vals.pair_layer.tolist() == [1, 1, 2, 1, 2, 1, 2, 2, 3]
    assert vals.table[1].tolist() == [16.0, 16.0] and not vals.whole


def test_a_profile_without_outputs_has_one_whole_value_per_layer() -> None:
    prof = load_profile("pipedream/resnet18")
    vals = profile_values(prof)
    assert vals.whole and len(vals.values) == prof.num_layers
    for u, val in enumerate(vals.values):
        assert val.producer == u and val.name == prof.layers[u].name
        assert val.bytes == prof.layers[u].out_bytes and val.grad
        assert val.consumers == tuple(sorted(v for a, v in prof.edges or () if a == u))
    chain = profile_values(make_profile([1.0, 2.0, 3.0]))
    assert [v.consumers for v in chain.values] == [(1,), (2,), ()]


def test_misaligned_edge_values_are_refused() -> None:
    prof = dataclasses.replace(llama_like(), edge_values=((0,),))
    with pytest.raises(ValueError, match="5 edges but 1 edge_values"):
        profile_values(prof)
    prof = dataclasses.replace(llama_like(), edge_values=(None, None, (0,), None, None))
    with pytest.raises(ValueError, match="reads outputs \\[0\\] of layer 1, which lists no "):
        profile_values(prof)
