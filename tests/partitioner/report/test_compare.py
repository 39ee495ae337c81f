from dataclasses import replace
from pathlib import Path

import pytest

from partitioner.cli.main import main
from partitioner.formats.timeline import Event, Timeline, save_chrome_trace
from partitioner.report.compare import compare_timelines, relative_error
from partitioner.schedule.ir import Action


def _tl(scale: float, stages: int = 2) -> Timeline:
    events = []
    t = 0.0
    for k in range(stages):
        events.append(Event(Action("F", k, 0), t, t + 1.0 * scale))
        t += 1.0 * scale
    for k in reversed(range(stages)):
        events.append(Event(Action("B", k, 0), t, t + 2.0 * scale))
        t += 2.0 * scale
    return Timeline(stages, tuple(events))


def test_relative_error() -> None:
    assert relative_error(9.0, 10.0) == pytest.approx(-0.1)
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.0, 0.0) == float("inf")


def test_comparison_figures() -> None:
    c = compare_timelines(_tl(1.0), _tl(1.25))
    assert c.step_error == pytest.approx(1 / 1.25 - 1)
    assert c.predicted.stage_busy_ms() == pytest.approx([0.8 * b for b in c.measured.stage_busy_ms()])
    text = c.report()
    assert "step_ms" in text and "-20.0%" in text and "stage 1 busy_ms" in text
    with pytest.raises(ValueError, match="K=2 stages but the measured one has K=3"):
        compare_timelines(_tl(1.0), _tl(1.0, stages=3))


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_chrome_trace(_tl(1.0), tmp_path / "p.json")
    save_chrome_trace(_tl(2.0), tmp_path / "m.json")
    assert main(["compare", str(tmp_path / "p.json"), str(tmp_path / "m.json")]) == 0
    assert "-50.0%" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "p.json"), str(tmp_path / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_memory_rows_when_both_timelines_carry_it() -> None:
    pred = replace(_tl(1.0), meta={"stage_activation_peak_bytes": [1000.0, 2000.0],
                                   "stage_peak_bytes": [5000.0, 6000.0]})
    meas = replace(_tl(1.0), kind="measured",
                   meta={"stage_activation_peak_bytes": [1000, 2500]})
    c = compare_timelines(pred, meas)
    assert c.memory_errors == pytest.approx([0.0, -0.2])
    text = c.report()
    assert "stage 1 activations peak" in text and "-20.0%" in text
    assert "allocated" not in text  # no CUDA figure measured
    cuda = replace(meas, meta={**meas.meta, "rank_allocated_peak_bytes": [4000, 6000]})
    assert "rank 0 allocated peak" in compare_timelines(pred, cuda).report()
    assert compare_timelines(_tl(1.0), meas).memory_errors == []  # not predicted: no rows


def test_memory_figures_that_are_not_byte_counts_are_named() -> None:
    pred = replace(_tl(1.0), meta={"stage_activation_peak_bytes": [1000.0, float("nan")]})
    meas = replace(_tl(1.0), kind="measured", meta={"stage_activation_peak_bytes": [1, 2]})
    with pytest.raises(ValueError, match=r"predicted trace's stage_activation_peak_bytes\[1\] "
                                         r"is nan; a byte count must be a finite number >= 0"):
        compare_timelines(pred, meas).report()
    bad = replace(meas, meta={"stage_activation_peak_bytes": "big"})
    with pytest.raises(ValueError, match="measured trace's stage_activation_peak_bytes is 'big'"):
        compare_timelines(pred, bad).memory()
    odd = replace(pred, meta={"stage_peak_bytes": [float("inf")]})
    assert compare_timelines(odd, _tl(1.0)).memory() == []  # nothing measured: not read
