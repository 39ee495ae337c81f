"""The activation terms against their oracle: the union of the storages a stage's layers save."""

import dataclasses
import random

import numpy as np
import pytest

from partitioner.cost.activations import activation_terms
from partitioner.cost.model import CostModel
from tests.synthetic import make_profile


def _random_chain(rng: random.Random, n: int) -> tuple[list[set[str]], dict[str, int]]:
    """Layer i reads storage out{i-1} (the batch for i = 0), writes out{i}, has internals;
    it saves a random subset of the three kinds; then what the loss saves (entry n). Returns
    what each saves, and the sizes."""
    size = {"batch": rng.randint(1, 50)}
    saves = []
    for i in range(n):
        size[f"out{i}"] = rng.randint(1, 50)
        inner = [f"in{i}.{j}" for j in range(rng.randint(0, 2))]
        for name in inner:
            size[name] = rng.randint(1, 50)
        own = [f"out{i - 1}" if i else "batch", f"out{i}", *inner]
        saves.append({s for s in own if rng.random() < 0.5})
    size["loss.inner"] = rng.randint(1, 50)  # the loss: the model's output, an internal
    saves.append({s for s in (f"out{n - 1}", "loss.inner") if rng.random() < 0.5})
    return saves, size


def test_terms_equal_the_union_of_what_a_stage_holds() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        saves, size = _random_chain(rng, n)
        loss = saves.pop()

        def in_of(i: int) -> str:
            return f"out{i - 1}" if i else "batch"

        def part(i: int, name: str, saves: list[set[str]] = saves,
                 size: dict[str, int] = size) -> float:
            return float(size[name]) if name in saves[i] else 0.0

        terms = activation_terms(
            np.array([sum(size[s] for s in saves[i]) for i in range(n)], dtype=float),
            np.array([part(i, in_of(i)) for i in range(n)]),
            np.array([part(i, f"out{i}") for i in range(n)]),
            np.array([float(size[in_of(i)]) for i in range(n)]),
            (float(sum(size[x] for x in loss)), float(size[f"out{n - 1}"]) if f"out{n - 1}"
             in loss else 0.0))
        for s in range(n):
            for e in range(s + 1, n + 1):
                saved = set().union(*saves[s:e], loss if e == n else set())
                saved -= {"batch"}  # the batch counts per step
                stash = {in_of(s)} - {"batch"}
                union = sum(size[x] for x in saved | stash)
                assert terms.held(s, e, recompute=False) == union
                assert terms.held(s, e, recompute=True) == sum(size[x] for x in stash)
                assert terms.rebuilt(s, e) == sum(size[x] for x in saved - stash)


def test_held_for_w_is_the_union_of_what_the_weight_gradients_keep() -> None:
    """Layer i's deferred linears keep some of its input (the stash, the batch on the first
    stage), internals of its own and output gradients; a stage holds their union from I to W,
    and every figure is its ``forms``' E[end] - S[start]."""
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 7)
        saves, size = _random_chain(rng, n)
        keeps = []
        for i in range(n):
            size[f"grad{i}"] = rng.randint(1, 50)
            own = [f"out{i - 1}" if i else "batch", f"grad{i}", *(x for x in saves[i]
                                                                  if x.startswith("in"))]
            keeps.append({x for x in own if rng.random() < 0.6})
        saved = np.array([sum(size[s] for s in saves[i]) for i in range(n)], dtype=float)
        ins = [f"out{i - 1}" if i else "batch" for i in range(n)]
        terms = activation_terms(
            saved, np.zeros(n), np.zeros(n), np.array([float(size[x]) for x in ins]),
            held_w=(np.array([float(sum(size[x] for x in keeps[i])) for i in range(n)]),
                    np.array([float(size[ins[i]]) if ins[i] in keeps[i] else 0.0
                              for i in range(n)])))
        for rc in (False, True):
            (he, hs), (we, ws), (re, rs) = terms.forms(rc)
            for s in range(n):
                for e in range(s + 1, n + 1):
                    union = set().union(*keeps[s:e]) - {"batch"}
                    assert terms.held_for_w(s, e, rc) == sum(size[x] for x in union)
                    assert we[e] - ws[s] == pytest.approx(terms.held_for_w(s, e, rc))
                    assert he[e] - hs[s] == pytest.approx(terms.held(s, e, rc))
                    assert re[e] - rs[s] == pytest.approx(terms.rebuilt(s, e) if rc else 0.0)


def test_without_what_w_keeps_a_split_stage_holds_its_graph_until_w() -> None:
    prof = make_profile([1.0, 1.0, 1.0], saved_bytes=[10.0, 20.0, 30.0],
                        in_bytes=[5.0, 6.0, 7.0])
    terms = CostModel(prof, 2, 2, stages=2, recompute="always").activations()
    assert terms.w is None
    assert terms.held_for_w(1, 3, recompute=False) == 50.0
    assert terms.held_for_w(1, 3, recompute=True) == 6.0 + 50.0  # the stash and the rebuilt
    for rc in (False, True):
        w = terms.forms(rc)[1]
        assert w[0][3] - w[1][1] == terms.held_for_w(1, 3, rc)


def test_profile_without_the_parts_keeps_the_older_rule() -> None:
    prof = make_profile([1.0, 1.0, 1.0], saved_bytes=[10.0, 20.0, 30.0],
                        in_bytes=[5.0, 6.0, 7.0])
    cm = CostModel(prof, 2, 2, stages=2, recompute="always")  # b = 1, as profiled
    terms = cm.activations()
    assert not terms.exact and cm.step_bytes() == (0.0, 0.0)
    assert terms.held(1, 3, recompute=False) == 50.0  # the per-layer sum
    assert terms.held(0, 2, recompute=True) == 5.0 and terms.rebuilt(0, 2) == 30.0


def test_exact_profile_counts_the_batch_once_on_the_first_stage() -> None:
    prof = make_profile([1.0, 1.0], saved_bytes=[10.0, 20.0], in_bytes=[4.0, 8.0],
                        sizes=(1, 2))
    layers = tuple(dataclasses.replace(lay, saved_input_bytes=(4.0, 8.0) if i == 0 else (0, 0),
                                       saved_output_bytes=(0.0, 0.0))
                   for i, lay in enumerate(prof.layers))
    cm = CostModel(dataclasses.replace(prof, layers=layers), 5, 3, stages=2)  # b = 2, 2, 1
    assert cm.activations().exact
    assert cm.step_bytes() == (4.0 * 5, 0.0)  # the whole batch's inputs, once; no loss figures
    state = float(cm.param_state_bytes()[:1].sum())
    # GPipe holds all M = 3 in flight, each (20 saved - 8 of them the batch's) at the largest
    # b = 2, plus the batch
    assert cm.stage_memory_bytes(0, 1, 0) - state == pytest.approx(3 * (20.0 - 8.0) + 20.0)
