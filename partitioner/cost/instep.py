"""A layer's time inside a training step, from its time alone and a device model.

    >>> from partitioner.formats.device import DeviceModel
    >>> dm = DeviceModel("toy", host_forward=0.5, device_scale=1.0, small_work_exponent=1.0)
    >>> alone = np.array([[1.0, 1.0, 2.0, 4.0]])      # launch-bound at b=1, 2; then linear
    >>> [float(instep_ms(alone, (1, 2, 4, 8), dm.host_forward, dm, b)[0]) for b in (1, 2, 8)]
    [0.5, 1.0, 4.0]

Alone, a layer takes the larger of the host's time to issue its kernels and the device's time
to run them, plus the timing harness's own cost. Inside a step the host runs ahead of the
device: this module gives each layer's two times as a step sees them, and the simulator runs
them as two clocks (``span_ms`` here: a sequence of layers issued by a host that starts at h
on a device free at t ends at ``max(t + device, h + span)``), so a launch-bound layer hides
behind the device work queued before it. Taken alone (a partitioner's stage sum), a layer
costs ``max(host, device)``:

- *launch floor*: the least time the layer took alone at any size (a launch-bound layer sits
  on it), or its profiled ``launch_ms`` at that size where the profile has it; the host's time
  in a step is the floor x the device model's host factor of the pass (``host_forward``,
  ``host_backward``, ``host_recompute``).
- *device time*: at the sizes where the layer was device-bound alone (more than
  ``LAUNCH_BAND`` x its floor), its alone time, interpolated between them and extrapolated
  linearly above; below the smallest such size b0, the time there x ``(b / b0) **
  small_work_exponent``; all x ``device_scale``. A layer launch-bound at every size gets its
  largest size's time this way (an upper bound: its device time is at most that).

Layers of one signature (type, parameter bytes, input and output bytes at every size: the same
work) are pooled first, the median of their times at each size, so that one noisy measurement
of a repeated block does not move the floor or the device time of that block alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import numpy.typing as npt

from partitioner.cost.sizes import FloatArray, interpolate
from partitioner.formats.device import DeviceModel
from partitioner.formats.profile import Profile

IntArray = npt.NDArray[np.int64]

__all__ = ["LAUNCH_BAND", "device_ms", "host_device_ms", "instep_ms", "layer_host_device_ms",
           "pooled", "pooled_layers", "span_ms"]

#: A size at which a layer took at most this multiple of its least time counts as launch-bound.
LAUNCH_BAND = 1.25


def pooled(table: FloatArray, signatures: Sequence[Hashable]) -> FloatArray:
    """Each row replaced by the median, size by size, of the rows of its signature.

        >>> pooled(np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 5.0]]), ["a", "a", "b"]).tolist()
        [[2.0, 2.0], [2.0, 2.0], [5.0, 5.0]]
    """
    groups: dict[Hashable, list[int]] = {}
    for i, sig in enumerate(signatures):
        groups.setdefault(sig, []).append(i)
    out = table.astype(np.float64, copy=True)
    for rows in groups.values():
        if len(rows) > 1:
            out[rows] = np.median(table[rows], axis=0)
    return out


def device_ms(alone: FloatArray, sizes: tuple[int, ...], dm: DeviceModel, b: float) -> FloatArray:
    """Every row's device time at size b (see the module's docstring), ``device_scale`` applied.

        >>> dm = DeviceModel("toy", small_work_exponent=0.5)
        >>> device_ms(np.array([[1.0, 1.0, 4.0]]), (1, 4, 16), dm, 4).tolist()   # 4 x (1/4)^0.5
        [2.0]
    """
    floor = alone.min(axis=1)
    bound = alone > LAUNCH_BAND * floor[:, None]
    n_sizes = len(sizes)
    first = np.where(bound.any(axis=1), bound.argmax(axis=1), n_sizes - 1)
    out = np.zeros(len(alone))
    for j0 in np.unique(first):
        rows = np.flatnonzero(first == j0)
        s0 = sizes[j0]
        if b < s0 or j0 == n_sizes - 1:
            out[rows] = alone[rows, j0] * (b / s0) ** (dm.small_work_exponent if b < s0 else 1.0)
        else:
            out[rows] = interpolate(alone[rows, j0:], sizes[j0:], b)
    result: FloatArray = out * dm.device_scale
    return result


def host_device_ms(alone: FloatArray, sizes: tuple[int, ...], host_factor: float,
                   dm: DeviceModel, b: float,
                   launch: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
    """Every row's (host, device) time in a step at size b, both 0 where it took no time
    alone. ``alone`` has one row per layer, one column per size (pool it first: ``pooled``);
    ``launch``: the profile's ``launch_ms`` of every layer at size b, where it has them."""
    floor = alone.min(axis=1) if launch is None else launch
    active = alone.max(axis=1) > 0
    host: FloatArray = np.where(active, host_factor * floor, 0.0)
    device: FloatArray = np.where(active, device_ms(alone, sizes, dm, b), 0.0)
    return host, device


def instep_ms(alone: FloatArray, sizes: tuple[int, ...], host_factor: float, dm: DeviceModel,
              b: float, launch: FloatArray | None = None) -> FloatArray:
    """Every row's time in a step at size b taken alone: max(host, device) of
    ``host_device_ms``."""
    out: FloatArray = np.maximum(*host_device_ms(alone, sizes, host_factor, dm, b, launch))
    return out


def span_ms(host: FloatArray, device: FloatArray,
            bounds: IntArray | None = None) -> FloatArray:
    """How long after its host starts a sequence of layers (in issue order) ends on a device
    that is free: ``max over j of (host before j + max(host_j, device_j) + device after
    j)``, each layer's kernels issued and run as a stream (a kernel runs once issued and once
    the device is free). At least ``max(sum(host), sum(device))``, at most the sum of the
    layers' maxima. ``bounds`` cuts the arrays into sequences (``bounds[k]:bounds[k+1]``;
    default: one), one span each (0 for an empty one).

        >>> span_ms(np.array([3.0, 1.0]), np.array([1.0, 3.0])).tolist()  # issue, then run
        [6.0]
        >>> span_ms(np.array([1.0, 3.0]), np.array([3.0, 1.0])).tolist()  # overlapped
        [4.0]
        >>> span_ms(np.array([1.0, 3.0, 2.0]), np.array([3.0, 1.0, 1.0]), np.array([0, 2, 3])
        ...         ).tolist()
        [4.0, 2.0]
    """
    if bounds is None:
        bounds = np.array([0, len(host)])
    out = np.zeros(len(bounds) - 1)
    if not len(host):
        return out
    issued = np.concatenate(([0.0], np.cumsum(host)))
    ran = np.concatenate(([0.0], np.cumsum(device)))
    seg = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    start, end = bounds[:-1][seg], bounds[1:][seg]
    j = np.arange(len(host))
    value = (issued[j] - issued[start]) + np.maximum(host, device) + (ran[end] - ran[j + 1])
    full = np.flatnonzero(np.diff(bounds) > 0)
    out[full] = np.maximum.reduceat(value, bounds[:-1][full])
    return out


def pooled_layers(profile: Profile, table: FloatArray) -> FloatArray:
    """``pooled`` over a profile's layers: a signature is (type, parameter bytes, input and
    output bytes at every size)."""
    return pooled(table, [(lay.type, lay.param_bytes, lay.in_bytes, lay.out_bytes)
                          for lay in profile.layers])


def layer_host_device_ms(sizes: tuple[int, ...], key: str, b: float, dm: DeviceModel,
                         alone: Callable[[str], FloatArray],
                         launch: FloatArray | None) -> tuple[FloatArray, FloatArray]:
    """Every layer's (host, device) time of ``key`` (``fwd_ms``, ``bwd_ms``,
    ``bwd_input_ms``, ``bwd_weight_ms``, or ``recompute_ms``: the forward again, issued by a
    recomputing backward) in a step at size b; ``alone(pass_key)`` gives that pass's pooled
    alone times (``pooled_layers``) at the profile's ``sizes``, ``launch`` its ``launch_ms``
    at b where it has them."""
    pass_key = "fwd_ms" if key == "recompute_ms" else key
    factor = (dm.host_recompute if key == "recompute_ms" else dm.host_forward
              if key == "fwd_ms" else dm.host_backward)
    return host_device_ms(alone(pass_key), sizes, factor, dm, b, launch)
