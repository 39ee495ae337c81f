"""Profiles made without the device: exact bytes, modelled times, the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from executor.profiling.meta import count_layers
from executor.profiling.metaprofile import meta_profile, pass_work
from executor.profiling.profiler import profile_model
from executor.workloads.models import build_model
from partitioner.cli.main import main
from partitioner.cost.worktime import alone_ms
from partitioner.formats.device import load_device_model
from partitioner.formats.profile import load_profile, save_profile

BYTES = ("in_bytes", "out_bytes", "saved_bytes", "saved_input_bytes", "saved_output_bytes",
         "held_for_w_bytes", "held_for_w_input_bytes")


def test_a_meta_profile_has_the_profilers_bytes_and_the_models_times(tmp_path: Path) -> None:
    real_w = build_model("gpt-tiny", batch=2)
    real = profile_model(real_w.model, real_w.sample, [1, 2], "cpu", warmup=0, repeat=1,
                         threads=1, loss=(real_w.loss_fn, real_w.target))
    w = build_model("gpt-tiny", batch=2, device="meta")
    target = load_device_model("h100")
    prof = meta_profile(w.model, w.sample, [1, 2], target, "gpt-tiny", dtype="float32",
                        loss=(w.loss_fn, w.target))
    for got, want in zip(prof.layers, real.layers, strict=True):
        assert got.param_bytes == want.param_bytes
        for key in BYTES:
            assert getattr(got, key) == getattr(want, key), (got.name, key)
    assert prof.loss == real.loss
    assert (prof.device.name, prof.device.memory_bytes) == ("NVIDIA H100 80GB HBM3",
                                                            target.memory_bytes)
    # every time is the work model's on the counted kernels
    counts = count_layers(w.model, w.sample, [1, 2], "float32")
    for key, field in (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("bwd_input", "bwd_input_ms"),
                       ("bwd_weight", "bwd_weight_ms")):
        works = [getattr(lay, key)[j] for lay in counts.layers for j in range(2)]
        want_ms = alone_ms(pass_work(works, [key != "fwd"] * len(works)), target, "float32")
        got_ms = [x for lay in prof.layers for x in getattr(lay, field)]
        assert got_ms == pytest.approx(want_ms.tolist())
    path = tmp_path / "p.json"
    save_profile(prof, path)
    assert load_profile(path) == dataclasses.replace(prof)


def test_the_largest_shapes_profile_on_meta_in_little_memory() -> None:
    w = build_model("llama2-7b", batch=1, device="meta")
    prof = meta_profile(w.model, w.sample, [1], load_device_model("h200"), "llama2-7b",
                        loss=(w.loss_fn, w.target))
    assert len(prof.layers) == 34
    assert sum(lay.param_bytes for lay in prof.layers) == 2 * 6_738_415_616  # bf16
    block = prof.layers[1]
    tokens, d, ffn = 4096, 4096, 11008
    linear = 2 * tokens * (4 * d * d + 3 * d * ffn)  # q, kv (2d), o; gate, up, down
    attention = 4 * tokens * tokens * d  # QK^T and AV, whole (causal counted whole)
    peak = dict(load_device_model("h200").peak_tflops)["bfloat16"] * 1e9
    assert block.fwd_ms[0] > (linear + attention) / peak  # no faster than the peak allows
    assert block.fwd_ms[0] < 3 * (linear + attention) / peak


def test_profile_device_meta_from_the_command_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny.json"
    assert main(["profile", "--model", "gpt-tiny", "--microbatch-sizes", "1,2", "--device",
                 "meta", "--target", "a100", "-o", str(out)]) == 0
    prof = load_profile(out)
    assert prof.device.name == "NVIDIA A100-SXM4-80GB" and prof.dtype == "bfloat16"
    assert prof.how.startswith("Made without the device")
    plan = tmp_path / "plan.json"
    assert main(["--profile", str(out), "-K", "2", "-M", "2", "-B", "2", "-o", str(plan)]) == 0
    assert "device model a100" in capsys.readouterr().out  # auto: the target's device model
    spec = tmp_path / "spec.json"
    bad = {"format": "gpipe-device/1", "name": "x", "host_forward": 1, "host_backward": 1,
           "host_recompute": 1, "device_scale": 1, "small_work_exponent": 1,
           "memory_gbps": -5}
    spec.write_text(json.dumps(bad))
    for args, message in (
            (["--device", "meta"], "name it with --target"),
            (["--target", "h100"], "give --device meta with it"),
            (["--device", "meta", "--target", "tpu9"], "--target: device model 'tpu9' is "
                                                       "neither a file"),
            (["--device", "meta", "--target", str(spec)], "$.memory_gbps: -5 is negative")):
        assert main(["profile", "--model", "gpt-tiny", "--microbatch-sizes", "1", *args]) == 2
        assert message in capsys.readouterr().err


def test_a_target_without_the_dtypes_peak_is_refused(tmp_path: Path) -> None:
    w = build_model("gpt-tiny", batch=1, device="meta")
    bf16_only = dataclasses.replace(load_device_model("h200"),
                                    peak_tflops=(("bfloat16", 771.0),))
    with pytest.raises(ValueError, match="has no peak_tflops for 'float16'"):
        meta_profile(w.model, w.sample, [1], bf16_only, "t", dtype="float16")
    no_memory = dataclasses.replace(load_device_model("h200"), memory_gbps=0.0)
    with pytest.raises(ValueError, match="must both be > 0 to time work"):
        meta_profile(w.model, w.sample, [1], no_memory, "t")
    assert np.isfinite(meta_profile(w.model, w.sample, [1], load_device_model("mi300x"), "t")
                       .layers[0].fwd_ms).all()
