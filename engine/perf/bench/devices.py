"""What a GPU can do at best: dense tensor-core peaks, HBM bandwidth, L2 size.

MFU (model FLOPs utilisation) is achieved FLOP/s over the device's dense peak
for the precision the network runs in. Peaks are the vendor's dense (not
sparse) figures; a device not listed gets no MFU rather than a guessed one.
"""
from __future__ import annotations

import platform
import sys

import torch

from engine.perf.peaks import peaks_for

DEFAULT_L2_BYTES = 50 * 2**20


def device_info(device: torch.device | str = "cuda") -> dict:
    """Facts about the device a benchmark runs on (JSON-ready)."""
    device = torch.device(device)
    info = {"type": device.type, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_bytes=int(getattr(props, "L2_cache_size", DEFAULT_L2_BYTES)),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", l2_bytes=DEFAULT_L2_BYTES)
    info["peaks"] = peaks_for(info["name"]) if device.type == "cuda" else None
    return info


def mfu(flops: float, seconds: float, precision: str, info: dict) -> float | None:
    """Achieved FLOP/s over the device's dense peak for `precision`; None if unknown."""
    peaks = info.get("peaks")
    if not peaks or seconds <= 0:
        return None
    return flops / seconds / peaks["flops_per_s"][precision]
