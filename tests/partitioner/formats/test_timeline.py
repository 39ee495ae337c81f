from pathlib import Path

import pytest

from partitioner.formats.timeline import (
    Event,
    Timeline,
    TraceError,
    load_chrome_trace,
    save_chrome_trace,
)
from partitioner.schedule.ir import Action


def _tl() -> Timeline:
    return Timeline(2, (
        Event(Action("F", 0, 0), 10.0, 11.0, 100.0), Event(Action("SF", 0, 0), 11.0, 11.5),
        Event(Action("F", 1, 0), 11.5, 12.5, 50.0), Event(Action("B", 1, 0), 12.5, 14.5, 0.0),
        Event(Action("B", 0, 0), 15.0, 17.0, 20.0)), kind="measured", meta={"plan": "x"})


def test_figures() -> None:
    tl = _tl()
    assert tl.step_ms == 7.0
    assert tl.stage_busy_ms() == [3.0, 3.0]  # the send is not compute
    assert tl.bubble_fraction == pytest.approx(1 - 6.0 / 14.0)
    assert tl.stage_peak_bytes() == [100.0, 50.0]


def test_chrome_trace_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    save_chrome_trace(_tl(), path)
    back = load_chrome_trace(path)
    assert back.kind == "measured" and back.stages == 2 and back.meta == {"plan": "x"}
    assert back.step_ms == pytest.approx(7.0)
    assert back.stage_busy_ms() == pytest.approx([3.0, 3.0])
    names = {e["args"]["name"] for e in _tl().to_chrome_trace()["traceEvents"] if e["ph"] == "M"}
    assert {"stage 0", "stage 1"} <= names


def test_bad_trace_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'traceEvents'"):
        load_chrome_trace(tmp_path / "a.json")
    with pytest.raises(TraceError, match="does not exist"):
        load_chrome_trace(tmp_path / "b.json")


def _v_shaped() -> Timeline:
    """Two ranks, stages 0 and 3 on rank 0, 1 and 2 on rank 1, with I and W actions."""
    return Timeline(4, (
        Event(Action("F", 0, 0), 0.0, 1.0, 10.0), Event(Action("F", 1, 0), 1.0, 2.0),
        Event(Action("F", 2, 0), 2.0, 3.0), Event(Action("F", 3, 0), 3.0, 4.0),
        Event(Action("I", 3, 0), 4.0, 5.0), Event(Action("W", 3, 0), 5.0, 6.0),
        Event(Action("I", 2, 0), 5.0, 6.0), Event(Action("W", 2, 0), 6.0, 7.0)),
        placement=(0, 1, 1, 0))


def test_ranks_hold_several_stages_and_the_trace_has_a_track_per_rank(tmp_path: Path) -> None:
    tl = _v_shaped()
    assert tl.ranks == 2 and tl.rank_of == (0, 1, 1, 0)
    assert tl.stage_busy_ms() == [1.0, 1.0, 3.0, 3.0]  # I and W are compute
    assert tl.bubble_fraction == pytest.approx(1 - 8.0 / (2 * 7.0))  # two ranks, not four
    trace = tl.to_chrome_trace()
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"]
    assert names == ["rank 0 (stages 0, 3)", "rank 1 (stages 1, 2)"]
    xs = {e["args"]["action"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert (xs["3W0"]["tid"], xs["3W0"]["name"], xs["3W0"]["cat"]) == (0, "W0 (stage 3)", "W")
    assert xs["2I0"]["tid"] == 1
    path = tmp_path / "v.json"
    save_chrome_trace(tl, path)
    back = load_chrome_trace(path)
    assert back.placement == (0, 1, 1, 0) and back.meta == {}
    assert back.stage_busy_ms() == pytest.approx(tl.stage_busy_ms())
    data = tl.to_chrome_trace()
    data["otherData"]["placement"] = [0, 2, 2, 0]
    with pytest.raises(TraceError, match="leaves ranks without a stage"):
        Timeline.from_chrome_trace(data)
    data["otherData"]["placement"] = [0, 1]
    with pytest.raises(TraceError, match="one rank per stage"):
        Timeline.from_chrome_trace(data)
