"""Profiles without the device: the meta-device profiler against the measured H200 profiles.

    python tools/bench_meta.py                        # the checks below, printed
    python tools/bench_meta.py --write-h200           # also refit the H200 work figures
    python tools/bench_meta.py --big llama2-7b --big-sizes 1,2   # a quick look at one shape

1. Bytes: the three shipped H200 profiles' models (built-in gpt2-medium, gpt-1.3b, resnet50,
   bf16) counted on the meta device, every byte field of every layer at every size against the
   measured profile (the largest relative difference).
2. Times, leave one out: the device model's work figures (``partitioner.cost.worktime``)
   fitted on two of the three profiles' per-layer alone times, the third's predicted: the
   median |error| per micro-batch size; then fitted on all three (``--write-h200`` writes
   those into ``profiles/devices/h200.json``).
3. Whole steps: gpt-1.3b profiled on meta with the figures fitted on the other two, its ten
   measured H200 steps (``profiles/h200/steps``) predicted through the shipped device model.
4. Large shapes: llama2-7b, llama2-70b and gpt3-175b profiled on meta for the H200 (the wall
   time and this process's peak resident memory for each), and ``partition-model search`` of
   each on 8 nodes of 8 H200s (its time and best plan).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from executor.profiling.meta import MetaCounts, count_layers
from executor.profiling.metaprofile import meta_profile, pass_work
from executor.workloads.models import build_model
from partitioner.cost.worktime import WORK_BOUNDS, alone_ms, fit_work_figures
from partitioner.formats.device import DeviceModel, load_device_model, save_device_model
from partitioner.formats.profile import Profile, load_profile, save_profile
from partitioner.formats.steps import load_steps
from partitioner.simulator.devicefit import predict_steps

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("gpt2-medium", "gpt-1.3b", "resnet50")
BYTE_FIELDS = ("in_bytes", "out_bytes", "saved_bytes")


def _counts(name: str, prof: Profile) -> MetaCounts:
    w = build_model(name, max(prof.microbatch_sizes), device="meta")
    return count_layers(w.model, w.sample, prof.microbatch_sizes, prof.dtype)


def _bytes_check(counts: MetaCounts, prof: Profile) -> float:
    worst = 0.0
    for lay, ref in zip(counts.layers, prof.layers, strict=True):
        pairs = [(lay.param_bytes, ref.param_bytes)]
        pairs += [(a, b) for f in BYTE_FIELDS
                  for a, b in zip(getattr(lay, f), getattr(ref, f), strict=True)]
        worst = max([worst, *(abs(a - b) / b for a, b in pairs if b)])
    return worst


def _samples(counts: MetaCounts, prof: Profile) -> tuple[list, list[bool], list[float], list]:
    works, backward, measured, tags = [], [], [], []
    for lay, ref in zip(counts.layers, prof.layers, strict=True):
        for j, b in enumerate(prof.microbatch_sizes):
            for key, ms in (("fwd", ref.fwd_ms), ("bwd", ref.bwd_ms)):
                works.append(getattr(lay, key)[j])
                backward.append(key == "bwd")
                measured.append(ms[j])
                tags.append(b)
    return works, backward, measured, tags


def _fit(data: dict[str, tuple], names: list[str], base: DeviceModel, dtype: str) -> DeviceModel:
    works, backward, measured = [], [], []
    for n in names:
        works += data[n][0]
        backward += data[n][1]
        measured += data[n][2]
    return fit_work_figures(pass_work(works, backward), np.array(measured), base, dtype)


def _errors(data: tuple, dm: DeviceModel, dtype: str) -> dict[int, float]:
    works, backward, measured, tags = data
    pred = alone_ms(pass_work(works, backward), dm, dtype)
    by: dict[int, list[float]] = {}
    for p, m, b in zip(pred, measured, tags, strict=True):
        if m > 0:
            by.setdefault(b, []).append(abs(p - m) / m)
    return {b: statistics.median(v) for b, v in by.items()}


def _figures(dm: DeviceModel) -> str:
    return ", ".join(f"{k} {getattr(dm, k):.4g}" for k in WORK_BOUNDS)


def _big(name: str, sizes: list[int], target: DeviceModel, out: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    w = build_model(name, max(sizes), device="meta")
    prof = meta_profile(w.model, w.sample, sizes, target, name, loss=(w.loss_fn, w.target))
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = out / f"{name}.json"
    save_profile(prof, path)
    params = sum(lay.param_bytes for lay in prof.layers) / 2 / 1e9
    print(f"{name}: {len(prof.layers)} layers, {params:.1f}B parameters, sizes "
          f"{','.join(map(str, sizes))}: profiled on meta in {took:.1f} s, peak resident "
          f"memory {peak / 2**20:.2f} GiB (before: {before / 2**20:.2f} GiB)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "partitioner.cli", "search", "--profile",
                          str(path), "--nodes", "8", "--devices-per-node", "8", "-B", "512",
                          "--top", "3"], capture_output=True, text=True, check=False)
    print(f"  search on 8 x 8 H200, B=512: {time.perf_counter() - t0:.1f} s, exit "
          f"{res.returncode}")
    print("  " + "\n  ".join(res.stdout.strip().splitlines()[:12] or res.stderr.splitlines()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-h200", action="store_true",
                   help="write the work figures fitted on all three into profiles/devices")
    p.add_argument("--big", action="append", default=None,
                   help="large shapes to profile and search (default: all three)")
    p.add_argument("--big-sizes", default="1,2,4", help="their micro-batch sizes")
    args = p.parse_args()
    h200 = load_device_model("h200")
    data, counts = {}, {}
    print("1. bytes on meta against the measured H200 profiles (bf16)")
    for name in NAMES:
        prof = load_profile(f"h200/{name}")
        t0 = time.perf_counter()
        counts[name] = _counts(name, prof)
        print(f"  {name}: largest relative difference of any byte field "
              f"{100 * _bytes_check(counts[name], prof):.3f}% "
              f"({len(prof.layers)} layers x {len(prof.microbatch_sizes)} sizes; counted in "
              f"{time.perf_counter() - t0:.1f} s)")
        data[name] = _samples(counts[name], prof)
    print("2. per-layer alone times, leave one out (median |error| per micro-batch size)")
    held_out: dict[str, DeviceModel] = {}
    for name in NAMES:
        fit = held_out[name] = _fit(data, [n for n in NAMES if n != name], h200, "bfloat16")
        errs = _errors(data[name], fit, "bfloat16")
        print(f"  {name} from the other two: " + ", ".join(
            f"b={b} {100 * e:.1f}%" for b, e in errs.items()) + f"  [{_figures(fit)}]")
    full = _fit(data, list(NAMES), h200, "bfloat16")
    print(f"  all three: {_figures(full)}")
    for name in NAMES:
        print(f"    in sample, {name}: " + ", ".join(
            f"b={b} {100 * e:.1f}%" for b, e in _errors(data[name], full, "bfloat16").items()))
    if args.write_h200:
        path = ROOT / "profiles" / "devices" / "h200.json"
        save_device_model(replace(full, fit=h200.fit), path)
        print(f"  wrote {path}")
    print("3. gpt-1.3b's measured steps from its meta profile (figures from the other two)")
    steps = load_steps("h200/steps/gpt-1.3b")
    sizes = sorted({-(-steps.global_batch // s.microbatches) for s in steps.steps})
    w = build_model("gpt-1.3b", max(sizes), device="meta")
    prof = meta_profile(w.model, w.sample, sizes, held_out["gpt-1.3b"], "gpt-1.3b")
    for f in predict_steps(prof, steps, h200):
        print(f"  M={f.step.microbatches:>2} recompute {'on ' if f.step.recompute else 'off'}: "
              f"measured {f.step.step_ms:7.1f} ms, predicted {f.predicted_ms:7.1f} "
              f"({100 * f.error:+.1f}%)")
    print("4. large shapes on meta, for the H200")
    big_sizes = [int(x) for x in args.big_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.big or ["llama2-7b", "llama2-70b", "gpt3-175b"]:
            _big(name, big_sizes, load_device_model("h200") if not args.write_h200 else full,
                 Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
