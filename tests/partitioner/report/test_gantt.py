"""The PNG Gantt chart: it renders (one panel per timeline), and says how to get matplotlib."""

import struct
import sys
from pathlib import Path

import pytest

from partitioner.cost.model import CostModel
from partitioner.formats.profile import load_profile
from partitioner.formats.timeline import Timeline
from partitioner.report.gantt import PlotUnavailableError, save_gantt_png
from partitioner.simulator.engine import simulate


def _timeline(schedule: str = "gpipe") -> Timeline:
    cm = CostModel(load_profile("h200/gpt2-medium"), 16, 8, stages=4,
                   schedule=schedule)  # type: ignore[arg-type]
    tl = simulate(cm, [(0, 6), (6, 12), (12, 18), (18, 26)]).timeline
    assert tl is not None
    return tl


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_one_and_two_panels(tmp_path: Path) -> None:
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    save_gantt_png([_timeline()], one, ["predicted"])
    save_gantt_png([_timeline(), _timeline("1f1b")], two, ["gpipe", "1f1b"])
    (w1, h1), (w2, h2) = _png_size(one), _png_size(two)
    assert w1 == w2 and h2 > 1.6 * h1  # the second timeline adds a panel below the first


def test_many_stages_stay_a_page_tall(tmp_path: Path) -> None:
    cm = CostModel(load_profile("h200/gpt2-medium"), 64, 32, stages=26)
    tl = simulate(cm, [(k, k + 1) for k in range(26)]).timeline
    assert tl is not None
    save_gantt_png([tl], tmp_path / "wide.png")
    assert _png_size(tmp_path / "wide.png")[1] < 1400


def test_bad_titles_and_missing_matplotlib(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="2 titles given for 1 timelines"):
        save_gantt_png([_timeline()], tmp_path / "x.png", ["a", "b"])
    with pytest.raises(ValueError, match="at least one timeline"):
        save_gantt_png([], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotUnavailableError, match="pip install matplotlib"):
        save_gantt_png([_timeline()], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_rows_per_rank_with_split_backwards(tmp_path: Path) -> None:
    """ZB-V on R=2 ranks draws two rows (stages 0 and 3 share the first), with I and W."""
    cm = CostModel(load_profile("h200/gpt2-medium"), 16, 8, stages=4, schedule="zbv")
    tl = simulate(cm, [(0, 6), (6, 12), (12, 18), (18, 26)]).timeline
    assert tl is not None and tl.ranks == 2
    assert {e.action.kind for e in tl.events} >= {"F", "I", "W"}
    save_gantt_png([tl, _timeline("1f1b")], tmp_path / "zbv.png", ["zbv", "1f1b"])
    save_gantt_png([_timeline("1f1b")], tmp_path / "one.png")
    (w, h), (_, h1) = _png_size(tmp_path / "zbv.png"), _png_size(tmp_path / "one.png")
    assert w > 0 and h > h1
