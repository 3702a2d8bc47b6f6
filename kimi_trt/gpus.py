"""The accelerators the planner knows: memory, SM version, FP8, NVLink domain.

Memory is the capacity NVIDIA states for the part (decimal GB, as on the data sheet and
in MLPerf system descriptions: H100 SXM 80 GB, H200 141 GB, B200 180 GB in HGX/DGX B200
(8 x 180 GB = 1,440 GB), GB200 186 GB per GPU in an NVL72 rack). The driver reports a
little more (e.g. an H100 shows ~79.6 GiB = 85.5e9 bytes), so planning with the stated
figure errs on the safe side. `cpu` is the torch executor on this host: its memory is the
machine's RAM, read when asked, and it is shared by every rank started on the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kimi_trt.errors import ConfigError

GB = 10**9
GiB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    """One kind of device a rank runs on."""

    name: str  # the BuildConfig `gpu` key
    label: str  # for humans
    memory_bytes: int  # per device; for `cpu`, the host's RAM (shared by its ranks)
    sm: int | None  # compute capability x10 (90 Hopper, 100 Blackwell); None for cpu
    fp8: bool  # tensor cores run FP8 (e4m3) GEMMs
    nvlink_domain: int  # devices joined by NVLink (one HGX node, or one NVL72 rack)
    domain_label: str  # what one NVLink domain is called
    # Per-rank memory the runtime takes before weights: CUDA context, NCCL, cuBLAS/TensorRT
    # workspaces (GPUs); the Python + torch process (cpu). An estimate, stated as such.
    reserved_bytes: int
    shared_memory: bool = False  # all ranks of the host draw on one memory pool


GPUS: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", "H100 SXM 80 GB", 80 * GB, 90, True, 8, "node", 2 * GiB),
    "h200": DeviceSpec("h200", "H200 141 GB", 141 * GB, 90, True, 8, "node", 2 * GiB),
    "b200": DeviceSpec("b200", "B200 180 GB", 180 * GB, 100, True, 8, "node", 2 * GiB),
    "gb200": DeviceSpec("gb200", "GB200 186 GB", 186 * GB, 100, True, 72, "NVL72 rack", 2 * GiB),
}


def host_memory_bytes() -> int:
    """Total RAM of this machine (bytes), from the OS."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX hosts
        raise ConfigError("cannot read this host's memory size for gpu: cpu") from None


def cpu_spec() -> DeviceSpec:
    ram = host_memory_bytes()
    return DeviceSpec(
        "cpu",
        f"CPU host ({ram / GB:.0f} GB RAM)",
        ram,
        None,
        False,
        1,
        "host",
        1 * GiB,
        shared_memory=True,
    )


def device_spec(name: str) -> DeviceSpec:
    """The catalogue entry for a BuildConfig `gpu` value."""
    if name == "cpu":
        return cpu_spec()
    if name not in GPUS:
        raise ConfigError(f"unknown gpu {name!r} (expected one of {', '.join([*GPUS, 'cpu'])})")
    return GPUS[name]
