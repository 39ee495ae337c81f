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
