"""Devices: whether one exists here, dtypes, what a device is and how big its caches are.

    >>> resolve_device("cpu"), parse_dtype("bfloat16")
    (device(type='cpu'), torch.bfloat16)
    >>> check_device("meta")
    "device 'meta' is not supported; use 'cpu' or 'cuda[:N]'"

The one device check of the executor: the runners, the profiler and the commands ask here.
"""

from __future__ import annotations

import os
import platform

import torch

from partitioner.formats.profile import DeviceInfo

__all__ = ["DTYPES", "check_device", "cpu_l2_bytes", "default_flush_bytes", "device_info",
           "free_bytes", "parse_dtype", "resolve_device"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: object) -> str | None:
    """None if ``device`` names a device this machine has, else a sentence saying why not
    and what would do."""
    if not isinstance(device, (str, torch.device)):
        return f"device {device!r} is not a device name; use e.g. 'cpu' or 'cuda:0'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"device {device!r} is not a torch device name ({exc}); use e.g. 'cpu' or 'cuda:0'"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (f"device {str(device)!r} needs CUDA, which this machine lacks (torch "
                    f"{torch.__version__}); use 'cpu' or run on a machine with a GPU")
        if dev.index is not None and dev.index >= count:
            return (f"device {str(device)!r} does not exist: this machine has {count} CUDA "
                    f"device(s), cuda:0..cuda:{count - 1}")
        return None
    return f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'"


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch.device (``cuda`` alone: the current CUDA device), or a ValueError saying why
    this machine does not have it (``check_device``)."""
    problem = check_device(device)
    if problem:
        raise ValueError(problem)
    dev = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if dev == torch.device("cuda") \
        else dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` keeps the model's own dtype; otherwise one of ``DTYPES`` (name or torch dtype)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def device_info(device: torch.device) -> DeviceInfo:
    """Name, kind and memory of a device; for the CPU, the machine's RAM."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(props.name, "cuda", int(props.total_memory))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        name)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(f"{name} ({os.cpu_count()} cores)", "cpu", int(memory))


def cpu_l2_bytes() -> int:
    """One core's L2 cache in bytes (sysconf, else sysfs; 1 MiB when neither says)."""
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        if size > 0:
            return int(size)
    except (ValueError, OSError):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return 1 << 20


def default_flush_bytes(device: torch.device, model_bytes: int) -> int:
    """The cache flush the profiler uses unless told: on the CPU, for a model whose weights
    (``model_bytes``) do not fit one core's L2, twice that L2, so a layer's weights and saved
    tensors come from beyond L2 as inside the whole model, while its input (made after the
    flush) is hot as if just made by the layer before. None for a model that fits (its
    weights stay in L2 from layer to layer) and none on CUDA.

        >>> l2, cpu = cpu_l2_bytes(), torch.device("cpu")
        >>> default_flush_bytes(cpu, 4 * l2) == 2 * l2, default_flush_bytes(cpu, l2 // 2)
        (True, 0)
        >>> default_flush_bytes(torch.device("cuda"), 4 * l2)
        0
    """
    if device.type != "cpu":
        return 0
    l2 = cpu_l2_bytes()
    return 2 * l2 if model_bytes > l2 else 0


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: CUDA's free memory, or the CPU's available
    RAM (MemAvailable; all RAM where /proc/meminfo does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
