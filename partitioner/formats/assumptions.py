"""What a plan assumes beyond its profile: the link between stages, the runtime, the optimizer.

    >>> LINKS["nvlink"].transfer_ms(450e6)          # 450 MB over 450 GB/s, plus the latency
    1.01
    >>> Link(-1.0, 0.0)
    Traceback (most recent call last):
    ...
    ValueError: link bandwidth_gbps=-1.0 must be a number of GB/s >= 1e-06 (inf: free communication)

Each record validates itself when made, so a plan, a command line or a library call can never
carry a link or runtime whose times would come out negative or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from partitioner.formats.checks import Problems
from partitioner.formats.device import DeviceModel, DeviceModelError, device_model_from_dict
from partitioner.formats.units import MAX_MS, MIN_BANDWIDTH_GBPS

__all__ = ["LINKS", "OPTIMIZERS", "Link", "Optimizer", "Runtime", "default_link",
           "parse_assumptions"]

Optimizer = Literal["none", "sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
MAX_COMPUTE_SCALE = 1e6


def _number(value: object) -> float:
    """``value`` as a float, NaN for anything that is not a real number (bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) + 0.0  # -0.0 is 0.0


@dataclass(frozen=True)
class Link:
    """A point-to-point link between neighbouring stages: time = latency + bytes / bandwidth.

    ``bandwidth_gbps``: 10**9 bytes per second, one direction (``inf``: free);
    ``latency_ms``: the fixed cost of each message.
    """

    bandwidth_gbps: float
    latency_ms: float

    def __post_init__(self) -> None:
        bandwidth, latency = _number(self.bandwidth_gbps), _number(self.latency_ms)
        if not bandwidth >= MIN_BANDWIDTH_GBPS:  # NaN fails too
            raise ValueError(f"link bandwidth_gbps={self.bandwidth_gbps!r} must be a number of "
                             f"GB/s >= {MIN_BANDWIDTH_GBPS:g} (inf: free communication)")
        if not 0 <= latency <= MAX_MS:
            raise ValueError(f"link latency_ms={self.latency_ms!r} must be a number of "
                             f"milliseconds in 0..{MAX_MS:g}")
        object.__setattr__(self, "bandwidth_gbps", bandwidth)
        object.__setattr__(self, "latency_ms", latency)

    def transfer_ms(self, n_bytes: float) -> float:
        """Time to move ``n_bytes`` across the link (0 when there is nothing to move)."""
        if n_bytes <= 0:
            return 0.0
        wire = 0.0 if math.isinf(self.bandwidth_gbps) else n_bytes / (self.bandwidth_gbps * 1e6)
        return self.latency_ms + wire

    @property
    def is_free(self) -> bool:
        return math.isinf(self.bandwidth_gbps) and self.latency_ms == 0

    def describe(self) -> str:
        """``'450 GB/s + 0.01 ms'``, or ``'free'``."""
        if self.is_free:
            return "free"
        return f"{self.bandwidth_gbps:g} GB/s + {self.latency_ms:g} ms"


#: Default links by kind. NVLink 4 on H100/H200: 900 GB/s both directions, 450 each way.
#: PCIe 5 x16: ~64 GB/s raw, ~50 effective. 100 Gb Ethernet: 12.5 GB/s. Loopback: gloo on one
#: host through TCP, a few GB/s with ~0.1 ms per message. InfiniBand NDR (``ib``, between
#: nodes): 400 Gb/s per port and direction, so 50 GB/s, with a few microseconds per message
#: (the port's ~1 us plus the collective library's own; 5 us here), the figures NVIDIA states
#: for its ConnectX-7 NDR adapters (one port per GPU, as in DGX H100/H200 systems).
LINKS: dict[str, Link] = {
    "nvlink": Link(450.0, 0.01),
    "ib": Link(50.0, 0.005),
    "pcie": Link(50.0, 0.02),
    "ethernet": Link(12.5, 0.05),
    "loopback": Link(2.0, 0.1),
    "free": Link(math.inf, 0.0),
}


def default_link(device_kind: str) -> str:
    """The link kind assumed between stages when none is given: NVLink on CUDA, else loopback."""
    return "nvlink" if device_kind == "cuda" else "loopback"


@dataclass(frozen=True)
class Runtime:
    """How the executor's actions relate to the profile and the link: an F or B of a stage
    takes ``compute_scale`` x (the sum of its layers' profiled times) + ``action_ms``, and a
    message between devices reaches its receiver ``message_ms`` after its send ends (a delay
    that does not occupy the sender: waking a waiting rank, the backend's own threads).

        >>> Runtime(compute_scale=1.2, action_ms=0.05)   # a 10 ms action takes 12.05 ms
        Runtime(compute_scale=1.2, action_ms=0.05, message_ms=0.0, device=None)

    Inside a pipeline a stage's layers run back to back and the stage waits between its
    actions, so its caches go cold in between, and each action pays the runtime's own
    dispatch. ``executor.profiling.calibrate.measure_runtime`` fits all three from a short
    trial run; the default, Runtime(), takes the profile as it is.

    ``device``: on a GPU, the device model (``formats.device``) that turns each layer's time
    alone into its time in a step (a host that runs ahead of the device) before the three
    figures above apply; None (a CPU, or a profile already timed in a step): as profiled.
    """

    compute_scale: float = 1.0
    action_ms: float = 0.0
    message_ms: float = 0.0
    device: DeviceModel | None = None

    def __post_init__(self) -> None:
        scale, action, message = (_number(self.compute_scale), _number(self.action_ms),
                                  _number(self.message_ms))
        if not 0 < scale <= MAX_COMPUTE_SCALE:
            raise ValueError(f"compute_scale={self.compute_scale!r} must be a number > 0 and <= "
                             f"{MAX_COMPUTE_SCALE:g} (1.0: actions take their profiled time)")
        if not 0 <= action <= MAX_MS:
            raise ValueError(f"action_ms={self.action_ms!r} must be a number of milliseconds in "
                             f"0..{MAX_MS:g} (0: no fixed cost per action)")
        if not 0 <= message <= MAX_MS:
            raise ValueError(f"message_ms={self.message_ms!r} must be a number of milliseconds "
                             f"in 0..{MAX_MS:g} (0: a message is there when its send ends)")
        if self.device is not None and not isinstance(self.device, DeviceModel):
            raise ValueError(f"device={self.device!r} must be a DeviceModel "
                             f"(formats.device.load_device_model) or None (as profiled)")
        object.__setattr__(self, "compute_scale", scale)
        object.__setattr__(self, "action_ms", action)
        object.__setattr__(self, "message_ms", message)


def parse_assumptions(cost: Mapping[str, Any], p: Problems) -> tuple[Link, Runtime]:
    """A plan's link and runtime from its ``cost_model`` object, every problem added to ``p``."""
    before = len(p)
    bandwidth = p.number(cost.get("bandwidth_gbps", "inf"), "cost_model.bandwidth_gbps",
                         inf_ok=True, default=math.inf)
    latency = p.number(cost.get("latency_ms", 0), "cost_model.latency_ms", high=MAX_MS)
    scale = p.number(cost.get("compute_scale", 1.0), "cost_model.compute_scale", default=1.0)
    action = p.number(cost.get("action_ms", 0.0), "cost_model.action_ms", high=MAX_MS)
    message = p.number(cost.get("message_ms", 0.0), "cost_model.message_ms", high=MAX_MS)
    device = None
    if cost.get("device_model") is not None:
        try:
            device = device_model_from_dict(cost["device_model"], "cost_model.device_model")
        except DeviceModelError as exc:
            p.add("cost_model.device_model", str(exc))
    link, runtime = Link(math.inf, 0.0), Runtime()
    if len(p) == before:
        try:
            link = Link(bandwidth, latency)
        except ValueError as exc:
            p.add("cost_model", str(exc))
        try:
            runtime = Runtime(scale, action, message, device)
        except ValueError as exc:
            p.add("cost_model", str(exc))
    return link, runtime
