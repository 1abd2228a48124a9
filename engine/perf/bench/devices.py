"""What a GPU can do at best: dense tensor-core peaks, HBM bandwidth, L2 size.

MFU (model FLOPs utilisation) is achieved FLOP/s over the device's dense peak
for the precision the network runs in. Peaks are the vendor's dense (not
sparse) figures; a device not listed gets no MFU rather than a guessed one.
"""
from __future__ import annotations

import platform
import sys

import torch

TB = 1e12
# name fragment -> peaks; matched in order against torch.cuda.get_device_name()
KNOWN: tuple[tuple[str, dict], ...] = (
    ("H200", {"name": "H200", "hbm_bytes_per_s": 4.8 * TB,
              "flops_per_s": {"bf16": 989 * TB, "fp16": 989 * TB, "tf32": 494 * TB, "fp32": 67 * TB}}),
    ("H100 PCIe", {"name": "H100 PCIe", "hbm_bytes_per_s": 2.0 * TB,
                   "flops_per_s": {"bf16": 756 * TB, "fp16": 756 * TB, "tf32": 378 * TB, "fp32": 51 * TB}}),
    ("H100 NVL", {"name": "H100 NVL", "hbm_bytes_per_s": 3.9 * TB,
                  "flops_per_s": {"bf16": 835 * TB, "fp16": 835 * TB, "tf32": 418 * TB, "fp32": 60 * TB}}),
    ("H100", {"name": "H100 SXM", "hbm_bytes_per_s": 3.35 * TB,
              "flops_per_s": {"bf16": 989 * TB, "fp16": 989 * TB, "tf32": 494 * TB, "fp32": 67 * TB}}),
    ("A100", {"name": "A100", "hbm_bytes_per_s": 2.0 * TB,
              "flops_per_s": {"bf16": 312 * TB, "fp16": 312 * TB, "tf32": 156 * TB, "fp32": 19.5 * TB}}),
)
DEFAULT_L2_BYTES = 50 * 2**20


def peaks_for(name: str) -> dict | None:
    """The peak table of a device by its CUDA name, or None if not known."""
    for fragment, peaks in KNOWN:
        if fragment.lower() in name.lower():
            return peaks
    return None


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
