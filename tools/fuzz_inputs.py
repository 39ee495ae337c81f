"""Fuzz every input the project reads: profiles, plans, traces and command lines.

    python tools/fuzz_inputs.py --cases 10000          # the full run
    python tools/fuzz_inputs.py --cases 500 --quiet    # what `make test` runs

Each case mutates a valid input (wrong types, missing and extra keys, NaN, inf, negative, huge
and tiny numbers, empty and unicode strings, truncated JSON, overlapping and out-of-range
layers) and feeds it to what reads it: the profile and plan loaders and the `partition-model`
commands (plan, search, simulate, compare, profile, run), and the executor (`Pipeline` on a
small model, whose loss must then equal the plain model's). A case ends in one of:

- a clean error: exit status 2 with one message and no traceback (or the loader's own error);
- ok: it ran, and what it printed holds no NaN or negative number, what it wrote reads back;
- a crash: anything else (a traceback, a hang over the timeout, a wrong result).

Cases run in worker processes (so a hang can be killed with whatever it started); the last line
reads ``cases=N clean_errors=E ok=S crashes=C`` and the exit status is 1 when C > 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

WEIRD: list[Any] = [None, True, False, 0, -1, 1, 2, 1e308, -1e308, 1e-308, math.nan, math.inf,
                    -math.inf, "", "ü✓", "NaN", "inf", "1e9", [], {}, [1, 2, 3], 2**63, -2**63,
                    3.5, 10**30, "0", {"x": 1}]
WEIRD_TEXT = ["", "nan", "inf", "-inf", "-1", "0", "1e308", "1e-308", "ü", "٣", "1,2,,3", " 4 ",
              "0x10", "1_000", "+3", "3.0", "9" * 30, "/dev/null", "/tmp", "a,b", "-0", "1e-3",
              "99999999", "cuda:9", "meta", "tpu", "1,1,1", ",", "0.5", "2**40"]
NEG = re.compile(r"(?<![\w.\-+*/])-(?:\d|inf)")  # a negative number standing alone
NAN = re.compile(r"\bnan\b", re.IGNORECASE)


class CaseTimeout(Exception):
    pass


# -- mutations of decoded JSON --------------------------------------------------------------------

def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:12]):  # long lists: their first entries stand for the rest
            out += _paths(v, (*path, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate(data: Any, rng: random.Random, plausible: bool = False) -> Any:
    """One random change somewhere in the JSON tree (``plausible``: a number changed into
    another number a loader may accept, so that the case reaches what comes after it)."""
    data = copy.deepcopy(data)
    paths = _paths(data)[1:] or [()]
    if plausible:
        paths = [p for p in paths if p and isinstance(_get(data, p), (int, float))
                 and not isinstance(_get(data, p), bool)] or paths
    path = rng.choice(paths)
    if not path:
        return rng.choice(WEIRD)
    parent, key = _get(data, path[:-1]), path[-1]
    value = parent[key]
    op = 8 if plausible else rng.randrange(10)
    if op >= 8 and isinstance(value, (int, float)) and not isinstance(value, bool):
        # a plausible number instead (zero, smaller, larger, the same type): these get past
        # the loaders and into the solvers, the simulator and the executor
        new = rng.choice([0, value / 2, value * 2, value + 1, abs(value) * rng.random()])
        parent[key] = type(value)(new) if isinstance(value, int) else float(new)
    elif op == 0:
        parent[key] = rng.choice(WEIRD)
    elif op == 1 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, list):
        parent.pop(key)
    elif op == 2 and isinstance(parent, dict):  # an extra key, often a near miss of a real one
        parent[rng.choice([str(key)[:-1], str(key) + "s", "extra_" + str(key), "note"])] = value
    elif op == 3 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = value * rng.choice([-1, 0, 1e-300, 1e300, 1.5, 1e9, -1e-9])
    elif op == 4 and isinstance(value, list) and value:
        rng.shuffle(value)
        value[:] = value[: rng.randrange(len(value) + 1)] + value[: rng.randrange(2)]
    elif op == 5 and isinstance(value, str):
        parent[key] = rng.choice(["", "ü" * 3, value * 50, value.upper(), "\u202e" + value])
    elif op == 6 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(value))
    else:
        parent[key] = rng.choice(WEIRD)
    return data


def write_json(data: Any, path: Path, rng: random.Random) -> None:
    text = json.dumps(data, allow_nan=True)
    if rng.random() < 0.08:  # truncated, or not UTF-8
        text = text[: rng.randrange(len(text) + 1)]
    raw = text.encode()
    if rng.random() < 0.02:
        raw = b"\xff\xfe" + raw
    path.write_bytes(raw)


# -- the valid inputs the cases start from --------------------------------------------------------

class Seeds:
    """Valid profiles, plans and traces, made once per worker."""

    def __init__(self, tmp: Path) -> None:
        import dataclasses

        from executor.runtime.pipeline import manual_plan
        from partitioner import (
            CostModel,
            load_profile,
            make_plan,
            save_chrome_trace,
            simulate,
        )
        from partitioner.formats.plan import plan_to_dict
        from partitioner.formats.profile import profile_to_dict

        self.tmp = tmp
        chain = load_profile("h200/gpt2-medium")
        graph = load_profile("pipedream/alexnet")  # a small graph profile
        small = dataclasses.replace(chain, layers=chain.layers[:6], model="gpt2-medium-6")
        self.profiles = [profile_to_dict(p) for p in (chain, graph, small)]
        self.profile_files = []
        for i, data in enumerate(self.profiles):
            path = tmp / f"seed-profile-{i}.json"
            path.write_text(json.dumps(data))
            self.profile_files.append(str(path))
        plan = make_plan(CostModel(small, 8, 4, stages=2))
        gplan = make_plan(CostModel(graph, 4, 2, stages=3), solver="ilp", time_limit_s=5)
        replicated = make_plan(CostModel(small, 8, 2, stages=2, replicas=2, shard_optimizer=True))
        self.plans = [plan_to_dict(plan), plan_to_dict(gplan),
                      plan_to_dict(manual_plan([0, 2, 4, 6], 4, 8, "1f1b", "except_last")),
                      {**plan_to_dict(replicated), "layout": [[0, 2], [1, 3]]}]
        self.plan_profiles = [self.profile_files[2], self.profile_files[1], self.profile_files[2],
                              self.profile_files[2]]
        res = simulate(CostModel(small, 8, 4, stages=2), plan.layer_ranges())
        assert res.timeline is not None
        self.trace = res.timeline.to_chrome_trace()
        save_chrome_trace(res.timeline, tmp / "seed-trace.json")
        self.plan_file = tmp / "seed-plan.json"
        self.plan_file.write_text(json.dumps(self.plans[0]))
        self.run_plan = tmp / "seed-run-plan.json"
        self.run_plan.write_text(json.dumps(plan_to_dict(manual_plan([0, 3, 7], 2, 4))))


def toy_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4), nn.Tanh())


# -- the cases ------------------------------------------------------------------------------------

def cli(argv: list[str]) -> tuple[str, str]:
    """Run `partition-model argv` in-process: ("ok"|"clean", detail) or raise for a crash."""
    from partitioner.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors (and --help)
            code = exc.code if isinstance(exc.code, int) else 2
    text, errors = out.getvalue(), err.getvalue()
    if "Traceback" in errors or "Traceback" in text:
        raise AssertionError(f"traceback printed: {errors[-400:]}")
    if code == 2:
        if "error" not in errors:
            raise AssertionError(f"exit 2 without a message: {errors[-200:]!r}")
        lines = errors.strip().splitlines()
        return "clean", " ".join(line.strip() for line in lines[-2:])[:160]
    if code != 0:
        raise AssertionError(f"exit status {code}: {errors[-300:]}")
    bad = NAN.search(text) or (NEG.search(text) if argv[:1] != ["compare"] else None)
    if bad:
        line = next(ln for ln in text.splitlines() if bad.group(0) in ln)
        raise AssertionError(f"printed {bad.group(0)!r}: {line[:200]}")
    return "ok", text.strip().splitlines()[-1][:120] if text.strip() else ""


def profile_case(seeds: Seeds, rng: random.Random, path: Path) -> tuple[str, str]:
    data = seeds.profiles[rng.randrange(len(seeds.profiles))]
    plausible = rng.random() < 0.5  # half the cases get past the loader, into the solvers
    for _ in range(rng.randint(1, 4) * (4 if plausible else 1)):
        data = mutate(data, rng, plausible)
    write_json(data, path, rng)
    argv = ["--profile", str(path), "--stages", str(rng.choice([1, 2, 3, 5])),
            "--microbatches", str(rng.choice([1, 2, 4])), "--global-batch", "4",
            "-o", str(path.with_suffix(".plan.json"))]
    if rng.random() < 0.3:
        argv = ["search", "--profile", str(path), "--devices", "3", "--global-batch", "4",
                "--microbatches", "1,2,4", "--time-limit", "2"]
    elif rng.random() < 0.3:
        argv += ["--solver", rng.choice(["dp", "ilp"]), "--time-limit", "2"]
    if rng.random() < 0.4:
        argv += ["--memory-limit", rng.choice(["1B", "1KiB", "100MiB", "1GiB", "inf", "9TiB"]),
                 "--recompute", rng.choice(["never", "always", "except_last"]),
                 "--schedule" if argv[0] != "search" else "--schedules",
                 rng.choice(["gpipe", "1f1b"])]
    result = cli(argv)
    if result[0] == "ok" and argv[0] != "search":
        from partitioner import load_plan

        load_plan(path.with_suffix(".plan.json"))  # what it wrote reads back
    return result


def plan_case(seeds: Seeds, rng: random.Random, path: Path) -> tuple[str, str]:
    i = rng.randrange(len(seeds.plans))
    data = seeds.plans[i]
    if rng.random() < 0.4 and isinstance(data.get("stages"), list):  # overlaps, gaps, ranges
        data = copy.deepcopy(data)
        for stage in data["stages"]:
            a = rng.randint(-2, 8)
            stage["layers"] = [a, a + rng.randint(-1, 5)]
    for _ in range(rng.randint(0 if i == 2 else 1, 3)):
        data = mutate(data, rng)
    if i == 2:  # the executor's own plan: the Pipeline must refuse it or train exactly
        return pipeline_case(data)
    write_json(data, path, rng)
    return cli(["simulate", str(path), "--profile", seeds.plan_profiles[i]])


def pipeline_case(data: Any) -> tuple[str, str]:
    import torch

    from executor import Pipeline

    model, plain = toy_model(), toy_model()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 4)
    try:
        pipe = Pipeline(model, data)
        loss = pipe.train_step(x, y, torch.nn.functional.mse_loss)
    except (ValueError, TypeError) as exc:
        return "clean", str(exc).splitlines()[0][:160]
    want = torch.nn.functional.mse_loss(plain(x), y)
    want.backward()  # type: ignore[no-untyped-call]
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters(), strict=True)]
    if not torch.allclose(loss, want.detach(), rtol=1e-5, atol=1e-7) or not all(
            g is not None and h is not None and torch.allclose(g, h, rtol=1e-4, atol=1e-6)
            for g, h in grads):
        raise AssertionError(f"wrong result: loss {float(loss)} vs plain {float(want)}")
    return "ok", f"trained, loss {float(loss):.5f}"


def trace_case(seeds: Seeds, rng: random.Random, path: Path) -> tuple[str, str]:
    data = seeds.trace
    for _ in range(rng.randint(1, 3)):
        data = mutate(data, rng)
    write_json(data, path, rng)
    pair = [str(seeds.tmp / "seed-trace.json"), str(path)]
    return cli(["compare", *(pair if rng.random() < 0.5 else pair[::-1])])


COMMANDS = {
    "plan": ["--profile", "h200/gpt2-medium", "--stages", "4", "--microbatches", "4",
             "--global-batch", "16", "--memory-limit", "80GiB", "--bandwidth", "25",
             "--latency-ms", "0.1", "--recompute", "always", "--compute-scale", "1.2",
             "--action-ms", "0.1", "--message-ms", "0.2", "--stage-devices",
             "cuda:0,cuda:1,cuda:2,cuda:3", "--optimizer", "sgd", "--link", "pcie"],
    "search": ["search", "--profile", "h200/gpt2-medium", "--devices", "3", "--global-batch",
               "8", "--microbatches", "1,2,4", "--recompute", "never,always", "--schedules",
               "gpipe", "--memory-limit", "20GiB", "--top", "3"],
    "simulate": ["simulate", "{plan}", "--profile", "{profile}", "--devices", "1",
                 "--microbatches", "2", "--global-batch", "8", "--bandwidth", "10",
                 "--optimizer-ms", "1", "--schedule", "1f1b", "--recompute", "never"],
    "compare": ["compare", "{trace}", "{trace}"],
    "profile": ["profile", "--model", "gpt-tiny", "--microbatch-sizes", "1", "--warmup", "0",
                "--repeat", "1", "--threads", "1", "--timing", "layer", "--batch", "2",
                "--split-backward", "off"],  # the split doubles the timed passes: a fuzzed
    # --repeat 1_000 (a valid 1000) then takes 13 s, past the hang limit, for no new input path
    "run": ["run", "--plan", "{run_plan}", "--steps", "1", "--timeout-s", "20", "--device",
            "cpu"],
}
WEIGHTS = {"plan": 30, "search": 10, "simulate": 20, "compare": 8, "profile": 2, "run": 1}


def argv_case(seeds: Seeds, rng: random.Random, path: Path) -> tuple[str, str]:
    name = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    fill = {"{plan}": str(seeds.plan_file), "{profile}": seeds.profile_files[2],
            "{trace}": str(seeds.tmp / "seed-trace.json"), "{run_plan}": str(seeds.run_plan)}
    argv = [fill.get(a, a) for a in COMMANDS[name]]
    for _ in range(rng.randint(1, 2)):
        values = [i for i, a in enumerate(argv) if i > 0 and not a.startswith("-")
                  and argv[i - 1].startswith("-")]
        op = rng.randrange(8)
        if op >= 6 and values:  # a plausible value instead: a small number, or one from the list
            argv[rng.choice(values)] = str(rng.choice([1, 2, 3, 5, 8, 16, 64, 1000]))
        elif op <= 2 and values:  # a weird value
            argv[rng.choice(values)] = rng.choice(WEIRD_TEXT)
        elif op == 3 and values:  # an option without its value, or gone altogether
            i = rng.choice(values)
            del argv[i - (rng.random() < 0.5): i + 1]
        elif op == 4:
            argv.insert(rng.randrange(1, len(argv) + 1), rng.choice(["--bogus", "-x", "--", "-"]))
        else:
            argv = argv + argv[-2:]  # an option given twice
    if name in ("profile", "run") and rng.random() < 0.7:  # cheap, but not too often valid
        argv.insert(1, rng.choice(["--steps", "--repeat"]) if name == "run" else "--warmup")
        argv.insert(2, rng.choice(WEIRD_TEXT))
    return cli(argv)


KINDS = {"profile": (profile_case, 30), "plan": (plan_case, 30), "trace": (trace_case, 10),
         "argv": (argv_case, 30)}


# -- workers --------------------------------------------------------------------------------------

def _alarm(_signum: int, _frame: Any) -> None:
    raise CaseTimeout


def worker(conn: Any, seed: int, timeout_s: float) -> None:
    os.setsid()  # the parent kills this group on a hang: the worker and what it started
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="gpipe-fuzz-") as tmp:
        seeds = Seeds(Path(tmp))
        signal.signal(signal.SIGALRM, _alarm)
        conn.send("ready")
        while True:
            index = conn.recv()
            if index is None:
                return
            rng = random.Random(seed * 1_000_003 + index)
            kind = rng.choices(list(KINDS), weights=[w for _, w in KINDS.values()])[0]
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                outcome, detail = KINDS[kind][0](seeds, rng, Path(tmp) / f"case-{index}.json")
            except CaseTimeout:
                conn.send((index, kind, "crash", f"hang: over {timeout_s:g} s", timeout_s))
                os.killpg(0, signal.SIGKILL)  # this worker and what the case started; the
                # parent starts a new worker
            except BaseException as exc:
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                outcome, detail = "crash", "".join(tb[-3:])[-600:]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            conn.send((index, kind, outcome, detail, time.perf_counter() - start))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--timeout-s", type=float, default=20.0,
                   help="a case longer is a hang (default 20: a case that trains on two "
                        "spawned ranks takes 5 s alone, over 10 s on a loaded machine)")
    p.add_argument("--quiet", action="store_true", help="print only crashes and the totals")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    counts: Counter[str] = Counter()
    kinds: Counter[tuple[str, str]] = Counter()
    todo, crashes, started = list(range(args.cases))[::-1], [], time.perf_counter()
    workers: list[Any] = []

    def start() -> Any:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, args.seed, args.timeout_s))
        proc.start()
        assert parent.recv() == "ready"
        return [proc, parent, None, 0.0]

    workers = [start() for _ in range(max(1, args.jobs))]
    while todo or any(w[2] is not None for w in workers):
        for slot, w in enumerate(workers):
            if w[2] is None and not w[0].is_alive():
                workers[slot] = w = start()
            if w[2] is None and todo:
                w[2], w[3] = todo.pop(), time.monotonic()
                w[1].send(w[2])
            elif w[2] is not None and w[1].poll(0.01):
                try:
                    index, kind, outcome, detail, secs = w[1].recv()
                except (EOFError, OSError):  # it died without a word: the case crashed it
                    index, kind, outcome, detail, secs = w[2], "?", "crash", "worker died", 0.0
                    w[0].join(5)
                counts[outcome] += 1
                kinds[kind, outcome] += 1
                if outcome == "crash":
                    crashes.append(f"case {index} ({kind}): {detail}")
                    print(crashes[-1], flush=True)
                elif not args.quiet and index % 500 == 0:
                    print(f"case {index} ({kind}, {secs:.2f} s): {outcome}: {detail}", flush=True)
                w[2] = None
                if detail.startswith("hang") or detail == "worker died":
                    w[0].join(10)  # it killed itself (or died): never hand it the next case
                    workers[slot] = start()
            elif w[2] is not None and time.monotonic() - w[3] > args.timeout_s + 20:
                counts["crash"] += 1  # the worker did not even answer: kill it and its children
                crashes.append(f"case {w[2]}: hang (worker unresponsive)")
                print(crashes[-1], flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w[0].pid, signal.SIGKILL)
                workers[slot] = start()
    for w in workers:
        w[1].send(None)
        w[0].join(10)
    if not args.quiet:
        for (kind, outcome), n in sorted(kinds.items()):
            print(f"  {kind:8s} {outcome:6s} {n}")
        print(f"{time.perf_counter() - started:.0f} s")
    print(f"cases={args.cases} clean_errors={counts['clean']} ok={counts['ok']} "
          f"crashes={counts['crash']}")
    return 1 if counts["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
