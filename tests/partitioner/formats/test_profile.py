import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from partitioner.formats.profile import (
    ProfileError,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    save_profile,
    shipped_profiles,
)

REPO = Path(__file__).resolve().parents[3]


def _valid() -> dict[str, Any]:
    return {
        "format": "gpipe-profile/1", "model": "m",
        "device": {"name": "cpu", "kind": "cpu", "memory_bytes": 1000},
        "dtype": "float32", "microbatch_sizes": [1, 2],
        "layers": [
            {"name": "0", "param_bytes": 8, "fwd_ms": [1.0, 2.0], "bwd_ms": [2.0, 4.0],
             "in_bytes": [4, 8], "out_bytes": [4, 8], "saved_bytes": [4, 8]},
            {"name": "1", "param_bytes": 8, "fwd_ms": [1.0, 2.0], "bwd_ms": [2.0, 4.0],
             "in_bytes": [4, 8], "out_bytes": [4, 8], "saved_bytes": [4, 8]},
        ],
    }


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data)
    return info.value.problems


def test_shipped_profiles_load_and_round_trip(tmp_path: Path) -> None:
    names = shipped_profiles()
    assert {"h200/gpt2-medium", "h200/gpt-1.3b", "h200/resnet50", "pipedream/vgg16"} <= set(names)
    for name in names:
        prof = load_profile(name)
        path = tmp_path / "p.json"
        save_profile(prof, path)
        again = load_profile(path)
        assert again == prof
        assert again.sha256() == prof.sha256()
    gpt = load_profile("h200/gpt2-medium")
    assert gpt.num_layers == 26 and gpt.microbatch_sizes == (1, 2, 4, 8, 16)
    assert gpt.input is not None and gpt.input["seq"] == 1024


def test_every_problem_is_reported_with_its_path() -> None:
    data = _valid()
    data["layers"][1]["fwd_ms"][1] = -1.0
    data["layers"][0]["bwd_ms"] = [1.0]
    data["layers"][1]["saved_bytes"][0] = float("nan")
    data["layers"][0]["out_bytes"][1] = float("inf")
    problems = _problems(data)
    assert "layers[1].fwd_ms[1]: -1.0 is negative" in problems
    assert any(p.startswith("layers[0].bwd_ms: has 1 values but microbatch_sizes has 2")
               for p in problems)
    assert "layers[1].saved_bytes[0]: nan is not finite" in problems
    assert "layers[0].out_bytes[1]: inf is not finite" in problems
    assert len(problems) == 4


@pytest.mark.parametrize("sizes,needle", [
    ([2, 1], "microbatch_sizes[1]: 1 is smaller than the size before it (2)"),
    ([2, 2], "microbatch_sizes[1]: 2 repeats the size before it (2)"),
    ([0, 2], "microbatch_sizes[0]: 0 is not a positive whole number"),
    ([1.5, 2], "microbatch_sizes[0]: 1.5 is not a positive whole number"),
])
def test_microbatch_sizes_must_increase(sizes: list[Any], needle: str) -> None:
    data = _valid()
    data["microbatch_sizes"] = sizes
    assert any(p.startswith(needle) for p in _problems(data)), _problems(data)


def test_wrong_format_and_missing_fields() -> None:
    data = _valid()
    data["format"] = "gpipe-profile/0"
    del data["layers"][0]["fwd_ms"]
    del data["dtype"]
    problems = _problems(data)
    assert "format: 'gpipe-profile/0' is not 'gpipe-profile/1'" in problems
    assert "layers[0]: missing required field 'fwd_ms'" in problems
    assert "(top): missing required field 'dtype'" in problems
    with pytest.raises(ProfileError, match="expected a JSON object"):
        profile_from_dict([1, 2])


def test_message_names_source_and_fix(tmp_path: Path) -> None:
    data = _valid()
    data["layers"][0]["fwd_ms"][0] = -2
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"(?s)bad.json is not a valid .*fwd_ms\[0\]: -2 is negative"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not JSON"):
        load_profile(path)
    with pytest.raises(FileNotFoundError, match="h200/gpt2-medium"):
        load_profile(tmp_path / "missing.json")


def test_optional_fields_and_free_form_extra_survive() -> None:
    data = _valid()
    data["how"] = "by hand"
    data["input"] = {"kind": "tokens", "seq": 8}
    data["layers"][0]["launch_ms"] = 0.5
    data["layers"][1]["peak_bytes"] = [10, 20]
    data["layers"][1]["extra"] = {"note": "kept"}
    data["extra"] = {"calibration": {"x": 1}}
    prof = profile_from_dict(copy.deepcopy(data))
    assert prof.layers[0].launch_ms == (0.5, 0.5)
    assert prof.layers[1].peak_bytes == (10.0, 20.0)
    out = profile_to_dict(prof)
    assert out["layers"][1]["extra"] == {"note": "kept"}
    assert out["extra"] == {"calibration": {"x": 1}}
    assert out["how"] == "by hand" and out["input"]["seq"] == 8
    assert profile_from_dict(out) == prof


def test_unknown_keys_are_errors_naming_the_nearest_known_one() -> None:
    """A misspelt 'edges' must not plan a graph as a chain (its skip traffic silently lost)."""
    data = _valid()
    data["edge"] = [[0, 1]]
    data["layers"][1]["note"] = "where does it go?"
    problems = _problems(data)
    assert "(top): unknown key 'edge' (did you mean 'edges'?); free-form data goes under " \
           "'extra'" in problems
    assert any(p.startswith("layers[1]: unknown key 'note'") for p in problems)


def test_profiles_written_with_the_harness_on_top_still_load() -> None:
    data = _valid()
    data["harness"] = {"timing": "model"}
    prof = profile_from_dict(data)
    assert prof.extra["harness"] == {"timing": "model"}
    assert profile_to_dict(prof)["extra"]["harness"] == {"timing": "model"}


def test_edges_are_validated() -> None:
    data = _valid()
    data["layers"].append(copy.deepcopy(data["layers"][0]))
    data["edges"] = [[0, 1], [1, 2], [0, 2]]
    assert profile_from_dict(data).edges == ((0, 1), (1, 2), (0, 2))
    data["edges"] = [[0, 1], [0, 1], [2, 1], [0, 7], "x", [1, 1]]
    problems = _problems(data)
    assert any("edges[5]" in p and "cycle is impossible" in p for p in problems)  # self-loop
    assert any("appears twice" in p for p in problems)
    assert any("edges[2]" in p and "src < dst" in p for p in problems)
    assert any("edges[3]" in p and "outside 0..2" in p for p in problems)
    assert any("edges[4]" in p for p in problems)


def test_negative_param_bytes_and_non_number() -> None:
    data = _valid()
    data["layers"][0]["param_bytes"] = -8
    data["layers"][1]["fwd_ms"][0] = "fast"
    problems = _problems(data)
    assert "layers[0].param_bytes: -8 is negative" in problems
    assert "layers[1].fwd_ms[0]: 'fast' is not a number" in problems


@pytest.mark.timeout(300)
def test_shipped_profile_found_from_an_installed_wheel(tmp_path: Path) -> None:
    """--profile h200/gpt2-medium must work from a regular (non-editable) install."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, timeout=240,
                   capture_output=True)
    code = ("import partitioner.formats.profile as p; assert 'site' in p.__file__, p.__file__; "
            "print(p.load_profile('h200/gpt2-medium').num_layers)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "26"


def test_split_backward_comes_as_a_pair_and_may_exceed_bwd() -> None:
    data = _valid()
    data["layers"][0]["bwd_input_ms"] = [1.5, 3.0]
    data["layers"][0]["bwd_weight_ms"] = [0.75, 1.5]  # I + W = 1.125 x bwd: accepted
    data["layers"][1]["bwd_weight_ms"] = 0.5  # one figure for every size, but no I
    problems = _problems(copy.deepcopy(data))
    assert len(problems) == 1
    assert problems[0].startswith("layers[1].bwd_input_ms: missing, but bwd_weight_ms is given")
    assert "give bwd_input_ms too, or drop bwd_weight_ms" in problems[0]
    data["layers"][1]["bwd_input_ms"] = 1.5
    prof = profile_from_dict(copy.deepcopy(data))
    assert prof.layers[0].bwd_input_ms == (1.5, 3.0)
    assert prof.layers[1].bwd_weight_ms == (0.5, 0.5)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    del data["layers"][0]["bwd_weight_ms"]
    assert [p.split(":")[0] for p in _problems(data)] == ["layers[0].bwd_weight_ms"]


def test_saved_parts_come_as_a_pair_and_stay_within_saved_bytes() -> None:
    data = _valid()
    saved = data["layers"][0]["saved_bytes"]
    data["layers"][0]["saved_input_bytes"] = [s / 2 for s in saved]
    data["layers"][0]["saved_output_bytes"] = [0, 0]
    prof = profile_from_dict(copy.deepcopy(data))
    assert prof.layers[0].saved_input_bytes == tuple(s / 2 for s in saved)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    data["layers"][1]["saved_output_bytes"] = [0, 0]  # no saved_input_bytes
    data["layers"][0]["saved_output_bytes"] = [saved[0] + 1, 0]
    problems = _problems(copy.deepcopy(data))
    assert len(problems) == 2
    assert any(p.startswith("layers[1].saved_input_bytes: missing, but saved_output_bytes is "
                            "given") for p in problems)
    assert any(p.startswith(f"layers[0].saved_output_bytes[0]: is {saved[0] + 1:g} bytes, more "
                            f"than saved_bytes") for p in problems)


def test_what_w_keeps_comes_as_a_pair_and_its_input_part_stays_within_it() -> None:
    data = _valid()
    data["layers"][0]["held_for_w_bytes"] = [64, 128]
    data["layers"][0]["held_for_w_input_bytes"] = [32, 64]
    prof = profile_from_dict(copy.deepcopy(data))
    assert prof.layers[0].held_for_w_bytes == (64.0, 128.0)
    assert prof.layers[0].held_for_w_input_bytes == (32.0, 64.0)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    data["layers"][1]["held_for_w_bytes"] = [0, 0]  # no input part
    data["layers"][0]["held_for_w_input_bytes"] = [65, 64]
    problems = _problems(copy.deepcopy(data))
    assert len(problems) == 2
    assert any(p.startswith("layers[1].held_for_w_input_bytes: missing, but held_for_w_bytes "
                            "is given") for p in problems)
    assert any(p.startswith("layers[0].held_for_w_input_bytes[0]: is 65 bytes, more than "
                            "held_for_w_bytes (64)") for p in problems)


def test_loss_figures_load_round_trip_and_are_checked() -> None:
    data = _valid()
    data["loss"] = {"saved_bytes": [40, 80], "saved_input_bytes": [0, 8],
                    "target_bytes": [8, 16]}
    prof = profile_from_dict(copy.deepcopy(data))
    assert prof.loss is not None and prof.loss.target_bytes == (8.0, 16.0)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    data["loss"] = {"saved_bytes": [40], "saved_input_bytes": [50, 8], "target": [8, 16]}
    problems = _problems(copy.deepcopy(data))
    assert any(p.startswith("loss.saved_bytes: [40] is not a list of 2 numbers") for p in problems)
    assert any(p.startswith("loss: unknown key 'target'") for p in problems)
    assert any("missing" in p and "target_bytes" in p for p in problems)


def test_chain_only_memory_figures_are_refused_on_a_graph() -> None:
    data = _valid()
    data["edges"] = [[0, 1]]
    data["loss"] = {"saved_bytes": [4, 8], "saved_input_bytes": [0, 0], "target_bytes": [1, 2]}
    data["layers"][1]["saved_input_bytes"] = [0, 0]
    data["layers"][1]["saved_output_bytes"] = [0, 0]
    data["layers"][0]["held_for_w_bytes"] = data["layers"][0]["held_for_w_input_bytes"] = [0, 0]
    problems = _problems(data)  # what W keeps and the loss are a graph's too
    assert sorted(p.split(":")[0] for p in problems) == ["layers[1].saved_input_bytes"]
    assert all("chain profile only" in p and "drop it, or the edges" in p for p in problems)
