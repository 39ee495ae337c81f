"""The profile's graph fields: outputs, edges that read some of them, tied parameters."""

import copy
from typing import Any

import pytest

from partitioner.formats.profile import (
    OutputValue,
    ProfileError,
    TiedParam,
    load_profile,
    profile_from_dict,
    profile_to_dict,
)
from tests.synthetic import llama_like_dict as llama_like


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data)
    return info.value.problems


def test_new_fields_load_and_round_trip() -> None:
    prof = profile_from_dict(llama_like())
    outs = prof.layers[0].outputs
    assert outs is not None and outs[1] == OutputValue("mask", (16.0, 16.0), False)
    assert prof.layers[1].outputs is None
    assert prof.edges == ((0, 1), (0, 2), (1, 2), (2, 3), (0, 3))
    assert prof.edge_values == ((0, 1, 2, 3), (1, 2, 3), None, None, ())
    assert prof.tied == (TiedParam("embed.weight", 400, (0, 3)),)
    again = profile_from_dict(profile_to_dict(prof))
    assert again == prof and again.sha256() == prof.sha256()
    data = profile_to_dict(prof)
    assert data["edges"][2] == [1, 2] and data["edges"][4] == [0, 3, []]
    assert data["layers"][0]["outputs"][1] == {"name": "mask", "bytes": [16, 16], "grad": False}
    assert "outputs" not in data["layers"][1]


def test_profiles_without_the_new_fields_write_none_of_them() -> None:
    prof = load_profile("pipedream/resnet18")
    data = profile_to_dict(prof)
    assert "tied" not in data and all(len(e) == 2 for e in data["edges"])
    assert all("outputs" not in lay for lay in data["layers"])
    assert prof.edge_values is None and prof.tied == ()


def test_bad_outputs_are_named_with_their_paths() -> None:
    data = llama_like()
    data["layers"][0]["outputs"][1]["bytes"] = [1, 2, 3]
    data["layers"][0]["outputs"][2]["grad"] = "no"
    data["layers"][2]["outputs"] = [{"name": "cos", "bytes": 4}, {"bytes": -1, "nme": "x"}]
    found = problems(data)
    assert "layers[0].outputs[1].bytes: [1, 2, 3] is not a number or a list of 2 numbers (one " \
           "per micro-batch size)" in found
    assert "layers[0].outputs[2].grad: 'no' is not true or false (whether a gradient of the " \
           "value flows back)" in found
    assert any(p.startswith("layers[2].outputs[1]: unknown key 'nme'") for p in found)
    assert "layers[2].outputs[1]: missing required field 'name'" in found
    assert "layers[2].outputs[1].bytes: -1 is negative" in found
    assert ("layers[2].outputs[0].name: 'cos' is also layers[0].outputs[2].name; value names "
            "must be unique across the profile (use the traced graph's node names)") in found


def test_bad_edge_values_are_named_with_their_paths() -> None:
    data = llama_like()
    data["edges"] = [[0, 1, [0, 4, 4]], [1, 2, [0]], [0, 2, "all"], [0, 3, [], 1], [3, 1]]
    found = problems(data)
    assert "edges[0][2]: indices [4, 4] are outside 0..3, the 4 outputs of layer 0" in found
    assert "edges[0][2]: [0, 4, 4] lists an output twice; list each once" in found
    assert ("edges[1]: reads outputs [0] of layer 1, which lists no 'outputs'; give layer 1 its "
            "outputs or use the 2-element form [src, dst]") in found
    assert "edges[2][2]: 'all' is not a list of indices into layer 0's outputs" in found
    assert any(p.startswith("edges[3]: [0, 3, [], 1] is not a pair") for p in found)
    assert any(p.startswith("edges[4]: [3, 1] goes from layer 3 to layer 1") for p in found)


@pytest.mark.parametrize(("tied", "message"), [
    ([{"name": "w", "bytes": 1.5, "layers": [0, 3]}], "tied[0].bytes: 1.5 is not a whole number"),
    ([{"name": "w", "bytes": 4, "layers": [3, 0]}], "tied[0].layers: [3, 0] is not sorted or "
     "repeats a layer; list distinct layers in increasing order (the first owns the parameter)"),
    ([{"name": "w", "bytes": 4, "layers": [1, 1]}], "tied[0].layers: [1, 1] is not sorted"),
    ([{"name": "w", "bytes": 4, "layers": [2]}], "tied[0].layers: [2] names fewer than 2 "
     "layers; a tied parameter is used by at least two (the owner first)"),
    ([{"name": "w", "bytes": 4, "layers": [0, 9]}], "tied[0].layers: [9] are outside 0..3"),
    ([{"name": "w", "bytes": 4, "layers": [0, 1]}, {"name": "w", "bytes": 4, "layers": [0, 2]}],
     "tied[1].name: 'w' is listed twice; list each tied parameter once"),
    ({"w": 1}, "tied: expected a list of {name, bytes, layers} objects, got {'w': 1}"),
])
def test_bad_ties_are_named(tied: object, message: str) -> None:
    data = copy.deepcopy(llama_like())
    data["tied"] = tied
    assert any(p.startswith(message) for p in problems(data)), problems(data)
