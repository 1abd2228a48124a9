"""What a GPU can do at best: dense tensor-core peaks and HBM bandwidth, by device.

Vendor dense (not sparse) figures. The analytic model's roofline floors use
the H100 SXM (the design's reference machine); the benchmarks compute MFU
against the device they run on, and a device not listed gets no MFU rather
than a guessed one. No torch import: `fusenet check --kernels` reads it.
"""
from __future__ import annotations

TB = 1e12
# name fragment -> peaks; matched in order against the CUDA device name
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


def peaks_for(name: str) -> dict | None:
    """The peak table of a device by its CUDA name, or None if not known."""
    for fragment, peaks in KNOWN:
        if fragment.lower() in name.lower():
            return peaks
    return None


H100 = peaks_for("H100 SXM")  # the reference machine of the analytic model (DESIGN.md section 5)
